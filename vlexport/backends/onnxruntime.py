"""ONNX Runtime runner: one session per part, infer(feed) -> dict of arrays (Polygraphy's runner shape)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np


class OrtRunner:
    """The session opens on first use, so that a part never run (the full decoder under `verify --layers`, a 7B's
    13 GB) costs no memory."""

    def __init__(self, onnx_path: Path, threads: int | None = None):
        self.onnx_path, self.threads = Path(onnx_path), threads

    @cached_property
    def session(self):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.log_severity_level = 3
        return ort.InferenceSession(str(self.onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])

    @cached_property
    def input_names(self) -> list[str]:
        return [i.name for i in self.session.get_inputs()]

    @cached_property
    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feed)))

    def release(self) -> None:
        """Close the session and give its memory back; it opens again on the next use."""
        self.__dict__.pop("session", None)

"""ONNX Runtime runner: one session per part, infer(feed) -> dict of arrays (Polygraphy's runner shape)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class OrtRunner:
    """The session opens on first use, so that a part never run (the full decoder under `verify --layers`, a 7B's
    13 GB) costs no memory."""

    def __init__(self, onnx_path: Path, threads: int | None = None):
        self.onnx_path, self.threads = Path(onnx_path), threads
        self._session = None

    @property
    def session(self):
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            if self.threads:
                opts.intra_op_num_threads = self.threads
            opts.log_severity_level = 3
            session = ort.InferenceSession(str(self.onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
            self._names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
            self._session = session
        return self._session

    @property
    def input_names(self) -> list[str]:
        return self.session and self._names[0]

    @property
    def output_names(self) -> list[str]:
        return self.session and self._names[1]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feed)))

"""Calibration: the set (calib/ or --calib DIR), what the FP32 bundle does on it, and the cache that a rebuild reuses.

One calibration serves every INT8 form: the FP32 parts' inputs on the set feed ONNX Runtime's range calibrators (static
Q/DQ), the sensitivity ranking and the gate that the fallback checks; SmoothQuant's channel maxima come from the same
set run through the PyTorch model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from .. import lora_slots

DEFAULT_CALIB_DIR = Path(__file__).resolve().parent.parent.parent / "calib"
CONTINUATION_TOKENS = 16  # greedy FP32 tokens per case that the gate teacher-forces


def cache_root() -> Path:
    return Path(os.environ.get("VLEXPORT_CACHE", Path.home() / ".cache" / "vlexport"))


def calib_dir(path: str | Path | None) -> Path:
    return Path(path) if path else DEFAULT_CALIB_DIR


def calib_cases(path: str | Path | None):
    from ..parity.data import folder_cases

    return folder_cases(calib_dir(path))


def calib_fingerprint(path: str | Path | None) -> str:
    """sha256 over prompts.jsonl and the files it names (scikit-image photos are named, not hashed)."""
    folder = calib_dir(path)
    h = hashlib.sha256((folder / "prompts.jsonl").read_bytes())
    for line in (folder / "prompts.jsonl").read_text().splitlines():
        if line.strip():
            image = json.loads(line)["image"]
            h.update(image.encode() if image.startswith("skimage:") else (folder / image).read_bytes())
    return h.hexdigest()


def file_digest(*paths: Path) -> str:
    from ..files import sha256_file

    h = hashlib.sha256()
    for p in paths:
        if p.exists():
            h.update(sha256_file(p).encode())
    return h.hexdigest()


def prompt_text(case, chat_prompt) -> str:
    return chat_prompt(case.prompt) if case.prompt is not None else case.raw_prompt


@dataclass
class CalibCase:
    name: str
    pixel_values: np.ndarray
    features: np.ndarray  # FP32 vision output
    prompt_ids: list[int]
    continuation: list[int]  # FP32 greedy tokens
    logits: np.ndarray  # FP32 logits predicting each continuation token (teacher-forced)
    prefill: dict  # the FP32 decoder's prefill feed
    vision: dict  # the vision part's feed


def run_fp32(bundle, cases, log=None) -> list[CalibCase]:
    """The FP32 bundle on the calibration set: every part's inputs and the outputs that lower precisions must match."""
    from ..progress import track

    cases = list(cases)
    out = []
    with track(log or (lambda m: None), "calibration set: FP32 bundle", total=len(cases)) as advance:
        for case in cases:
            out.append(_run_case(bundle, case))
            advance(1, case.name)
    return out


def _run_case(bundle, case) -> CalibCase:
    """One calibration case through the FP32 bundle."""
    text = prompt_text(case, bundle.chat_prompt)
    ids = bundle.encode(text)
    pv = bundle.pixel_values(case.image)
    features = bundle.image_features(pv)
    tokens = bundle.generate(case.image, raw_prompt=text, max_new_tokens=CONTINUATION_TOKENS).token_ids
    logits = bundle.teacher_forced_logits(ids, features, tokens)
    arr = np.array([ids], dtype=np.int64)
    # Slot inputs fed "no adapter": a graph for TensorRT has no defaults on them (the ORT-native one does).
    prefill = {"inputs_embeds": bundle.embed(arr, features), "attention_mask": np.ones_like(arr),
               "position_ids": np.arange(arr.shape[1], dtype=np.int64)[None], **bundle.empty_past(),
               **bundle.slot_feed("decoder", None)}
    vision = {"pixel_values": pv, **lora_slots.repeat_rows(bundle.slot_feed("vision", None), pv.shape[0])}
    return CalibCase(case.name, pv, features, ids, tokens, logits, prefill, vision)


class FeedReader(CalibrationDataReader):
    """onnxruntime.quantization's calibration reader over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self.feeds = feeds
        self.on_sample = None  # progress: called once per feed handed to the calibrator
        self.rewind()

    def get_next(self):
        feed = next(self._it, None)
        if feed is not None and self.on_sample is not None:
            self.on_sample(1)
        return feed

    def rewind(self):
        self._it = iter(self.feeds)

    def __len__(self):
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int):
        self._it = iter(self.feeds[start_index:end_index])

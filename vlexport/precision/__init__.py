"""Lower the exported FP32 parts to the target's precision: FP16, INT8 in the form the backend runs best, or INT4
weight-only for the language part (precision/int4.py).

build() exports FP32 parts (SmoothQuant already folded into the weights when a part is W8A8), then lower_parts()
replaces each part that the target wants lower, and each task's copy of it, and records in the manifest what was
done: the form, the calibration, the nodes kept in FP32 and why, and the gate measured on the calibration set.
The final word is `vlexport verify` against the PyTorch reference, which build runs next.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


from ..errors import VlexportError
from ..files import remove_part
from ..progress import track
from .int4 import INT4_DEFAULTS, Int4Options, int4_options  # noqa: F401 (re-exported for target.py and build.py)
from .packing import packed_products
from .int8 import CALIBRATIONS

DECODER_KINDS = ("w8a8", "weight-only")
INT8_DEFAULTS = {"calibration": "percentile", "decoder": "w8a8", "vision": "w8a8", "smoothquant_alpha": 0.5,
                 "fallback": True, "form": None}


@dataclass(frozen=True)
class Int8Options:
    calibration: str = "percentile"  # activation ranges of the static Q/DQ graph
    decoder: str = "w8a8"  # w8a8 (SmoothQuant) | weight-only
    vision: str = "w8a8"
    smoothquant_alpha: float = 0.5  # 0 disables SmoothQuant
    fallback: bool = True
    form: str | None = None  # qdq | dynamic; default per backend: tensorrt -> qdq, onnxruntime -> dynamic

    def kind(self, part: str) -> str:
        return self.decoder if part == "decoder" else self.vision

    def form_for(self, part: str, backend: str) -> str:
        if self.kind(part) == "weight-only":
            return "weight-only"
        return self.form or ("qdq" if backend == "tensorrt" else "dynamic")

    def smoothed_parts(self, precision: dict) -> set:
        # Weight-only parts too: MatMulNBits quantizes weights in blocks along the input channels (and, at accuracy
        # level 4, activations in the same blocks), so a channel with a huge input and a tiny weight column suffers
        # the same way.
        return {p for p in ("vision", "decoder") if precision.get(p) == "int8" and self.smoothquant_alpha > 0}


def apply_overrides(flag: str, defaults: dict, section: dict, overrides: str | None, example: str) -> dict:
    """`defaults`, then the target's [flag] section, then `--flag KEY=VALUE,...`; unknown keys refused.

    The values are returned as given (an override is a string); each caller checks and converts its own."""
    values = {**defaults, **section}
    for item in (overrides or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise VlexportError(f"--{flag} '{overrides}': expected KEY=VALUE[,KEY=VALUE...], e.g. {example}")
        key, value = (s.strip() for s in item.split("=", 1))
        values[key] = value
    unknown = set(values) - set(defaults)
    if unknown:
        raise VlexportError(f"{flag} option(s) {', '.join(sorted(unknown))} unknown: use {', '.join(defaults)}")
    return values


def option_bool(flag: str, key: str, value) -> bool:
    """A TOML boolean, or "true"/"false" from the command line."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise VlexportError(f"{flag} option {key}={value!r}: use true or false")


def int8_options(profile_section: dict, overrides: str | None = None) -> Int8Options:
    """The target's [int8] section with `--int8 key=value,...` applied, validated."""
    values = apply_overrides("int8", INT8_DEFAULTS, profile_section, overrides, "calibration=entropy")
    checks = {"calibration": CALIBRATIONS, "decoder": DECODER_KINDS, "vision": ("w8a8",), "form": (None, "qdq", "dynamic")}
    for key, allowed in checks.items():
        if values[key] not in allowed:
            raise VlexportError(f"int8 option {key}={values[key]!r}: use one of {', '.join(str(a) for a in allowed if a)}")
    fallback = option_bool("int8", "fallback", values["fallback"])
    try:
        alpha = float(values["smoothquant_alpha"])
    except (TypeError, ValueError):
        alpha = -1.0
    if not 0 <= alpha <= 1:
        raise VlexportError(f"int8 option smoothquant_alpha={values['smoothquant_alpha']!r}: use a number in [0, 1] (0 = off)")
    return Int8Options(values["calibration"], values["decoder"], values["vision"], alpha, fallback, values["form"])


# The calibration set is not the data verify judges on: the fallback aims at half the error the gate allows in the
# continuous metrics (KL, cosine). Top-1 keeps its limit: on 128 tokens it moves in steps of 0.8%, and its flips sit at
# near-ties of the reference, which no INT8 product kept in FP32 removes.
GATE_HEADROOM = 0.5


def _with_headroom(key: str, limit: float) -> float:
    if key == "top1_min":
        return limit
    return limit * GATE_HEADROOM if key.endswith("_max") else 1.0 - (1.0 - limit) * GATE_HEADROOM


def _swap(path: Path, new: Path) -> str:
    """Remove path (+ its .data) and return new's name; new stays where it is."""
    remove_part(path)
    return new.name


def _gate_cases(part: str, candidate: Path, bundle, data) -> list[dict]:
    """The candidate part in place of the FP32 one on the calibration set, in verify's case format."""
    from ..backends.onnxruntime import OrtRunner
    from ..parity import metrics

    original = bundle.runners[part]
    bundle.runners[part] = OrtRunner(candidate)
    try:
        cases = []
        for c in data:
            if part == "vision":
                got = bundle.image_features(c.pixel_values)
                cases.append({"name": c.name, "vision": {"image_features": {"cosine": metrics.cosine(c.features, got)}}})
            else:
                got = bundle.teacher_forced_logits(c.prompt_ids, c.features, c.continuation)
                cases.append({"name": c.name, "decoder": {"logits": metrics.logit_metrics(c.logits, got)}})
        return cases
    finally:
        bundle.runners[part] = original


class CalibrationCache:
    """One calibration cache file: checked before use, written atomically.

    A cache that does not load (truncated by a killed build, corrupt, from another calibration method) is deleted
    and logged, and the ranges are computed again. A new cache is written by ONNX Runtime to a temporary file
    beside it, which commit() fsyncs and renames into place, so a reader never sees half a cache."""

    def __init__(self, path: Path, method: str, log: Callable[[str], None]):
        self.path, self.method, self.log = Path(path), method, log
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.valid = self._check()

    def _check(self) -> bool:
        if not self.path.exists():
            return False
        from onnxruntime.quantization.calibrate import load_tensors_data

        try:
            data = load_tensors_data(self.path)
            method = getattr(data.calibration_method, "name", str(data.calibration_method)).lower()
            if method != self.method:
                raise ValueError(f"made with calibration method {method}, not {self.method}")
            if not data.data:
                raise ValueError("it holds no ranges")
        except Exception as e:  # whatever a damaged file makes the loader raise
            self.log(f"calibration cache '{self.path}' is unreadable ({type(e).__name__}: {e}); computing the ranges "
                     "again")
            self.path.unlink(missing_ok=True)
            return False
        return True

    def use(self) -> Path:
        """The path to give the quantizer: the cache itself when valid (read only), else the temporary file."""
        return self.path if self.valid else self.tmp

    def commit(self) -> None:
        if self.valid or not self.tmp.exists():
            return
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        self.valid = True

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def _lower_int8(name: str, src: Path, tmp: Path, form: str, opts: Int8Options, thresholds: dict, bundle, data,
                cache: Path, log: Callable[[str], None]) -> tuple[Path, dict]:
    import onnx

    from ..parity.verify import evaluate
    from .int8 import quantize, weight_matmuls
    from .sensitivity import fallback_search, rank

    matmuls = weight_matmuls(onnx.load(str(src), load_external_data=False))
    feeds = _feeds(name, data)
    reader, ranges = None, CalibrationCache(cache, opts.calibration, log)
    if form == "qdq":
        reader = _calibration_reader(name, data)
        log(f"{name}: {'reusing' if ranges.valid else 'computing'} {opts.calibration} calibration ranges ({cache})")
    t = time.perf_counter()
    errors = rank(src, matmuls, feeds, form)
    ranked = sorted(errors, key=errors.get, reverse=True)
    module = {m.node: m.module for m in matmuls}
    dst = tmp / f"{name}.int8.onnx"
    gate_keys = {k: _with_headroom(k, v) for k, v in thresholds.items() if k in ("vision_cosine_min",) or
                 (name == "decoder" and k in ("top1_min", "kl_mean_max", "logit_cosine_min"))}
    last: dict = {}

    def try_keeping(kept: list[str]) -> bool:
        quantize(src, dst, form, [m.node for m in matmuls if m.node not in set(kept)], reader, opts.calibration,
                 ranges.use())
        ranges.commit()
        if reader is not None:
            reader.rewind()
            reader.on_sample = None  # the ranges are measured once; later tries read the cache
        checks, passed = evaluate(_gate_cases(name, dst, bundle, data), gate_keys)
        last.update(checks=checks, passed=passed)
        log(f"{name}: INT8 ({form}) with {len(kept)} of {len(matmuls)} products kept in FP32: calibration-set gate "
            f"{'holds' if passed else 'fails'} (" + ", ".join(f"{c['metric']} {c['value']:.4g} {c['op']} {c['limit']:.4g}"
                                                           for c in checks) + ")")
        tried(1, f"{len(kept)} of {len(matmuls)} kept in FP32: {'holds' if passed else 'fails'}")
        return passed

    with contextlib.ExitStack() as stack:
        if reader is not None and not ranges.valid:
            reader.on_sample = stack.enter_context(track(log, f"calibrate {name}", total=len(reader)))
        tried = stack.enter_context(track(log, f"{name}: INT8 sensitivity search (tries)"))
        try:
            kept, tries = fallback_search(ranked, try_keeping, opts.fallback)
        finally:
            ranges.discard()
    record = {
        "form": form,
        "kind": opts.kind(name),
        "calibration": opts.calibration if form == "qdq" else None,
        "calibration_cases": len(data),
        "products_quantized": len(matmuls) - len(kept),
        "products_total": len(matmuls),
        "kept_fp32": [{"node": n, "module": module[n], "emulated_rel_error": errors[n],
                       "why": "among the largest quantization errors; kept until the calibration gate held"} for n in kept],
        "worst_quantized": [{"module": module[n], "emulated_rel_error": errors[n]} for n in ranked[len(kept):len(kept) + 3]],
        "fallback": {"enabled": opts.fallback, "tries": tries},
        "packed": packed_products(dst),  # products on one input sharing one MatMulNBits (precision/packing.py)
        "calibration_gate": {"passed": last["passed"], "checks": last["checks"]},
        "seconds": time.perf_counter() - t,
    }
    return dst, record


def _lower_int4(name: str, src: Path, tmp: Path, backend: str, opts: Int4Options, thresholds: dict, bundle, data,
                log: Callable[[str], None]) -> tuple[Path, dict]:
    """INT4 weight-only decoder: rank every product by its emulated INT4 error on the calibration inputs, then keep
    the worst at INT8 (or FP32) until the [parity.int4] gate holds on the calibration set against the FP32 part."""
    import onnx

    from ..parity.verify import evaluate
    from .int4 import int4_emulator, lm_head_nodes, quantize_int4
    from .int8 import weight_matmuls
    from .sensitivity import fallback_search, rank

    form = "qdq" if backend == "tensorrt" else "matmulnbits"
    block, keep = opts.block_for(backend), opts.keep_for(backend)
    matmuls = weight_matmuls(onnx.load(str(src), load_external_data=False))
    module = {m.node: m.module for m in matmuls}
    # lm_head at INT8 is an option, not a fallback: never INT4, and ranked by its INT8 error for the FP32 stage.
    fixed = lm_head_nodes(matmuls) if opts.lm_head == "int8" else []
    t = time.perf_counter()
    int8_acts = form == "matmulnbits"
    errors = rank(src, [m for m in matmuls if m.node not in fixed], _feeds(name, data),
                  int4_emulator(block, opts.symmetric, int8_acts))
    if fixed and form == "matmulnbits":
        from .int4 import emulated_error_int8_weight_only

        errors.update(rank(src, [m for m in matmuls if m.node in fixed], _feeds(name, data), emulated_error_int8_weight_only))
    unblockable = []
    if form == "qdq":  # TensorRT takes whole INT4 blocks of 128 or 64 only; other products stay FP32 (FP16 engine)
        from .int4 import tensorrt_block

        model = onnx.load(str(src), load_external_data=False)
        dims = {i.name: list(i.dims) for i in model.graph.initializer}
        unblockable = [m.node for m in matmuls if len(dims.get(m.weight, [])) != 2
                       or tensorrt_block(dims[m.weight][0], block) is None]
    # lm_head first: its error reaches the logits undiluted by a residual stream or a norm, which a relative output
    # error does not rank (measured: an INT4 lm_head alone breaks the KL gate on the tiny fixture).
    head = set(lm_head_nodes(matmuls))
    int4_candidates = sorted((n for n in errors if n not in fixed and n not in unblockable),
                             key=lambda n: (n not in head, -errors[n]))
    ranked = int4_candidates
    reader = _calibration_reader(name, data) if opts.algo == "gptq" else None
    dst = tmp / f"{name}.int4.onnx"
    gate_keys = {k: _with_headroom(k, v) for k, v in thresholds.items() if k in ("top1_min", "kl_mean_max", "logit_cosine_min")}
    last: dict = {}

    def split(kept: list[str]) -> tuple[list[str], list[str]]:
        int4 = [n for n in int4_candidates if n not in set(kept)]
        int8 = [n for n in fixed if n not in set(kept)] + (kept if keep == "int8" else [])
        return int4, int8 if form == "matmulnbits" else []

    def try_keeping(kept: list[str]) -> bool:
        int4, int8 = split(kept)
        quantize_int4(src, dst, form, opts, int4, int8, block, reader)
        checks, passed = evaluate(_gate_cases(name, dst, bundle, data), gate_keys)
        last.update(checks=checks, passed=passed)
        log(f"{name}: INT4 ({form}, {opts.algo}, block {block}) with {len(kept)} of {len(ranked)} products kept at "
            f"{keep.upper()}: calibration-set gate {'holds' if passed else 'fails'} ("
            + ", ".join(f"{c['metric']} {c['value']:.4g} {c['op']} {c['limit']:.4g}" for c in checks) + ")")
        tried(1, f"{len(kept)} of {len(ranked)} kept at {keep.upper()}: {'holds' if passed else 'fails'}")
        return passed

    with track(log, f"{name}: INT4 sensitivity search (tries)") as tried:
        kept, tries = fallback_search(ranked, try_keeping, opts.fallback)
        if not last["passed"] and keep == "int8" and opts.fallback:
            # INT8 weight-only quantizes the activations too: where even every product at INT8 fails (outliers
            # that no scale folded away), the worst are kept in FP32 instead.
            log(f"{name}: every product at INT8 still fails the calibration gate; keeping the worst in FP32 instead")
            keep = "fp32"
            # An INT8 lm_head may now be kept in FP32 too, and is tried first: its error reaches the logits
            # undiluted by a residual stream or a norm, which a relative output error does not rank.
            ranked = [*fixed, *int4_candidates]
            kept, more = fallback_search(ranked, try_keeping, opts.fallback)
            tries += [{**t, "keep": "fp32"} for t in more]
    lm_head_precision = opts.lm_head if form == "matmulnbits" else ("int4" if opts.lm_head == "int4" else "fp32")
    record = {
        "form": form,
        "algo": opts.algo,
        "block_size": block,
        "symmetric": opts.symmetric,
        "accuracy_level": 4 if form == "matmulnbits" else None,
        "awq": opts.awq,
        "lm_head": lm_head_precision,
        "keep_precision": keep,
        "calibration_cases": len(data),
        "products_quantized": len([n for n in int4_candidates if n not in set(kept)]),
        "products_total": len(matmuls),
        "not_blockable": [{"node": n, "module": module[n], "why": "K is not a multiple of TensorRT's INT4 block (128 or "
                           "64); stays FP32 (FP16 in the engine)"} for n in unblockable],
        # The fallback's products by name, with the precision each kept and the error INT4 would have given it.
        "kept": [{"node": n, "module": module[n], "precision": keep, "emulated_rel_error": errors[n],
                  "why": "among the largest INT4 errors; kept until the calibration gate held"} for n in kept],
        "kept_fp32": [{"node": n, "module": module[n], "emulated_rel_error": errors[n]} for n in kept] if keep == "fp32" else [],
        "worst_quantized": [{"module": module[n], "emulated_rel_error": errors[n]} for n in ranked[len(kept):len(kept) + 3]],
        "fallback": {"enabled": opts.fallback, "tries": tries},
        "packed": packed_products(dst),  # products on one input sharing one MatMulNBits (precision/packing.py)
        "calibration_gate": {"passed": last["passed"], "checks": last["checks"]},
        "seconds": time.perf_counter() - t,
    }
    return dst, record


def _calibration_cache(name: str, src: Path, fingerprint: str, method: str) -> Path:
    """Where the activation ranges of this exact FP32 part on this calibration set are kept between builds."""
    from .calibration import cache_root, file_digest

    key = hashlib.sha256((file_digest(src, src.with_name(src.name + ".data")) + fingerprint).encode()).hexdigest()
    path = cache_root() / "calibration" / f"{name}-{key[:24]}-{method}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _same_length(feeds: list[dict]) -> list[dict]:
    """Prefill feeds cut to the shortest prompt: the histogram calibrators (entropy, percentile) stack them."""
    n = min(f["inputs_embeds"].shape[1] for f in feeds)
    cut = {"inputs_embeds": lambda x: x[:, :n], "attention_mask": lambda x: x[:, :n], "position_ids": lambda x: x[:, :n]}
    return [{k: cut.get(k, lambda x: x)(v) for k, v in f.items()} for f in feeds]


def _feeds(name: str, data) -> list[dict]:
    return [(c.vision if name == "vision" else c.prefill) for c in data]


def _calibration_reader(name: str, data):
    from .calibration import FeedReader

    feeds = _feeds(name, data)
    return FeedReader(_same_length(feeds) if name == "decoder" else feeds)


LOWERED = ("int8", "int4")  # precisions whose parts keep their FP32 original until verify has judged them


def lower_parts(tmp: Path, manifest: dict, prof, opts: Int8Options, calib: str | Path | None,
                log: Callable[[str], None], int4: Int4Options | None = None) -> None:
    """Lower every part (and task copy) the target wants below FP32, in place in the bundle being written."""
    import onnx

    from ..bundle import onnx_io
    from ..runtime import Bundle
    from .calibration import calib_cases, calib_fingerprint, run_fp32
    from .fp16 import to_fp16
    from .int8 import quantize, weight_matmuls

    # Parts exported in FP16 already (a model too large for an fp32 copy) need no lowering.
    wanted = {name: p for name, p in prof.precision.items() if p != "fp32" and manifest["parts"][name]["precision"] != p}
    if prof.backend == "tensorrt":  # TensorRT lowers FP32 parts to FP16 itself; INT8/INT4 need Q/DQ graphs from here
        wanted = {name: p for name, p in wanted.items() if p in LOWERED}
    if not wanted:
        return
    int4 = int4 or Int4Options()
    from .int4 import calibration_options, lower_uncalibrated

    # Uncalibrated RTN INT4 (ONNX Runtime) is quantized from the weights alone: no calibration run for it.
    uncalibrated = prof.backend == "onnxruntime" and not calibration_options(int4)
    data, bundle, fingerprint = None, None, calib_fingerprint(calib)
    if "int8" in wanted.values() or ("int4" in wanted.values() and not uncalibrated):
        bundle = Bundle(tmp, manifest=manifest)
        data = run_fp32(bundle, calib_cases(calib), log)
        log(f"calibration set: {len(data)} cases from {calib or 'calib/ (photos that ship with scikit-image)'}")
    task_parts = {(task, part): rel for task, entry in (manifest.get("tasks") or {}).items()
                  for part, rel in (entry.get("parts") or {}).items()}
    for name, precision in wanted.items():
        entry = manifest["parts"][name]
        src = tmp / entry["file"]
        copies = {key: tmp / rel for key, rel in task_parts.items() if key[1] == name}
        lowered = {}
        if precision == "fp16":
            dst = tmp / f"{name}.fp16.onnx"
            record = to_fp16(src, dst)
            for key, task_src in copies.items():
                lowered[key] = task_src.with_name(dst.name)
                to_fp16(task_src, lowered[key])
            log(f"{name}: FP16, {', '.join(record['kept_fp32_op_types'])} kept in FP32")
        elif precision == "int4" and uncalibrated:
            dst, record = lower_uncalibrated(name, src, tmp, int4)
            log(f"{name}: INT4 (matmulnbits, rtn, block {record['block_size']}, uncalibrated) "
                f"{record['products_quantized']} of {record['products_total']} products, lm_head {int4.lm_head.upper()}")
            for key, task_src in copies.items():  # a task's merged copy: the same products
                lowered[key] = lower_uncalibrated(name, task_src, task_src.parent, int4)[0]
                log(f"task {key[0]}: its {name} part lowered the same way")
        elif precision == "int4":
            dst, record = _lower_int4(name, src, tmp, prof.backend, int4, prof.thresholds("int4"), bundle, data, log)
            if record["products_quantized"] == 0:
                remove_part(dst)
                entry["lowering"] = {**record, "result": "left in FP32: no INT4 product set held the calibration gate"}
                log(f"{name}: INT4 does not hold the gate on the calibration set even with one product; left in FP32")
                continue
            from .int4 import quantize_int4
            from .int8 import weight_matmuls as _matmuls

            keep = {k["node"] for k in record["kept"]}
            for key, task_src in copies.items():  # a task's merged copy: the same products at the same precisions
                lowered[key] = task_src.with_name(dst.name)
                every = _matmuls(onnx.load(str(task_src), load_external_data=False))
                head = (set(_lm_head(every)) if int4.lm_head == "int8" else set()) - keep
                nodes4 = [m.node for m in every if m.node not in keep | head]
                at_int8 = keep if record["keep_precision"] == "int8" else set()
                nodes8 = sorted(at_int8 | head) if record["form"] == "matmulnbits" else []
                quantize_int4(task_src, lowered[key], record["form"], int4, nodes4, nodes8, record["block_size"],
                              _calibration_reader(name, data) if int4.algo == "gptq" else None)
                log(f"task {key[0]}: its {name} part lowered the same way ({len(nodes4)} products INT4)")
        else:
            form = opts.form_for(name, prof.backend)
            cache = _calibration_cache(name, src, fingerprint, opts.calibration)
            dst, record = _lower_int8(name, src, tmp, form, opts, prof.thresholds("int8"), bundle, data, cache, log)
            if record["products_quantized"] == 0:
                # INT8 only where it holds the gate: a part whose every product had to stay FP32 ships as FP32.
                remove_part(dst)
                entry["lowering"] = {**record, "result": "left in FP32: no INT8 product set held the calibration gate"}
                log(f"{name}: INT8 does not hold the gate on the calibration set even with one product; left in FP32")
                continue
            kept = {k["node"] for k in record["kept_fp32"]}
            # A task's own merged copy: the same form and the same products kept (its own activation ranges).
            for key, task_src in copies.items():
                lowered[key] = task_src.with_name(dst.name)
                nodes = [m.node for m in weight_matmuls(onnx.load(str(task_src), load_external_data=False))
                         if m.node not in kept]
                ranges = CalibrationCache(_calibration_cache(name, task_src, fingerprint, opts.calibration),
                                          opts.calibration, log)
                try:
                    quantize(task_src, lowered[key], form, nodes,
                             _calibration_reader(name, data) if form == "qdq" else None, opts.calibration, ranges.use())
                    ranges.commit()
                finally:
                    ranges.discard()
                log(f"task {key[0]}: its {name} part lowered the same way ({len(nodes)} products INT8)")
        if precision in LOWERED:
            # Kept until verify has judged the INT8/INT4 part: if it fails the gate, the part ships in FP32 instead.
            entry["fp32_original"] = {"file": src.name, "tasks": {t: copies[(t, part)].relative_to(tmp).as_posix()
                                                                  for (t, part) in lowered}}
            entry.update(file=dst.name, precision=precision, lowering=record, **onnx_io(dst))
        else:
            entry.update(file=_swap(src, dst), precision=precision, lowering=record, **onnx_io(dst))
        for (task, part), new in lowered.items():
            if precision not in LOWERED:
                _swap(copies[(task, part)], new)
            manifest["tasks"][task]["parts"][part] = new.relative_to(tmp).as_posix()


def _lm_head(matmuls) -> list[str]:
    from .int4 import lm_head_nodes

    return lm_head_nodes(matmuls)


def failing_int8_parts(manifest: dict, report: dict) -> list[str]:
    """INT8/INT4 parts that a failed parity check points at. Logits and tokens depend on both parts: the decoder is
    blamed first, the vision part once the decoder is no longer INT8/INT4."""
    int8 = {p for p, e in manifest["parts"].items() if e.get("precision") in LOWERED}
    out = set()
    for c in report["checks"]:
        if c["passed"]:
            continue
        if c["part"] == "vision":
            out |= {"vision"} & int8
        else:
            out |= {"decoder"} & int8 or {"vision"} & int8
    return sorted(out)


def restore_fp32(tmp: Path, manifest: dict, part: str, reason: str) -> None:
    """Ship `part` (and its task copies) in FP32 after all: delete its INT8 files, point the manifest back."""
    from ..bundle import onnx_io

    entry = manifest["parts"][part]
    original = entry.pop("fp32_original")
    for task, rel in original["tasks"].items():
        _swap(tmp / manifest["tasks"][task]["parts"][part], tmp / rel)
        manifest["tasks"][task]["parts"][part] = rel
    _swap(tmp / entry["file"], tmp / original["file"])
    entry.update(file=original["file"], precision="fp32", **onnx_io(tmp / original["file"]))
    entry["lowering"] = {**entry.get("lowering", {}), "result": f"left in FP32: {reason}"}


def drop_fp32_originals(tmp: Path, manifest: dict) -> None:
    """The INT8 parts stand: remove the FP32 copies kept for restore_fp32."""
    for entry in manifest["parts"].values():
        original = entry.pop("fp32_original", None)
        if original:
            for rel in [original["file"], *original["tasks"].values()]:
                remove_part(tmp / rel)

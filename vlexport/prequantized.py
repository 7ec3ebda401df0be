"""Pre-quantized LLaVA checkpoints: AutoAWQ GEMM is imported (dequantized, then re-quantized by the build with the
error reported); GPTQ and the other AWQ packings are refused by name.

An AutoAWQ checkpoint replaces each quantized linear's `weight` with three tensors (WQLinear_GEMM):
  qweight  int32 [in, out / 8]       eight 4-bit weights per int32, in AWQ's interleaved order (0 2 4 6 1 3 5 7)
  qzeros   int32 [in / group, out / 8]  the zero points, packed the same way
  scales   fp16  [in / group, out]
and config.json says so: quantization_config = {quant_method: "awq", version: "gemm", bits: 4, group_size, ...}.
The weight is W[out, in] = ((q - z) * s).T, per group of `group_size` input channels.

The import writes a plain llava-hf directory (FP16 weights, the quantization_config removed) into the cache, and
the build continues from it: a LoRA trained on the quantized base (QLoRA) merges into these dequantized weights,
which is what it was trained against, and the INT4 lowering quantizes the merged weights again. The report gives
how far that second quantization (the target's block, symmetric or not) is from the checkpoint's own INT4 values;
with the checkpoint's own layout (asymmetric, block = group_size) it is exact up to rounding.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import VlexportError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a packed int32 holds column 8c + AWQ_ORDER[i]
SUFFIXES = (".qweight", ".qzeros", ".scales")


def quantization_config(base: Path) -> dict | None:
    config = json.loads((Path(base) / "config.json").read_text())
    q = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    return q or None


def check_prequantized(base: Path) -> dict | None:
    """The checkpoint's quantization_config if it is one vlexport imports (AutoAWQ GEMM, 4-bit); None for a float
    checkpoint; a named error for any other pre-quantized format."""
    q = quantization_config(base)
    if q is None:
        return None
    method = str(q.get("quant_method", "")).lower()
    where = f"--base '{base}' (config.json quantization_config)"
    if method == "gptq":
        raise VlexportError(f"{where} is a GPTQ checkpoint (qweight/qzeros/scales/g_idx): vlexport imports AutoAWQ "
                            "GEMM checkpoints only; use the model's float or AWQ release, or dequantize it first "
                            "(e.g. transformers' GPTQ integration, then save_pretrained)")
    if method != "awq":
        raise VlexportError(f"{where} has quant_method {method!r}: vlexport imports AutoAWQ GEMM (quant_method "
                            "'awq', version 'gemm') only; use the float checkpoint")
    version = str(q.get("version", "gemm")).lower()
    if version != "gemm":
        raise VlexportError(f"{where} is AWQ version {version!r}: only the GEMM packing is imported (GEMV, Marlin, "
                            "ExLlama and IPEX pack differently); export the model with version='gemm'")
    if int(q.get("bits", q.get("w_bit", 4))) != 4:
        raise VlexportError(f"{where}: AWQ bits={q.get('bits')}; only 4-bit AWQ is imported")
    if not q.get("zero_point", True):
        raise VlexportError(f"{where}: AWQ without zero points is not imported (GEMM checkpoints have them)")
    return q


def unpack_awq_gemm(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, group: int) -> np.ndarray:
    """The linear's weight [out, in] in float32 from AutoAWQ's GEMM tensors."""
    inp, packed = qweight.shape
    out = packed * 8
    if scales.shape != (inp // group, out) or qzeros.shape != (inp // group, packed) or inp % group:
        raise VlexportError(f"AWQ tensors do not fit together: qweight {list(qweight.shape)}, qzeros "
                            f"{list(qzeros.shape)}, scales {list(scales.shape)}, group_size {group}")

    def unpack(x: np.ndarray) -> np.ndarray:
        u = x.astype(np.uint32)
        nibbles = np.stack([(u >> (4 * i)) & 0xF for i in range(8)], axis=-1)  # [rows, packed, 8]: nibble i
        cols = np.empty_like(nibbles)
        cols[..., list(AWQ_ORDER)] = nibbles  # nibble i is column AWQ_ORDER[i] of its group of eight
        return cols.reshape(x.shape[0], -1).astype(np.float32)

    q, z = unpack(qweight), unpack(qzeros)
    w = (q - np.repeat(z, group, axis=0)) * np.repeat(scales.astype(np.float32), group, axis=0)  # [in, out]
    return np.ascontiguousarray(w.T)


def _requantization_error(w: np.ndarray, block: int, symmetric: bool) -> float:
    from .precision.int4 import dequantized

    wt = w.T.astype(np.float64)  # [in, out]: blocks run along the input channels, as MatMulNBits'
    d = dequantized(wt, block, symmetric, 4)
    return float(np.linalg.norm(d - wt) / (np.linalg.norm(wt) or 1.0))


def import_awq(base: Path, block: int, symmetric: bool, log: Callable[[str], None]) -> tuple[Path, dict]:
    """A float llava-hf directory for this AutoAWQ GEMM checkpoint (cached), and the import report."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from .files import sha256_file
    from .precision.calibration import cache_root

    base = Path(base)
    q = check_prequantized(base)
    group = int(q.get("group_size", q.get("q_group_size", 128)))
    key = hashlib.sha256(b"awq-import-1" + (base / "config.json").read_bytes()
                         + b"".join(sha256_file(f).encode() for f in sorted(base.glob("*.safetensors")))).hexdigest()[:24]
    out = cache_root() / "prequantized" / key
    errors: dict[str, float] = {}
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for f in base.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
                shutil.copy2(f, tmp / f.name)
        config = json.loads((base / "config.json").read_text())
        config.pop("quantization_config", None)
        (config.get("text_config") or {}).pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        weight_map = {}
        for f in sorted(base.glob("*.safetensors")):
            tensors = {}
            with safe_open(str(f), "np") as fh:
                names = list(fh.keys())
                quantized = sorted({n[: -len(".qweight")] for n in names if n.endswith(".qweight")})
                for prefix in quantized:
                    missing = [s for s in SUFFIXES if prefix + s not in names]
                    if missing:
                        raise VlexportError(f"--base '{f}': AWQ linear '{prefix}' has no {', '.join(missing)} in the "
                                            "same file; the checkpoint is incomplete")
                    w = unpack_awq_gemm(fh.get_tensor(prefix + ".qweight"), fh.get_tensor(prefix + ".qzeros"),
                                        fh.get_tensor(prefix + ".scales"), group)
                    if not np.isfinite(w).all():
                        raise VlexportError(f"--base '{f}': AWQ linear '{prefix}' dequantizes to non-finite values")
                    errors[prefix] = 0.0
                    tensors[prefix + ".weight"] = w.astype(np.float16)
                for n in names:
                    if not any(n.endswith(s) and n[: -len(s)] in quantized for s in SUFFIXES):
                        tensors[n] = fh.get_tensor(n)
            save_file(tensors, str(tmp / f.name), metadata={"format": "pt"})
            weight_map.update({n: f.name for n in tensors})
        if (base / "model.safetensors.index.json").exists():
            (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (tmp / "vlexport-awq-import.json").write_text(json.dumps({"linears": sorted(errors)}))
        if not errors:
            shutil.rmtree(tmp)
            raise VlexportError(f"--base '{base}' says it is AWQ but holds no '*.qweight' tensors")
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
        log(f"AWQ checkpoint: {len(errors)} linears dequantized from GEMM packing (group {group}) into {out}")
    else:
        log(f"AWQ checkpoint: reusing its dequantized copy {out}")
    # The re-quantization error for this build's INT4 layout, from the dequantized copy (not cached: it depends on
    # the block and symmetry the target asks for).
    linears = set(json.loads((out / "vlexport-awq-import.json").read_text())["linears"])
    errors = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "np") as fh:
            for n in fh.keys():
                if n.endswith(".weight") and n[: -len(".weight")] in linears:
                    errors[n[: -len(".weight")]] = _requantization_error(fh.get_tensor(n).astype(np.float32), block,
                                                                         symmetric)
    worst = sorted(errors, key=errors.get, reverse=True)[:3]
    report = {"source": str(base.resolve()), "format": "autoawq-gemm", "bits": 4, "group_size": group,
              "dequantized": str(out), "linears": len(errors),
              "requantization": {"block_size": block, "symmetric": symmetric,
                                 "max_rel_error": max(errors.values()), "mean_rel_error": float(np.mean(list(errors.values()))),
                                 "worst": [{"module": m, "rel_error": errors[m]} for m in worst]}}
    log(f"AWQ checkpoint: re-quantizing to INT4 block {block} {'symmetric' if symmetric else 'with zero points'} "
        f"moves its weights by {report['requantization']['mean_rel_error']:.2g} on average (max "
        f"{report['requantization']['max_rel_error']:.2g}, {worst[0]}) relative to the checkpoint's own INT4")
    return out, report

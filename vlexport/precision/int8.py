"""INT8 graphs from one FP32 part, one form per backend (../shared/notes/onnxruntime-cpu.md, tensorrt.md).

  qdq          static W8A8: QuantizeLinear/DequantizeLinear pairs, symmetric INT8, per-channel weights, activation
               ranges from calibration (minmax | entropy | percentile). TensorRT's explicit quantization; ONNX Runtime
               runs it too (slowly on CPU), which is how its parity is proven here.
  dynamic      W8A8 for ONNX Runtime CPU: per-channel INT8 weights, activations quantized per tensor at run time
               (DynamicQuantizeMatMul / MatMulInteger). Measured the fastest INT8 form on this CPU.
  weight-only  INT8 weights (MatMulNBits, blocks of 32 along K, symmetric), FP32 activations; INT8 arithmetic inside
               the kernel (accuracy_level 4).

Only matrix products with a constant weight are quantized. Attention's activation x activation products and the
bottleneck adapter slots (whose weights are inputs fed per task) stay FP32.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import remove_part

CALIBRATIONS = ("minmax", "entropy", "percentile")
WEIGHT_ONLY_BLOCK = 32


@dataclass(frozen=True)
class WeightMatMul:
    node: str  # ONNX node name
    module: str  # the torch module it came from, e.g. language_model.layers.3.mlp.down_proj
    weight: str  # initializer name


def weight_matmuls(model) -> list[WeightMatMul]:
    """MatMul nodes whose second input is an initializer, with the module the exporter recorded for each."""
    import ast

    # An initializer that is also a graph input is a default value (adapter slots), not a constant weight.
    inits = {i.name for i in model.graph.initializer} - {i.name for i in model.graph.input}
    out = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        module = node.name
        if "pkg.torch.onnx.name_scopes" in meta:
            scopes = [s for s in ast.literal_eval(meta["pkg.torch.onnx.name_scopes"]) if s]
            module = scopes[-2] if len(scopes) >= 2 else (scopes[-1] if scopes else node.name)
        out.append(WeightMatMul(node.name, module, node.input[1]))
    return out


def int8_dot_product_cpu() -> bool:
    """Whether this CPU has an INT8 dot-product instruction (AVX-512 VNNI, AVX-VNNI) or is not x86. Without one,
    ONNX Runtime's u8s8 kernels add pairs of u8 x s8 products in int16, which saturates at full 8-bit range; its
    quantization docs name reduce_range (7-bit weights) for such CPUs, and the dynamic form uses it there."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return True
    return bool({"avx512_vnni", "avx_vnni"} & flags)


def quantize(src: Path, dst: Path, form: str, nodes: list[str], reader=None, calibration: str = "percentile",
             cache: Path | None = None) -> None:
    """Write the INT8 form of src to dst (+ dst.data), quantizing exactly `nodes`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_part(dst)  # each try of the fallback search starts clean
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice (pre-processing, op support) on the root logger
    try:
        _quantize(src, dst, form, nodes, reader, calibration, cache)
    finally:
        root.setLevel(level)
    for path in (dst, dst.with_name(dst.name + ".data")):
        if path.exists():
            os.chmod(path, 0o644)  # the quantizer writes 0600 files; a bundle is read by other users


def _quantize(src: Path, dst: Path, form: str, nodes: list[str], reader, calibration: str, cache: Path | None) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if not nodes:  # nothing left to quantize: the FP32 graph is the answer
        model = onnx.load(str(src))
        onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    elif form == "dynamic":
        quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                         op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=True,
                         reduce_range=not int8_dot_product_cpu())
    elif form == "qdq":
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                  "percentile": CalibrationMethod.Percentile}[calibration]
        quantize_static(src, dst, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                        op_types_to_quantize=["MatMul", "Gemm"], use_external_data_format=True,
                        calibrate_method=method, calibration_cache_path=cache,
                        reduce_range=not int8_dot_product_cpu(),  # (as dynamic: the gate runs these kernels)
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       "CalibPercentile": 99.999, "CalibMovingAverage": False,
                                       # Q/DQ on the products' inputs only: a quantized output (logits, K/V) would
                                       # be clipped to the calibration range and rounded to 256 levels.
                                       "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]})
    elif form == "weight-only":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = onnx.load(str(src))
        every = [m.node for m in weight_matmuls(model)]
        q = MatMulNBitsQuantizer(model, bits=8, block_size=WEIGHT_ONLY_BLOCK, is_symmetric=True, accuracy_level=4,
                                 nodes_to_exclude=[n for n in every if n not in set(nodes)],
                                 op_types_to_quantize=("MatMul",))
        q.process()
        q.model.save_model_to_file(str(dst), use_external_data_format=True)
        from .packing import pack_shared_input_products

        pack_shared_input_products(dst)
    else:
        raise ValueError(form)


def emulated_error(x: np.ndarray, w: np.ndarray, form: str) -> tuple[float, float]:
    """(||Q(x) Q(w) - x w||^2, ||x w||^2) for one matrix product quantized the way `form` does it (for ranking)."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    w = w.astype(np.float64)
    if form == "weight-only":
        k = w.shape[0] - w.shape[0] % WEIGHT_ONLY_BLOCK
        blocks = w[:k].reshape(-1, WEIGHT_ONLY_BLOCK, w.shape[1])
        scale = np.abs(blocks).max(axis=1, keepdims=True) / 127 + 1e-30
        wq = np.concatenate([(np.round(blocks / scale) * scale).reshape(k, -1), w[k:]])
        xq = x
    else:
        scale = np.abs(w).max(axis=0, keepdims=True) / 127 + 1e-30
        wq = np.round(w / scale) * scale
        if form == "dynamic":  # per-tensor asymmetric uint8, as DynamicQuantizeLinear
            lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
            s = (hi - lo) / 255 or 1.0
            zp = np.round(-lo / s)
            xq = (np.clip(np.round(x / s) + zp, 0, 255) - zp) * s
        else:  # symmetric int8 per tensor
            s = np.abs(x).max() / 127 or 1.0
            xq = np.clip(np.round(x / s), -127, 127) * s
    ref = x @ w
    return float(np.square(xq @ wq - ref).sum()), float(np.square(ref).sum())

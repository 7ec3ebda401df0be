"""FP16 parts for ONNX Runtime: weights and arithmetic in FP16, the sensitive reductions kept in FP32.

onnxruntime.transformers.float16 does the conversion. Graph inputs and outputs stay FP32 (keep_io_types), so the
runtime, ORT-GenAI and the parity harness feed the same tensors at every precision. Which operations stay FP32 was
chosen by measurement on the small fixture (README, "Precision"): the statistics of the norms (Pow, ReduceMean, Sqrt,
Reciprocal, LayerNormalization) and Softmax.
"""

from __future__ import annotations

from pathlib import Path

from ..files import remove_part

KEEP_FP32 = ("Pow", "ReduceMean", "Sqrt", "Reciprocal", "LayerNormalization", "Softmax",
             # The ORT-native decoder's fused norms and attention (export/ort_native.py): the same reductions, and the
             # KV cache stays the FP32 buffer that past and present share, so it is still appended in place.
             "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "GroupQueryAttention")


def to_fp16(src: Path, dst: Path, keep_fp32: tuple = KEEP_FP32) -> dict:
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src))
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *keep_fp32])
    from ..export.ort_native import drop_fp32_output_casts

    drop_fp32_output_casts(model)  # the native form's KV outputs stay GroupQueryAttention's own (one shared buffer)
    remove_part(dst)
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")
    return {"kept_fp32_op_types": list(keep_fp32)}

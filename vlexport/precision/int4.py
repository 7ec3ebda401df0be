"""INT4 weight-only language parts, one form per backend (../shared/notes/onnxruntime-cpu.md, tensorrt.md).

  matmulnbits  ONNX Runtime: MatMulNBits 4-bit (com.microsoft), blocks of 32/64/128 along the input channels,
               symmetric or with zero points, INT8 arithmetic inside the kernel (accuracy level 4). Written by
               onnxruntime.quantization's MatMulNBitsQuantizer with RTN (its default quantizer), HQQ, or GPTQ on the
               calibration set (the quantizer's bundled neural-compressor GPTQ).
  qdq          TensorRT 10: each weight becomes an INT4 initializer behind a blocked DequantizeLinear (opset 21,
               block 128 along K, or 64 where K is not a multiple of 128; symmetric, positive scales max|w|/7, no
               zero point), which TensorRT's explicit-quantization path reads (trtexec --int4). Not the quantizer's
               own QDQ format: it maps each block's signed extreme to -8, which gives the negative scales TensorRT
               refuses. Packing is onnx's (numpy_helper with ml_dtypes.int4).

Products the sensitivity fallback keeps (precision/sensitivity.py) are written at INT8 weight-only (MatMulNBits
8-bit) on ONNX Runtime, or left FP32 (TensorRT builds them in FP16). `lm_head` is INT4 or INT8 (an option). The
embedding table is never quantized: it is the embed part, a lookup, which vlexport ships in FP32/FP16.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import VlexportError
from ..files import remove_part

ALGOS = ("rtn", "hqq", "gptq")
BLOCK_SIZES = (32, 64, 128)
TENSORRT_BLOCK = 128  # TensorRT supports INT4 blocks of 64 and 128; Edge-LLM and ModelOpt use 128
KEEP_PRECISIONS = ("int8", "fp32")
LM_HEAD_PRECISIONS = ("int4", "int8")
ACCURACY_LEVEL = 4  # INT8 activations inside MatMulNBits' kernel; level 0 (FP32 arithmetic) measured 16x slower at INT8
INT4_DEFAULTS = {"block_size": 32, "algo": "rtn", "symmetric": True, "lm_head": "int8", "keep": "int8",
                 "fallback": True, "awq": True}


@dataclass(frozen=True)
class Int4Options:
    block_size: int = 32  # elements along K that share one scale
    algo: str = "rtn"  # rtn | hqq | gptq (gptq runs on the calibration set)
    symmetric: bool = True  # False: a zero point per block (hqq always has one)
    lm_head: str = "int8"  # int4 | int8
    keep: str = "int8"  # precision of the products the fallback keeps: int8 | fp32
    fallback: bool = True
    awq: bool = True  # activation-aware scales from the calibration set, folded into the norms before export

    def block_for(self, backend: str) -> int:
        return TENSORRT_BLOCK if backend == "tensorrt" else self.block_size

    def keep_for(self, backend: str) -> str:
        return "fp32" if backend == "tensorrt" else self.keep  # TensorRT: a kept product builds in FP16


def int4_options(profile_section: dict, overrides: str | None = None) -> Int4Options:
    """The target's [int4] section with `--int4 key=value,...` applied, validated."""
    from . import apply_overrides, option_bool  # the package imports this module first

    values = apply_overrides("int4", INT4_DEFAULTS, profile_section, overrides, "block_size=64,algo=hqq")
    try:
        block = int(values["block_size"])
    except (TypeError, ValueError):
        block = -1
    if block not in BLOCK_SIZES:
        raise VlexportError(f"int4 option block_size={values['block_size']!r}: use one of "
                            f"{', '.join(map(str, BLOCK_SIZES))}")
    for key, allowed in (("algo", ALGOS), ("lm_head", LM_HEAD_PRECISIONS), ("keep", KEEP_PRECISIONS)):
        if values[key] not in allowed:
            raise VlexportError(f"int4 option {key}={values[key]!r}: use one of {', '.join(allowed)}")
    symmetric = option_bool("int4", "symmetric", values["symmetric"])
    if values["algo"] == "hqq" and symmetric:
        symmetric = False  # HQQ optimises a scale and a zero point per block; it has no symmetric form
    return Int4Options(block, values["algo"], symmetric, values["lm_head"], values["keep"],
                       option_bool("int4", "fallback", values["fallback"]), option_bool("int4", "awq", values["awq"]))


def check_int4_buildable(target, opts: Int4Options) -> None:
    """INT4 is for the language part, and TensorRT reads only its symmetric RTN Q/DQ form."""
    for part in ("vision", "embed"):
        if target.precision.get(part) == "int4":
            why = ("the embedding part is a table lookup; vlexport keeps it unquantized" if part == "embed" else
                   "INT4 weight-only is built for the language part; the vision part stays FP16/INT8")
            raise VlexportError(f"target '{target.name}' asks for {part}=int4: {why}; use {part}=fp16 or fp32"
                                + (" (or int8 for vision)" if part == "vision" else ""))
    if target.precision.get("decoder") != "int4" or target.backend != "tensorrt":
        return
    if opts.algo != "rtn":
        raise VlexportError(f"target '{target.name}': --int4 algo={opts.algo} writes MatMulNBits, an ONNX Runtime op "
                            "TensorRT cannot import; TensorRT INT4 parts use algo=rtn (blocked DequantizeLinear)")
    if not opts.symmetric:
        raise VlexportError(f"target '{target.name}': TensorRT INT4 is symmetric only (zero point 0); drop "
                            "--int4 symmetric=false")


def calibration_options(opts: Int4Options) -> list[str]:
    """The INT4 options that need the calibration run (an ONNX Runtime session of the unquantized part, and AWQ's
    activations in PyTorch). Empty for uncalibrated RTN, which is quantized from the weights alone."""
    return ([f"algo={opts.algo}"] if opts.algo != "rtn" else []) + [f"{k}=true" for k in ("awq", "fallback")
                                                                    if getattr(opts, k)]


def quantize_int4(src: Path, dst: Path, form: str, opts: Int4Options, int4_nodes: list[str], int8_nodes: list[str],
                  block: int, reader=None, lazy: bool = False) -> None:
    """Write src with `int4_nodes` at INT4 and `int8_nodes` at INT8 weight-only to dst (+ dst.data).

    lazy (RTN, MatMulNBits): src's weights are read from its external data one at a time as each is quantized,
    so that a 7B decoder is never held whole; the result is the same as the eager path's."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_part(dst)  # each try of the fallback search starts clean
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer logs advice and opset warnings on the root logger
    # ... and, once something has configured it, a line per node on its own module logger
    nbits = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    nbits_level = nbits.level
    nbits.setLevel(logging.ERROR)
    try:
        if lazy:
            if form != "matmulnbits" or opts.algo != "rtn":
                raise ValueError(f"lazy INT4 quantization is RTN MatMulNBits only, not {opts.algo} {form}")
            _quantize_lazily(src, dst, opts, int4_nodes, int8_nodes, block)
        else:
            _quantize(src, dst, form, opts, int4_nodes, int8_nodes, block, reader)
    finally:
        root.setLevel(level)
        nbits.setLevel(nbits_level)
    if form == "matmulnbits":
        from .packing import pack_shared_input_products

        pack_shared_input_products(dst)  # q/k/v and gate/up as one node each, bit for bit the same outputs
    for path in (dst, dst.with_name(dst.name + ".data")):
        if path.exists():
            os.chmod(path, 0o644)


def _every_weight_matmul(model) -> list[str]:
    from .int8 import weight_matmuls

    return [m.node for m in weight_matmuls(model)]


def _quantize(src: Path, dst: Path, form: str, opts: Int4Options, int4_nodes: list[str], int8_nodes: list[str],
              block: int, reader) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    model = onnx.load(str(src))
    every = _every_weight_matmul(model)
    if int4_nodes and form == "qdq":
        _blocked_dequantize(model, int4_nodes, block)
    elif int4_nodes:
        if opts.algo == "gptq":
            model = _gptq(model, src, every, int4_nodes, opts, block, reader)
        else:
            fmt = QuantFormat.QDQ if form == "qdq" else QuantFormat.QOperator
            if opts.algo == "hqq":
                config = HQQWeightOnlyQuantConfig(block_size=block, bits=4, op_types_to_quantize=("MatMul",))
            else:
                config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=opts.symmetric,
                                                      accuracy_level=ACCURACY_LEVEL if fmt == QuantFormat.QOperator else None,
                                                      quant_format=fmt, op_types_to_quantize=("MatMul",), bits=4)
            q = MatMulNBitsQuantizer(model, bits=4, block_size=block, is_symmetric=opts.symmetric,
                                     accuracy_level=ACCURACY_LEVEL, quant_format=fmt,
                                     nodes_to_exclude=[n for n in every if n not in set(int4_nodes)],
                                     op_types_to_quantize=("MatMul",), algo_config=config)
            q.process()
            model = q.model.model
    if int8_nodes:
        from .int8 import WEIGHT_ONLY_BLOCK

        remaining = _every_weight_matmul(model)  # the INT4 products are MatMulNBits/DQ now, not MatMul
        q = MatMulNBitsQuantizer(model, bits=8, block_size=WEIGHT_ONLY_BLOCK, is_symmetric=True,
                                 accuracy_level=ACCURACY_LEVEL,
                                 nodes_to_exclude=[n for n in remaining if n not in set(int8_nodes)],
                                 op_types_to_quantize=("MatMul",))
        q.process()
        model = q.model.model
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")


def lower_uncalibrated(name: str, src: Path, tmp: Path, opts: Int4Options) -> tuple[Path, dict]:
    """INT4 weight-only with RTN and no calibration run (awq=false, fallback=false): every weight product at INT4,
    lm_head at INT4 or INT8 weight-only (the option), quantized lazily from src's weights. No gate is measured here:
    verify judges the part. The products are those the calibrated path writes with the same options."""
    import time

    import onnx

    from .int8 import weight_matmuls
    from .packing import packed_products

    t = time.perf_counter()
    matmuls = weight_matmuls(onnx.load(str(src), load_external_data=False))
    fixed = set(lm_head_nodes(matmuls)) if opts.lm_head == "int8" else set()
    int4 = [m.node for m in matmuls if m.node not in fixed]
    int8 = [m.node for m in matmuls if m.node in fixed]
    dst = tmp / f"{name}.int4.onnx"
    quantize_int4(src, dst, "matmulnbits", opts, int4, int8, opts.block_size, lazy=True)
    return dst, {
        "form": "matmulnbits", "algo": opts.algo, "block_size": opts.block_size, "symmetric": opts.symmetric,
        "accuracy_level": ACCURACY_LEVEL, "awq": False, "lm_head": opts.lm_head, "keep_precision": opts.keep,
        "calibration_cases": 0, "products_quantized": len(int4), "products_total": len(matmuls),
        "not_blockable": [], "kept": [], "kept_fp32": [], "worst_quantized": [],
        "fallback": {"enabled": False, "tries": []},
        "packed": packed_products(dst),
        "calibration_gate": None,  # not measured: uncalibrated RTN has no calibration set (verify is the gate)
        "seconds": time.perf_counter() - t,
    }


class _LazyWeights:
    """A MatMulNBitsQuantizer node quantizer whose weight is read from external data just before it is quantized.

    The weight is loaded into a scratch graph of its own, which the quantizer sees last in its graph stack (so it
    finds the weight there and adds the quantized tensors there); those are then copied into the model's graph and
    the scratch graph is dropped with the weight. Loading the weight into the model's own proto would not free it:
    protobuf keeps a message's bytes in the model's arena until the whole model is gone (measured on the 7B: the
    quantize step grew from 2 to 15 GB)."""

    def __init__(self, inner, base_dir: str, to_fp32: bool = False):
        self.inner, self.base_dir, self.to_fp32 = inner, base_dir, to_fp32

    def quantize(self, node, graph_stack):
        import onnx
        from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data
        from onnxruntime.quantization.matmul_nbits_quantizer import get_initializer

        tensor, graph = get_initializer(node.input[1], graph_stack) if len(node.input) > 1 else (None, None)
        if tensor is None or not uses_external_data(tensor):
            return self.inner.quantize(node, graph_stack)
        scratch = onnx.GraphProto()
        weight = scratch.initializer.add()
        weight.CopyFrom(tensor)
        # Relative to src's folder: onnx refuses absolute external-data locations when it loads a tensor.
        load_external_data_for_tensor(weight, self.base_dir)
        weight.data_location = onnx.TensorProto.DEFAULT
        del weight.external_data[:]
        if self.to_fp32 and weight.data_type == onnx.TensorProto.FLOAT16:
            # The quantizer writes scales in the weight's type, and MatMulNBits takes them in its input's (fp32).
            from onnx import numpy_helper

            weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight).astype(np.float32), weight.name))
        graph_stack.append(scratch)
        try:
            nodes = self.inner.quantize(node, graph_stack)
        finally:
            graph_stack.pop()
        graph.initializer.extend(scratch.initializer[1:])  # the quantized weight, scales, zero points
        return nodes


def _quantize_lazily(src: Path, dst: Path, opts: Int4Options, int4_nodes: list[str], int8_nodes: list[str],
                     block: int) -> None:
    """_quantize's RTN MatMulNBits path (the same quantizer, configs and order: INT4 first, then INT8 weight-only),
    with src's graph loaded without its weights and each weight read when its product is quantized."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from .int8 import WEIGHT_ONLY_BLOCK

    from ..export.ort_native import FP16_PRODUCTS

    model = onnx.load(str(src), load_external_data=False)
    base_dir = str(src.parent)
    # A native graph built from fp16 weights computes in fp32: its products are quantized from fp32.
    to_fp32 = any(p.key == FP16_PRODUCTS for p in model.metadata_props)
    passes = ((4, block, opts.symmetric, int4_nodes), (8, WEIGHT_ONLY_BLOCK, True, int8_nodes))
    for bits, size, symmetric, nodes in passes:
        if not nodes:
            continue
        config = DefaultWeightOnlyQuantConfig(block_size=size, is_symmetric=symmetric, accuracy_level=ACCURACY_LEVEL,
                                              quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",),
                                              bits=bits)
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=size, is_symmetric=symmetric,
                                 accuracy_level=ACCURACY_LEVEL, quant_format=QuantFormat.QOperator,
                                 nodes_to_exclude=[n for n in _every_weight_matmul(model) if n not in set(nodes)],
                                 op_types_to_quantize=("MatMul",), algo_config=config)
        q.node_quantizer = _LazyWeights(q.node_quantizer, base_dir, to_fp32)
        q.process()
        model = q.model.model
    # What stays unquantized (norms, products left out, slot defaults) is read now, to be written into dst's data.
    for tensor in _every_tensor(model.graph):
        if uses_external_data(tensor):
            load_external_data_for_tensor(tensor, base_dir)
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    left = [t.name for t in model.graph.initializer if to_fp32 and t.data_type == onnx.TensorProto.FLOAT16]
    if left:
        raise ValueError(f"{src.name}: {len(left)} fp16 product weight(s) were not quantized ({', '.join(left[:3])}); "
                         "a native graph built from fp16 weights needs every product at INT4 or INT8")
    for i, p in enumerate(model.metadata_props):
        if p.key == FP16_PRODUCTS:
            del model.metadata_props[i]  # quantized: the graph runs now
            break
    onnx.save(model, str(dst), save_as_external_data=True, location=dst.name + ".data")


def _every_tensor(graph):
    """Initializers and Constant-node tensors of a graph and its subgraphs."""
    from onnx import AttributeProto

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == AttributeProto.GRAPH:
                yield from _every_tensor(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _every_tensor(g)


def tensorrt_block(k: int, block: int = TENSORRT_BLOCK) -> int | None:
    """The INT4 block TensorRT can take for a weight with k input channels: 128, else 64, else none (kept FP16)."""
    return next((b for b in (block, 64) if k % b == 0), None)


def _blocked_dequantize(model, nodes: list[str], block: int) -> None:
    """MatMul(x, W) -> MatMul(x, DequantizeLinear(Q, S, axis=0, block_size=b)) for each node, in place: Q INT4
    [K, N], S [K/b, N] = max|W_block| / 7 (positive; TensorRT's INT4 is symmetric, zero point 0)."""
    import ml_dtypes
    from onnx import helper, numpy_helper

    wanted = set(nodes)
    inits = {i.name: i for i in model.graph.initializer}
    new_nodes, drop = [], set()
    for node in model.graph.node:
        if node.name not in wanted or node.op_type != "MatMul":
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        b = tensorrt_block(w.shape[0], block) if w.ndim == 2 else None
        if b is None:  # TensorRT needs whole blocks of 64 or 128: this product stays FP32 (FP16 in the engine)
            new_nodes.append(node)
            continue
        k, n = w.shape
        scale = np.abs(w.reshape(k // b, b, n)).max(axis=1) / 7.0
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        q = np.clip(np.round(w / np.repeat(scale, b, axis=0)), -8, 7).astype(np.int8).astype(ml_dtypes.int4)
        qname, sname = f"{node.input[1]}_int4", f"{node.input[1]}_int4_scale"
        model.graph.initializer.extend([numpy_helper.from_array(q, qname), numpy_helper.from_array(scale, sname)])
        drop.add(node.input[1])
        new_nodes.append(helper.make_node("DequantizeLinear", [qname, sname], [f"{qname}_dq"], name=f"{node.name}_DQ_Q4",
                                          axis=0, block_size=b))
        new_nodes.append(helper.make_node("MatMul", [node.input[0], f"{qname}_dq"], list(node.output), name=node.name))
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if not (i.name in drop and i.name not in used)]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and imp.version < 21:
            imp.version = 21  # INT4 and block_size on DequantizeLinear exist from opset 21 (IR 10)
    model.ir_version = max(model.ir_version, 10)


def _gptq(model, src: Path, every: list[str], int4_nodes: list[str], opts: Int4Options, block: int, reader):
    """GPTQ through the quantizer's own implementation, with every product not asked for at INT4 left alone (the
    quantizer's nodes_to_exclude only reaches its RTN path, so the per-node config is given here)."""
    from onnxruntime.quantization.neural_compressor import gptq_quantize

    if reader is None:
        raise VlexportError("--int4 algo=gptq needs the calibration set (it is run through the FP32 part)")
    wanted = set(int4_nodes)
    scheme = "sym" if opts.symmetric else "asym"
    config = {n: ({"bits": 4, "group_size": block, "scheme": scheme} if n in wanted else "fp32") for n in every}
    reader.rewind()

    def batches():
        for feed in iter(reader.get_next, None):
            yield feed, None

    # The quantizer's GPTQ runs the model it is given from bytes: give it the loaded model, weights inline.
    out = gptq_quantize(model=model, weight_config=config, dataloader=batches(), n_samples=-1, percdamp=0.01,
                        blocksize=128, actorder=False, mse=False, perchannel=True, accuracy_level=ACCURACY_LEVEL)
    return out.model if hasattr(out, "model") else out


def int4_emulator(block: int, symmetric: bool, int8_activations: bool = True):
    """emulated_error_int4 as rank() calls it, (x, w) -> errors, with each weight quantized once, not per feed."""
    cache: dict[int, np.ndarray] = {}

    def emulate(x: np.ndarray, w: np.ndarray) -> tuple[float, float]:
        if id(w) not in cache:
            cache[id(w)] = _dequantized_for(w.astype(np.float64), block, symmetric, int8_activations)
        return emulated_error_int4(x, w, block, symmetric, int8_activations, wq=cache[id(w)])

    return emulate


def _dequantized_for(w: np.ndarray, block: int, symmetric: bool, int8_activations: bool) -> np.ndarray:
    if int8_activations:
        return dequantized(w, block, symmetric, 4)
    b = tensorrt_block(w.shape[0], block)
    return w if b is None else dequantized(w, b, True, 4, signed_max=False)  # TensorRT: unblockable stays FP


def emulated_error_int4(x: np.ndarray, w: np.ndarray, block: int, symmetric: bool,
                        int8_activations: bool = True, wq: np.ndarray | None = None) -> tuple[float, float]:
    """(||Q8(x) Q4(w) - x w||^2, ||x w||^2) for one product as MatMulNBits computes it at accuracy level 4: w [K, N]
    in INT4 blocks along K (round to nearest: symmetric maps the block's signed absolute maximum to -8, asymmetric
    spreads min..max over 15 steps with a zero point), and x quantized to INT8 per row in blocks of the same length,
    which is what makes activation outliers costly. int8_activations=False is TensorRT's form: FP activations,
    scales max|w|/7 in blocks of 128 (or 64). For ranking only: HQQ and GPTQ round better."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    w = w.astype(np.float64)
    ref = x @ w
    wq = _dequantized_for(w, block, symmetric, int8_activations) if wq is None else wq
    got = (quantized_activations(x, block) if int8_activations else x) @ wq
    return float(np.square(got - ref).sum()), float(np.square(ref).sum())


def emulated_error_int8_weight_only(x: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """The same for an INT8 weight-only product (MatMulNBits 8-bit, block 32, symmetric, INT8 activations)."""
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    w = w.astype(np.float64)
    ref = x @ w
    got = quantized_activations(x, 32) @ dequantized(w, 32, True, 8)
    return float(np.square(got - ref).sum()), float(np.square(ref).sum())


def quantized_activations(x: np.ndarray, block: int) -> np.ndarray:
    """x [M, K] through symmetric INT8 per row and block of K (MatMulNBits' CompInt8 path) and back."""
    return dequantized(x.T, block, True, 8, signed_max=False).T


def dequantized(w: np.ndarray, block: int, symmetric: bool, bits: int, signed_max: bool = True) -> np.ndarray:
    """w [K, N] through blockwise round-to-nearest along K and back (the last block may be short).

    signed_max: ONNX Runtime's weight quantizer maps the block's signed extreme to -2^(bits-1) (using the whole
    range); activations are scaled by max|x| / (2^(bits-1) - 1)."""
    k, n = w.shape
    pad = (-k) % block
    wp = np.concatenate([w, np.zeros((pad, n), w.dtype)]) if pad else w
    blocks = wp.reshape(-1, block, n)
    top = 2 ** (bits - 1)
    if symmetric:
        hi, lo = blocks.max(axis=1, keepdims=True), blocks.min(axis=1, keepdims=True)
        if signed_max:
            scale = np.where(np.abs(hi) > np.abs(lo), hi, lo) / -float(top)
        else:
            scale = np.maximum(np.abs(hi), np.abs(lo)) / float(top - 1)
        safe = np.where(scale == 0, 1.0, scale)
        q = np.where(scale == 0, 0, np.clip(np.round(blocks / safe), -top, top - 1))
        out = q * scale
    else:
        steps = float(2 ** bits - 1)
        lo = np.minimum(blocks.min(axis=1, keepdims=True), 0)
        hi = np.maximum(blocks.max(axis=1, keepdims=True), 0)
        scale = (hi - lo) / steps
        safe = np.where(scale == 0, 1.0, scale)
        zp = np.where(scale == 0, top, np.clip(np.round(-lo / safe), 0, steps))
        q = np.clip(np.round(blocks / safe + zp), 0, steps)
        out = (q - zp) * scale
    return out.reshape(-1, n)[:k]


def dequantized_int4(w: np.ndarray, block: int, symmetric: bool) -> np.ndarray:
    return dequantized(w, block, symmetric, 4)


def lm_head_nodes(matmuls) -> list[str]:
    import re

    # The exporter names the module "lm_head" (or "lm_head/MatMul" in a fused graph); never a layer's product.
    return [m.node for m in matmuls if re.search(r"(^|[./])lm_head($|[./])", m.module)]

"""Check exported ONNX graphs against TensorRT's ONNX import rules, without TensorRT.

The rules are those of onnx-tensorrt for a given TensorRT version (see shared/notes/tensorrt.md, "ONNX import
rules"): opset range, supported ops and element types, inputs that must be constants, a few per-op attribute limits,
Q/DQ constraints and optimization-profile coverage of the graph inputs. Graphs are read with
load_external_data=False: only the graph is parsed, never the weights (a few tiny Q/DQ scale and zero-point tensors
are the only values ever read).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, numpy_helper

from ..errors import VlexportError


@dataclass(frozen=True)
class RuleViolation:
    part: str  # "vision" | "embed" | "decoder"
    rule: str  # short id, e.g. "unsupported-op", "opset", "profile-coverage"
    node: str | None  # node name (or tensor/input name) it concerns
    message: str  # one line a user can act on

    def __str__(self) -> str:
        return f"{self.part}: [{self.rule}] {self.message}"


SUPPORTED_VERSIONS: tuple[str, ...] = ("8.6", "10.3")

# Opset range of the default ONNX domain that the parser documents.
# 8.6's lower bound is taken as 9 like 10.x (the note only gives its upper bound, 17).
OPSETS = {"8.6": (9, 17), "10.3": (9, 20)}
# TensorRT 10.0 added INT4 quantization (onnx-tensorrt changelog, 10.0 EA). ONNX can express a blocked INT4
# DequantizeLinear only from opset 21 (INT4 and the block_size attribute are new there), so a 10.x graph that holds
# INT4 weights declares opset 21; any other graph keeps the documented range.
INT4_OPSET = {"10.3": 21}
# TensorRT's INT4 scheme (developer guide, "Quantization Schemes"): weight-only, symmetric, per-block scales with
# blocks of 64 or 128 along one of the last two dimensions of the weight.
INT4_BLOCK_SIZES = (64, 128)

# TensorRT 10.3 ONNX parser op list (10.1 table; 10.2/10.3 add no ops).
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor GRU Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization HardSigmoid
HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LRN LSTM LayerNormalization LeakyRelu
Less LessOrEqual Log LogSoftmax Loop LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min
Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or PRelu Pad ParametricSoftplus Pow QuantizeLinear RNN
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
# 8.6 imports the same list minus these (onnx-tensorrt release/8.6-GA docs/operators.md: absent or marked N).
# DeformConv (opset 19), Gelu (20) and Mish (18) are also beyond 8.6's opset range; CastLike (15) and Hardmax are not.
NOT_IN_8_6 = frozenset({"CastLike", "DeformConv", "Gelu", "Hardmax", "Mish"})
OPS = {"8.6": SUPPORTED_OPS - NOT_IN_8_6, "10.3": SUPPORTED_OPS}

# Ops that users hit most often, with the fix to suggest.
_INTEGER_QUANT_OPS = {"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeLinear"}


def _unsupported_hint(op: str) -> str:
    if op in _INTEGER_QUANT_OPS:
        return "ONNX Runtime integer-op quantization does not import; quantize with QuantizeLinear/DequantizeLinear"
    if op.startswith(("Sequence", "Optional", "SplitToSequence", "ConcatFromSequence")):
        return "TensorRT has no sequence/optional tensors; export without them"
    return "rewrite or export without it"


T = TensorProto
_TYPES_10 = {T.FLOAT, T.FLOAT16, T.BFLOAT16, T.INT8, T.INT32, T.INT64, T.BOOL, T.FLOAT8E4M3FN, T.INT4,
             T.DOUBLE}  # DOUBLE is converted to FLOAT by the parser: not a failure
# 8.6 has no BF16/FP8/INT4 (its operators.md lists DOUBLE, FLOAT32, FLOAT16, INT8, BOOL, limited INT32/INT64; the
# BF16/INT4 builder flags are 10.x-only). INT64 is cast down to INT32 by the 8.6 parser: not a failure.
_TYPES_8 = _TYPES_10 - {T.BFLOAT16, T.INT4, T.FLOAT8E4M3FN}
SUPPORTED_TYPES = {"8.6": frozenset(_TYPES_8), "10.3": frozenset(_TYPES_10)}
QDQ_TYPES = {"8.6": frozenset({T.INT8}), "10.3": frozenset({T.INT8, T.FLOAT8E4M3FN, T.INT4})}
IO_ONLY_TYPES = frozenset({T.UINT8})  # allowed only as a network input or output

TOPK_MAX_K = 3840  # K must be below this
# Inputs the parser needs as weights (initializer or Constant output; an Identity or Cast of one is already a
# tensor). Reduce* axes are handled by prefix. Slice axes and Dropout training_mode are not in the team note but are
# required by onnx-tensorrt's importers and docs/operators.md (8.6 and 10.1).
_CONST_ONLY_INPUTS = {"Squeeze": (1, "axes"), "Unsqueeze": (1, "axes"), "CumSum": (1, "axis"),
                      "Pad": (3, "axes"), "OneHot": (1, "depth"), "Slice": (3, "axes"),
                      "Dropout": (2, "training_mode")}


def normalize_version(trt_version: str) -> str:
    """'10.3', '10.3.0' or '10.3.0.30' -> '10.3'; anything else is a user error."""
    short = ".".join(str(trt_version).strip().split(".")[:2])
    if short not in SUPPORTED_VERSIONS:
        raise VlexportError(
            f"TensorRT version '{trt_version}' has no ONNX import rules in vlexport; supported versions: "
            f"{', '.join(SUPPORTED_VERSIONS)}"
        )
    return short


def _type_name(elem_type: int) -> str:
    return TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() else str(elem_type)


def _node_id(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def _all_graphs(graph: onnx.GraphProto):
    """The graph and every subgraph (If/Loop/Scan bodies), outermost first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_graphs(g)


class _Graph:
    """What the rules need to know about a model: all nodes (subgraphs included) and its constant tensors."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path):
        self.model, self.base_dir = model, base_dir
        # Local functions the inliner left (it skips a function whose opset differs from the model's) are checked
        # in place: their bodies join the node list and a call to one is not an op of its own.
        self.local_functions = {(f.domain, f.name) for f in model.functions}
        bodies = [onnx.helper.make_graph(f.node, f.name, [], []) for f in model.functions]
        self.graphs = graphs = [sub for root in [model.graph, *bodies] for sub in _all_graphs(root)]
        self.nodes = [n for g in graphs for n in g.node]
        # Constant tensors: initializers and Constant-node outputs (any scope; ONNX names are unique across scopes).
        self.consts: dict[str, onnx.TensorProto | None] = {}
        for g in graphs:
            for init in g.initializer:
                self.consts[init.name] = init
            for node in g.node:
                if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                    self.consts[node.output[0]] = _constant_tensor(node)
        self.producer = {out: n for n in self.nodes for out in n.output if out}
        self.consumed = {name for n in self.nodes for name in n.input if name}
        self.graph_outputs = {o.name for g in graphs for o in g.output}
        # Network I/O: graph inputs (not initializers listed as inputs, as older IR versions do) and outputs.
        initializers = {i.name for i in model.graph.initializer}
        self.io_names = {v.name for v in model.graph.input if v.name not in initializers}
        self.io_names |= {v.name for v in model.graph.output}
        self.value_info = {v.name: v for g in graphs for v in list(g.input) + list(g.output) + list(g.value_info)}

    def is_const(self, name: str) -> bool:
        return name in self.consts

    def const_value(self, name: str) -> np.ndarray | None:
        """Value of a small constant tensor (reads external data for that tensor only); None if unknown."""
        tensor = self.consts.get(name)
        if tensor is None:
            return None
        try:
            return numpy_helper.to_array(tensor, base_dir=str(self.base_dir))
        except Exception:  # external data file absent or an exotic type: the value is simply unknown
            return None

    def dims(self, name: str) -> list[int | str | None] | None:
        """Known dims of a tensor (int fixed, str symbolic, None unknown), or None when its rank is unknown."""
        tensor = self.consts.get(name)
        if tensor is not None:
            return list(tensor.dims)
        vi = self.value_info.get(name)
        return _dims(vi) if vi is not None else None

    def rank(self, name: str) -> int | None:
        dims = self.dims(name)
        return None if dims is None else len(dims)


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            return onnx.helper.make_tensor(node.output[0], *_attr_tensor_args(attr))
    return None  # sparse_value / strings: constant, value not needed


def _attr_tensor_args(attr: onnx.AttributeProto):
    if attr.name == "value_float":
        return TensorProto.FLOAT, [], [attr.f]
    if attr.name == "value_floats":
        return TensorProto.FLOAT, [len(attr.floats)], list(attr.floats)
    if attr.name == "value_int":
        return TensorProto.INT64, [], [attr.i]
    return TensorProto.INT64, [len(attr.ints)], list(attr.ints)


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _input(node: onnx.NodeProto, i: int) -> str:
    """Name of input i, or '' when absent (optional inputs may be omitted or given as '')."""
    return node.input[i] if len(node.input) > i else ""


# ---------------------------------------------------------------------------------------------------------- rules


def _has_int4_weights(model: onnx.ModelProto) -> bool:
    return any(i.data_type == TensorProto.INT4 for i in model.graph.initializer)


def _check_opset(model: onnx.ModelProto, version: str, v) -> None:
    lo, hi = OPSETS[version]
    if version in INT4_OPSET and _has_int4_weights(model):
        hi = INT4_OPSET[version]
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not lo <= imp.version <= hi:
            v("opset", None, f"ONNX opset {imp.version} is outside TensorRT {version}'s supported opsets {lo}-{hi}; "
                             f"re-export with an opset in {lo}-{hi}")


def _check_ops(g: _Graph, version: str, v) -> None:
    for node in g.nodes:
        name = _node_id(node)
        if (node.domain, node.op_type) in g.local_functions:
            continue
        if node.domain not in ("", "ai.onnx"):
            v("contrib-op", name,
              f"node '{name}' is {node.domain}::{node.op_type}, a custom-domain (ONNX Runtime contrib) op that "
              f"TensorRT {version} cannot import; keep a portable graph and apply runtime fusions to a copy")
        elif node.op_type not in OPS[version]:
            v("unsupported-op", name,
              f"node '{name}' uses {node.op_type}, which TensorRT {version}'s ONNX parser does not support; "
              f"{_unsupported_hint(node.op_type)}")


def _tensor_types(g: _Graph) -> dict[str, tuple[int, str]]:
    """Tensor name -> (element type, where it comes from), from every place a type is declared or created."""
    types: dict[str, tuple[int, str]] = {}
    for graph in g.graphs:
        for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
                types[vi.name] = (vi.type.tensor_type.elem_type, "tensor")
        for init in graph.initializer:
            types[init.name] = (init.data_type, "initializer")
    for node in g.nodes:
        if not node.output:
            continue
        out = node.output[0]
        for attr in node.attribute:
            # Cast 'to', EyeLike/Random* 'dtype': the op creates a tensor of that type.
            if attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT:
                types[out] = (attr.i, f"{node.op_type} node '{_node_id(node)}' output")
            # Constant / ConstantOfShape 'value' tensors.
            elif attr.type == onnx.AttributeProto.TENSOR:
                types[out] = (attr.t.data_type, f"{node.op_type} node '{_node_id(node)}' output")
            elif attr.name in ("value_string", "value_strings"):
                types[out] = (TensorProto.STRING, f"{node.op_type} node '{_node_id(node)}' output")
    return types


def _check_types(g: _Graph, version: str, v) -> None:
    supported = SUPPORTED_TYPES[version]
    for name, (elem_type, where) in _tensor_types(g).items():
        if elem_type in supported:
            continue
        if elem_type in IO_ONLY_TYPES:
            if name in g.io_names:
                continue
            v("unsupported-dtype", name,
              f"{where} '{name}' is {_type_name(elem_type)}, which TensorRT {version} allows only as a network "
              "input or output; use INT8/INT32 or FLOAT inside the graph")
        else:
            v("unsupported-dtype", name,
              f"{where} '{name}' is {_type_name(elem_type)}, a type TensorRT {version} rejects; use one of "
              f"{', '.join(sorted(_type_name(t) for t in supported))}")


def _check_constant_inputs(g: _Graph, version: str, v) -> None:
    for node in g.nodes:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type.startswith("Reduce"):
            index, what = 1, "axes"
        elif node.op_type in _CONST_ONLY_INPUTS:
            index, what = _CONST_ONLY_INPUTS[node.op_type]
        else:
            continue
        tensor = _input(node, index)
        if tensor and not g.is_const(tensor):
            name = _node_id(node)
            producer = g.producer.get(tensor)
            source = f"computed by {producer.op_type} node '{_node_id(producer)}'" if producer else "a graph input"
            v("non-constant-input", name,
              f"{node.op_type} node '{name}' takes its {what} from '{tensor}' ({source}); TensorRT {version} needs "
              f"it as an initializer or Constant")


def _check_op_limits(g: _Graph, version: str, v) -> None:
    for node in g.nodes:
        if node.domain not in ("", "ai.onnx"):
            continue
        name, op = _node_id(node), node.op_type
        if op == "TopK":
            if _attr(node, "sorted", 1) != 1:
                v("topk", name, f"TopK node '{name}' has sorted=0; TensorRT {version} supports sorted=1 only")
            k_name = _input(node, 1)
            k = _attr(node, "k") if not k_name else g.const_value(k_name)  # opset < 10 has a 'k' attribute
            if k is not None and int(np.asarray(k).reshape(-1)[0]) >= TOPK_MAX_K:
                v("topk", name, f"TopK node '{name}' has K={int(np.asarray(k).reshape(-1)[0])}; TensorRT {version} "
                                f"needs K < {TOPK_MAX_K}")
        elif op == "Squeeze" and not _input(node, 1) and not _attr(node, "axes"):
            # Without axes the parser squeezes the size-1 dims it can see, so the input shape must be static.
            dims = g.dims(_input(node, 0))
            if dims is not None and not all(isinstance(d, int) for d in dims):
                v("squeeze", name, f"Squeeze node '{name}' has no axes and a dynamic input shape; TensorRT {version} "
                                   "needs the axes input to squeeze a dynamic tensor")
        elif op == "Expand":
            rank = g.rank(_input(node, 1))
            if rank is not None and rank != 1:
                v("expand", name, f"Expand node '{name}' has a {rank}-D shape input; TensorRT {version} needs 1-D")
        elif op == "ScatterND":
            reduction = _attr(node, "reduction", b"none")
            reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
            if reduction != "none":
                v("scatternd", name, f"ScatterND node '{name}' has reduction='{reduction}'; TensorRT {version} "
                                     "supports ScatterND without reduction only")
        elif op == "Resize":
            mode = _attr(node, "mode", b"nearest")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            if mode not in ("nearest", "linear"):
                v("resize", name, f"Resize node '{name}' uses mode '{mode}'; TensorRT {version} supports "
                                  "'nearest' and 'linear' only")
            if _attr(node, "antialias", 0):
                v("resize", name, f"Resize node '{name}' has antialias=1; TensorRT {version} does not support it")
        elif op == "LayerNormalization":
            extra = [o for o in node.output[1:] if o and (o in g.consumed or o in g.graph_outputs)]
            if extra:
                v("layernorm", name, f"LayerNormalization node '{name}' has its Mean/InvStdDev output(s) "
                                     f"{', '.join(extra)} in use; TensorRT {version} produces output Y only")


def _is_weight(g: _Graph, name: str) -> bool:
    """A constant tensor, or a constant quantized by a QuantizeLinear (the Q->DQ weight pattern)."""
    if g.is_const(name):
        return True
    producer = g.producer.get(name)
    return producer is not None and producer.op_type == "QuantizeLinear" and g.is_const(_input(producer, 0))


def _check_qdq(g: _Graph, version: str, v) -> None:
    supported, qdq_types = SUPPORTED_TYPES[version], QDQ_TYPES[version]
    types = _tensor_types(g)
    for node in g.nodes:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        name, op = _node_id(node), node.op_type
        x, scale, zp = _input(node, 0), _input(node, 1), _input(node, 2)
        # Scales: static (initializer or Constant) and positive.
        if not g.is_const(scale):
            v("qdq", name, f"{op} node '{name}' has a computed scale '{scale}'; TensorRT {version} needs static "
                           "scales (initializer or Constant)")
        else:
            s = g.const_value(scale)
            if s is not None and not np.all(s > 0):
                v("qdq", name, f"{op} node '{name}' has non-positive values in scale '{scale}'; TensorRT {version} "
                               "needs positive scales")
            # Per-channel scales only for weights; activations must be per-tensor.
            if s is not None and s.size > 1 and not _is_weight(g, x):
                v("qdq", name, f"{op} node '{name}' quantizes activation '{x}' per channel ({s.size} scales); "
                               f"TensorRT {version} supports per-channel scales for weights only, per-tensor for "
                               "activations")
        # Zero point: present for 8.6, constant, all zeros (symmetric), of a Q/DQ type.
        if not zp:
            if version == "8.6":
                v("qdq", name, f"{op} node '{name}' has no zero-point input; TensorRT 8.6 requires an INT8 zero "
                               "point (all zeros)")
            continue
        if not g.is_const(zp):
            v("qdq", name, f"{op} node '{name}' has a computed zero point '{zp}'; TensorRT {version} needs a "
                           "constant all-zero zero point")
            continue
        z = g.const_value(zp)
        if z is not None and np.any(z.astype(np.float64) != 0):
            v("qdq", name, f"{op} node '{name}' has a nonzero zero point '{zp}' (asymmetric quantization); "
                           f"TensorRT {version} supports symmetric quantization only (zero point 0)")
        zp_type = types.get(zp, (0, ""))[0]
        # Unsupported types (UINT8, INT16...) are already reported by the dtype rule: report each problem once.
        if zp_type in supported and zp_type not in qdq_types:
            v("qdq", name, f"{op} node '{name}' quantizes to {_type_name(zp_type)}; TensorRT {version} Q/DQ "
                           f"supports {', '.join(sorted(_type_name(t) for t in qdq_types))}")


def _check_blocked_qdq(g: _Graph, version: str, v) -> None:
    """INT4 and block quantization: INT4 only on constant weights behind a DequantizeLinear, with per-block scales
    (block 64 or 128 along one of the weight's last two dimensions, the scale of the weight's rank with that
    dimension divided by the block); no block quantization of any other type or of activations."""
    types = _tensor_types(g)
    for node in g.nodes:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        name, op = _node_id(node), node.op_type
        x, scale = _input(node, 0), _input(node, 1)
        block = int(_attr(node, "block_size", 0) or 0)
        zp = _input(node, 2)
        quantized = types.get(x if op == "DequantizeLinear" else zp, (0, ""))[0] if (op == "DequantizeLinear" or zp) else 0
        int4 = quantized == TensorProto.INT4
        if not block and not int4:
            continue
        if version == "8.6":
            v("int4-block", name, f"{op} node '{name}' uses {'INT4' if int4 else 'block quantization'}, which TensorRT "
                                  "8.6 does not have (INT4 weight-only arrives in TensorRT 10); build for 10.x or use INT8")
            continue
        if not block:
            v("int4-block", name, f"{op} node '{name}' quantizes to INT4 without block_size; TensorRT {version} needs "
                                  f"per-block scales for INT4 (block {' or '.join(map(str, INT4_BLOCK_SIZES))})")
            continue
        if not int4:
            v("int4-block", name, f"{op} node '{name}' is block-quantized ({block}) to "
                                  f"{_type_name(quantized) if quantized else 'an unknown type'}; TensorRT {version} "
                                  "block-quantizes INT4 weights only")
            continue
        if not g.is_const(x):
            v("int4-block", name, f"{op} node '{name}' applies INT4 to '{x}', which is not a constant weight; TensorRT "
                                  f"{version} supports INT4 for weights only (weight-only quantization)")
            continue
        if block not in INT4_BLOCK_SIZES:
            v("int4-block", name, f"{op} node '{name}' has block_size {block}; TensorRT {version} INT4 blocks are "
                                  f"{' or '.join(map(str, INT4_BLOCK_SIZES))} (re-quantize with block 128)")
        dims, sdims = g.dims(x), g.dims(scale)
        if dims is None or sdims is None:
            continue
        rank = len(dims)
        axis = int(_attr(node, "axis", 1))
        axis = axis + rank if axis < 0 else axis
        if rank < 2 or axis not in (rank - 2, rank - 1):
            v("int4-block", name, f"{op} node '{name}' blocks axis {axis} of a rank-{rank} weight; TensorRT {version} "
                                  "blocks one of the last two dimensions of a weight of rank 2 or more")
            continue
        want = [d // block if i == axis and isinstance(d, int) else d for i, d in enumerate(dims)]
        if isinstance(dims[axis], int) and dims[axis] % block:
            v("int4-block", name, f"{op} node '{name}': weight '{x}' has {dims[axis]} elements along the blocked axis "
                                  f"{axis}, not a multiple of block_size {block}; TensorRT {version} needs whole blocks")
        elif list(sdims) != want:
            v("int4-block", name, f"{op} node '{name}': scale '{scale}' has shape {list(sdims)}, but weight "
                                  f"{list(dims)} in blocks of {block} along axis {axis} needs {want}")


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str | None] | None:
    """Graph input dims: int for fixed, the dim_param name for symbolic, None for unknown; None if rank unknown."""
    tt = value_info.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]


def _check_profiles(model: onnx.ModelProto, profiles: list[dict], version: str, v) -> None:
    initializers = {i.name for i in model.graph.initializer}
    inputs = {i.name: _dims(i) for i in model.graph.input if i.name not in initializers}
    for k, profile in enumerate(profiles):
        where = f"optimization profile {k}"
        for extra in sorted(set(profile) - set(inputs)):
            v("profile-coverage", extra, f"{where} gives shapes for '{extra}', which is not an input of the graph; "
                                         "remove it or re-export the bundle")
        symbols: dict[str, tuple[int, int, int, str]] = {}  # dim_param -> (min, opt, max, input) first seen
        for name, dims in inputs.items():
            dynamic = dims is None or any(not isinstance(d, int) for d in dims)
            if name not in profile:
                if dynamic:
                    v("profile-coverage", name, f"{where} has no shapes for dynamic input '{name}'; TensorRT "
                                                f"{version} needs min/opt/max for every dynamic input")
                continue
            lo, mid, hi = (tuple(int(x) for x in s) for s in profile[name])
            if dims is None:
                dims = [None] * len(lo)
            if not len(lo) == len(mid) == len(hi) == len(dims):
                v("profile-coverage", name, f"{where} gives input '{name}' shapes of rank "
                                            f"{len(lo)}/{len(mid)}/{len(hi)} but the graph input has rank {len(dims)}")
                continue
            for axis, (d, a, b, c) in enumerate(zip(dims, lo, mid, hi)):
                if not 0 <= a <= b <= c:
                    v("profile-coverage", name, f"{where} input '{name}' axis {axis}: min/opt/max {a}/{b}/{c} "
                                                "must satisfy 0 <= min <= opt <= max")
                elif isinstance(d, int) and not a == b == c == d:
                    v("profile-coverage", name, f"{where} input '{name}' axis {axis} is fixed at {d} in the graph "
                                                f"but the profile gives {a}/{b}/{c}")
                elif isinstance(d, str):
                    # One symbolic dimension, one range: inputs sharing 'batch' must agree or the build fails.
                    seen = symbols.setdefault(d, (a, b, c, name))
                    if seen[:3] != (a, b, c):
                        v("profile-coverage", name,
                          f"{where} gives dimension '{d}' of input '{name}' min/opt/max {a}/{b}/{c} but "
                          f"{seen[0]}/{seen[1]}/{seen[2]} for input '{seen[3]}'; the same dimension needs one range")


# ------------------------------------------------------------------------------------------------------ public API


def check_onnx(part: str, onnx_path: Path, trt_version: str, profiles: list[dict] | None = None) -> list[RuleViolation]:
    """Every TensorRT import-rule violation in one ONNX graph (weights are not loaded).

    profiles: list of {input_name: (min_shape, opt_shape, max_shape)} (see vlexport.trt.profiles); None skips the
    profile-coverage rule.
    """
    version = normalize_version(trt_version)
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise VlexportError(f"part '{part}': ONNX file '{onnx_path}' does not exist; rebuild the bundle")
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as exc:
        raise VlexportError(f"part '{part}': '{onnx_path}' is not a readable ONNX model ({exc})") from exc
    found: list[RuleViolation] = []

    def violation(rule: str, node: str | None, message: str) -> None:
        found.append(RuleViolation(part, rule, node, message))

    if model.functions:
        # The 8.6 parser has no local-function support (added in TensorRT 9.0, onnx-tensorrt changelog).
        if version == "8.6":
            for f in model.functions:
                violation("local-function", f.name,
                          f"graph defines local function {f.domain}::{f.name}, which TensorRT 8.6 cannot import; "
                          "inline it first (onnx.inliner.inline_local_functions)")
        # Dynamo may emit model-local functions; inline them so their ops (and constant inputs) are checked
        # as the parser sees them, and a call to a local function is not mistaken for a custom op.
        model = onnx.inliner.inline_local_functions(model)

    g = _Graph(model, onnx_path.parent)
    _check_opset(model, version, violation)
    _check_ops(g, version, violation)
    _check_types(g, version, violation)
    _check_constant_inputs(g, version, violation)
    _check_op_limits(g, version, violation)
    _check_qdq(g, version, violation)
    _check_blocked_qdq(g, version, violation)
    if profiles is not None:
        _check_profiles(model, profiles, version, violation)
    return found


def check_bundle(bundle_dir: Path, manifest: dict, trt_version: str, shapes: dict) -> dict[str, list[RuleViolation]]:
    """check_onnx for every part of a bundle, with the profiles the target's shapes give."""
    from .profiles import bundle_profiles

    normalize_version(trt_version)  # an unknown version is reported before any profile problem
    # Profiles for the portable parts only: an ORT-native part's dimensions (slot rows) are no TensorRT profile's.
    portable = {**manifest, "parts": {n: p for n, p in manifest["parts"].items() if p.get("form", "portable") == "portable"}}
    profiles = bundle_profiles(portable, shapes)
    found = {}
    for name, part in manifest["parts"].items():
        if part.get("form", "portable") != "portable":
            # ONNX Runtime's own form is made of contrib ops on purpose; listing each one would hide the fix.
            found[name] = [RuleViolation(name, "form", None, (
                f"part '{name}' is in the {part['form']!r} form (ONNX Runtime contrib ops such as GroupQueryAttention), "
                "which TensorRT cannot import; build the bundle for a TensorRT target (e.g. --target jetson-orin or "
                "gpu-ampere), whose parts stay in the portable ONNX form"))]
            continue
        found[name] = check_onnx(name, Path(bundle_dir) / part["file"], trt_version, profiles.get(name))
    return found

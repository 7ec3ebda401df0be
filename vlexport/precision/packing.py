"""Weight-only products that read one input, packed into one MatMulNBits (q/k/v, gate/up).

ONNX Runtime's MatMulNBits at accuracy level 4 quantizes its input to INT8 once per node and then walks B; three
nodes on one input pay that, the thread-pool dispatch and the per-node overhead three times. At decode (one row)
that overhead is a visible share of the step: on the small fixture q, k and v took 0.87 ms of a 4.7 ms step as
three nodes, 0.57 ms as one (measured with ONNX Runtime's profiler; onnxruntime-genai's builder packs q/k/v the
same way). Each output column of MatMulNBits depends only on its own row of B, scales and zero points, so packing
the rows along N and splitting the output gives the same numbers.

Only nodes that agree on every attribute and on the layout of their inputs are packed: a product kept at INT8 by the
fallback never joins INT4 neighbours, and each product keeps its own scales. The packed node records the nodes it
replaced (PACKED_FROM), and each split output keeps its old name, so everything downstream reads the same values.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

MS = "com.microsoft"
PACKED_FROM = "vlexport.packed_from"  # node metadata: JSON [[node name, N], ...] of the nodes a packed node replaced
# MatMulNBits inputs: A, B, scales, zero_points, g_idx, bias. B, scales and zero points are laid out row by row
# along N; a g_idx (one per K, shared by every row) or a bias is not packed here.
ROW_INPUTS = (1, 2, 3)


def _packable(node) -> bool:
    if node.op_type != "MatMulNBits" or node.domain != MS or len(node.inputs) > 4:
        return False
    if any(node.outputs[0] is o for o in node.graph.outputs):
        return False
    return all(v is not None and v.const_value is not None for v in node.inputs[1:])


def _key(node) -> tuple:
    attrs = tuple(sorted((k, a.value) for k, a in node.attributes.items() if k != "N"))
    layout = tuple((v.dtype, tuple(v.shape)[1:]) for v in node.inputs[1:])
    return (id(node.inputs[0]), attrs, layout)


def _common_name(names: list[str]) -> str:
    """q_proj/MatMul_Q4, k_proj/... -> language_model.layers.0.self_attn.q_proj+k_proj+v_proj/MatMul_Q4."""
    stems = [n.rsplit("/", 1) for n in names]
    heads = [s[0] for s in stems]
    prefix = os.path.commonprefix(heads)
    prefix = prefix[: prefix.rfind(".") + 1] if "." in prefix else ""
    tail = "/" + stems[0][1] if len(stems[0]) == 2 else ""
    return prefix + "+".join(h[len(prefix):] for h in heads) + tail


def _concatenated(ir, values, name: str):
    """The row-wise concatenation of constant tensors, computed only when it is written."""
    tensors = [v.const_value for v in values]
    shape = [sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]]

    def concatenate():
        return ir.tensor(np.concatenate([t.numpy() for t in tensors], axis=0), name=name)

    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(tensors[0].dtype),
                    const_value=ir.LazyTensor(concatenate, dtype=tensors[0].dtype, shape=ir.Shape(shape), name=name))


def _pack(ir, graph, nodes) -> dict:
    names = [n.name for n in nodes]
    name = _common_name(names)
    widths = [n.attributes["N"].value for n in nodes]
    inputs = [nodes[0].inputs[0]]
    stem, first = name.rsplit("/", 1)[0], names[0].rsplit("/", 1)[0]
    for i in ROW_INPUTS[: len(nodes[0].inputs) - 1]:
        # q_proj.weight_Q4 -> q_proj+k_proj+v_proj.weight_Q4 (the quantizer names them after the module)
        old = nodes[0].inputs[i].name
        suffix = old[len(first):] if old.startswith(first) else f".input{i}"
        packed = _concatenated(ir, [n.inputs[i] for n in nodes], stem + suffix)
        graph.register_initializer(packed)
        inputs.append(packed)
    attrs = {k: a for k, a in nodes[0].attributes.items() if k != "N"}
    attrs["N"] = ir.AttrInt64("N", sum(widths))
    product = ir.Node(MS, "MatMulNBits", inputs, attributes=list(attrs.values()), name=name, num_outputs=1)
    product.outputs[0].type = nodes[0].outputs[0].type
    product.outputs[0].name = f"{name}/packed"
    product.metadata_props[PACKED_FROM] = json.dumps([[n, w] for n, w in zip(names, widths)])
    sizes = ir.Value(name=f"{name}/split_sizes", shape=ir.Shape([len(widths)]), type=ir.TensorType(ir.DataType.INT64),
                     const_value=ir.tensor(np.array(widths, np.int64), name=f"{name}/split_sizes"))
    graph.register_initializer(sizes)
    split = ir.Node("", "Split", [product.outputs[0], sizes], attributes=[ir.AttrInt64("axis", -1)],
                    name=f"{name}/split", num_outputs=len(nodes))
    graph.insert_before(nodes[0], [product, split])
    for old, new in zip((n.outputs[0] for n in nodes), split.outputs):
        new.type, new.shape = old.type, old.shape
        ir.convenience.replace_all_uses_with(old, new)
        old_name, old.name = old.name, None
        new.name = old_name
    weights = [v for n in nodes for v in n.inputs[1:]]
    for n in nodes:
        graph.remove(n, safe=True)
    for v in weights:
        if not v.uses() and v.name in graph.initializers:
            graph.initializers.pop(v.name)
    return {"node": name, "products": names, "widths": widths}


def pack_shared_input_products(path: Path) -> list[dict]:
    """Pack, in place, the MatMulNBits nodes of the model at `path` (+ its external data) that read one input and
    agree on bits, block size, accuracy level and input layout. Returns one record per packed node."""
    import onnx_ir as ir

    path = Path(path)
    model = ir.load(path)
    groups = defaultdict(list)
    for node in model.graph:
        if _packable(node):
            groups[_key(node)].append(node)
    packs = [_pack(ir, model.graph, nodes) for nodes in groups.values() if len(nodes) > 1]
    if not packs:
        return []
    data = path.with_name(path.name + ".data")
    # Written beside the part under the same names, then moved over it: the old data stays mapped until then.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".packing-") as tmp:
        out = Path(tmp) / path.name
        ir.save(model, out, external_data=data.name, max_in_flight_bytes=256 << 20)
        del model
        os.replace(out.with_name(data.name), data)
        os.replace(out, path)
    return packs


def products_of(node) -> list[tuple[str, int]]:
    """(product node name, N) for each product a MatMulNBits NodeProto computes, in output-column order: itself,
    or the nodes it was packed from."""
    meta = {p.key: p.value for p in node.metadata_props}
    if PACKED_FROM in meta:
        return [(n, w) for n, w in json.loads(meta[PACKED_FROM])]
    return [(node.name, next(a.i for a in node.attribute if a.name == "N"))]


def packed_products(path: Path) -> list[dict]:
    """The packs recorded in a model's graph (no weights are read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [{"node": node.name, "products": [n for n, _ in products_of(node)]} for node in model.graph.node
            if any(p.key == PACKED_FROM for p in node.metadata_props)]

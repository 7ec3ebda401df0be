"""Weight-only products on one input packed into one MatMulNBits (precision/packing.py)."""

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from vlexport.precision.int4 import Int4Options, quantize_int4
from vlexport.precision.packing import pack_shared_input_products, packed_products, products_of


def _three_products_on_one_input(path):
    """x feeds q, k, v (different widths) and a fourth product on another input; each output is used."""
    rng = np.random.default_rng(3)
    weights = {n: rng.standard_normal((64, w)).astype(np.float32) for n, w in (("q", 32), ("k", 48), ("v", 32), ("o", 64))}
    weights["k"][5] *= 40  # an outlier row: per-block scales must stay each product's own
    nodes = [helper.make_node("MatMul", ["x", f"{n}.weight"], [f"{n}_out"], name=f"layer.{n}_proj/MatMul")
             for n in "qkv"]
    nodes.append(helper.make_node("Relu", ["x"], ["r"]))
    nodes.append(helper.make_node("MatMul", ["r", "o.weight"], ["o_out"], name="layer.o_proj/MatMul"))
    # Products feed other nodes, as in a decoder (a product that is a graph output is not packed)
    nodes += [helper.make_node("Neg", [f"{n}_out"], [f"{n}"]) for n in "qkvo"]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 64])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "qkvo"],
        [numpy_helper.from_array(w, f"{n}.weight") for n, w in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path),
              save_as_external_data=True, location=path.name + ".data")


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_packed_products_give_bit_identical_outputs_and_keep_their_precisions(tmp_path):
    src = tmp_path / "src" / "m.onnx"
    src.parent.mkdir()
    _three_products_on_one_input(src)
    opts = Int4Options(block_size=32, fallback=False, awq=False)
    names = [f"layer.{n}_proj/MatMul" for n in "qkvo"]
    # q and v at INT4, k at INT8 (as a product the fallback kept), o alone on its input
    dst = tmp_path / "packed" / "m.onnx"
    quantize_int4(src, dst, "matmulnbits", opts, [names[0], names[2], names[3]], [names[1]], 32)
    graph = onnx.load(str(dst), load_external_data=False).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert [[p for p, _ in products_of(n)] for n in nbits] == [[names[0] + "_Q4", names[2] + "_Q4"], [names[1] + "_Q8"],
                                                               [names[3] + "_Q4"]]
    assert packed_products(dst) == [{"node": "layer.q_proj+v_proj/MatMul_Q4",
                                     "products": [names[0] + "_Q4", names[2] + "_Q4"]}]
    assert [o.name for o in graph.output] == ["q", "k", "v", "o"]

    # The same quantization, unpacked: every output is bit for bit the packed graph's.
    unpacked = tmp_path / "unpacked" / "m.onnx"
    unpacked.parent.mkdir()
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    for bits, nodes in ((4, [names[0], names[2], names[3]]), (8, [names[1]])):
        model = onnx.load(str(unpacked if bits == 8 else src))
        q = MatMulNBitsQuantizer(model, bits=bits, block_size=32, is_symmetric=True, accuracy_level=4,
                                 nodes_to_exclude=[n for n in names if n not in nodes],
                                 op_types_to_quantize=("MatMul",))
        q.process()
        onnx.save(q.model.model, str(unpacked), save_as_external_data=True, location=unpacked.name + ".data")
    assert not packed_products(unpacked)
    x = np.random.default_rng(0).standard_normal((2, 5, 64)).astype(np.float32)
    ours, theirs = _run(dst, x), _run(unpacked, x)
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, b)
    # ... and not a degenerate graph: the products differ from one another and follow the float ones.
    floats = _run(src, x)
    assert not np.array_equal(ours[0], ours[2])
    for a, f in zip(ours, floats):
        cosine = float((a * f).sum() / np.sqrt((a * a).sum() * (f * f).sum()))
        assert cosine > 0.98, cosine


def test_nothing_to_pack_leaves_the_file_alone(tmp_path):
    src = tmp_path / "m.onnx"
    _three_products_on_one_input(src)
    before = src.read_bytes(), (tmp_path / "m.onnx.data").read_bytes()
    assert pack_shared_input_products(src) == []  # plain MatMuls: nothing is MatMulNBits yet
    assert (src.read_bytes(), (tmp_path / "m.onnx.data").read_bytes()) == before

"""TensorRT ONNX import-rule checks (vlexport.trt.onnx_rules): hand-built graphs, one per rule, and a real bundle."""

import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from vlexport.errors import VlexportError
from vlexport.trt.onnx_rules import SUPPORTED_VERSIONS, RuleViolation, check_bundle, check_onnx

F = TP.FLOAT


def vi(name, elem_type=F, shape=("batch", 4)):
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def const(name, values, dtype=np.int64):
    return numpy_helper.from_array(np.asarray(values, dtype=dtype), name)


def model(nodes, inputs=None, outputs=None, inits=(), opset=17, value_info=(), functions=(), extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs or [vi("x")], outputs or [vi("y")], list(inits),
                              value_info=list(value_info))
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions), ir_version=10)


def _save(m, tmp_path):
    path = tmp_path / "part.onnx"
    onnx.save(m, str(path))
    return path


def rules(m, tmp_path, version="10.3", profiles=None, part="decoder"):
    """Sorted rule ids that check_onnx reports for model m."""
    found = check_onnx(part, _save(m, tmp_path), version, profiles)
    assert all(isinstance(v, RuleViolation) and v.part == part and v.message for v in found)
    return sorted(v.rule for v in found)


def clean():
    """MatMul + Add: what every part boils down to."""
    return model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Add", ["h", "b"], ["y"], name="add")],
        inits=[const("w", np.ones((4, 4)), np.float32), const("b", np.ones(4), np.float32)],
    )


def test_clean_graph_passes_every_version(tmp_path):
    for version in SUPPORTED_VERSIONS:
        assert rules(clean(), tmp_path, version) == []


def test_unknown_version_is_a_user_error(tmp_path):
    onnx.save(clean(), str(tmp_path / "p.onnx"))
    with pytest.raises(VlexportError, match="8.6, 10.3"):
        check_onnx("vision", tmp_path / "p.onnx", "9.9")
    assert check_onnx("vision", tmp_path / "p.onnx", "10.3.0") == []  # full version strings are fine


# --------------------------------------------------------------------------------------------- ops and opsets


def test_contrib_op(tmp_path):
    m = model([helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", name="q", K=4, N=4,
                                bits=4, block_size=32)],
              inits=[const("w", np.zeros((4, 1, 16)), np.uint8), const("s", np.ones(4), np.float32)],
              extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    # the uint8 packed weight is also an internal UINT8 tensor, which TensorRT rejects on its own
    assert rules(m, tmp_path) == ["contrib-op", "unsupported-dtype"]


def test_unsupported_op(tmp_path):
    m = model([helper.make_node("MatMulInteger", ["x", "w"], ["y"], name="mmi")],
              inputs=[vi("x", TP.INT8)], outputs=[vi("y", TP.INT32)], inits=[const("w", np.ones((4, 4)), np.int8)])
    found = check_onnx("decoder", _save(m, tmp_path), "10.3")
    assert [v.rule for v in found] == ["unsupported-op"]
    assert "MatMulInteger" in found[0].message and "10.3" in found[0].message and "QuantizeLinear" in found[0].message


def test_op_missing_from_8_6(tmp_path):
    m = model([helper.make_node("CastLike", ["x", "t"], ["y"])], inits=[const("t", [1.0], np.float32)], opset=17)
    assert rules(m, tmp_path, "10.3") == []
    assert rules(m, tmp_path, "8.6") == ["unsupported-op"]


def test_opset(tmp_path):
    m = clean()
    m.opset_import[0].version = 21
    assert rules(m, tmp_path, "10.3") == ["opset"]
    m.opset_import[0].version = 18
    assert rules(m, tmp_path, "10.3") == []
    assert rules(m, tmp_path, "8.6") == ["opset"]
    m.opset_import[0].version = 17
    assert rules(m, tmp_path, "8.6") == []


@pytest.mark.parametrize("fn_opset", [17, 18])  # same opset: inlined; another opset: the inliner leaves it
def test_local_functions(tmp_path, fn_opset):
    def with_function(op):
        body = helper.make_node(op, ["a", "w"], ["o"], name="inner")
        fn = helper.make_function("pkg.local", "Block", ["a", "w"], ["o"], [body], [helper.make_opsetid("", fn_opset)])
        call = helper.make_node("Block", ["x", "w"], ["y"], domain="pkg.local", name="call")
        return model([call], inputs=[vi("x", TP.INT8)], outputs=[vi("y", TP.INT32)],
                     inits=[const("w", np.ones((4, 4)), np.int8)], functions=[fn],
                     extra_opsets=[helper.make_opsetid("pkg.local", 1)])

    assert rules(with_function("MatMul"), tmp_path) == []  # the call itself is not a custom op
    assert rules(with_function("MatMulInteger"), tmp_path) == ["unsupported-op"]
    assert rules(with_function("MatMul"), tmp_path, "8.6") == ["local-function"]  # 8.6 parser has no functions


def test_subgraph_ops_are_checked(tmp_path):
    def branch(node):
        return helper.make_graph([node], "b", [], [vi("o" + node.output[0][-1])])

    m = model([helper.make_node(
        "If", ["c"], ["y"], name="if",
        then_branch=branch(helper.make_node("Identity", ["x"], ["o1"])),
        else_branch=branch(helper.make_node("FastGelu", ["x"], ["o2"], domain="com.microsoft")))],
        inits=[const("c", True, np.bool_)], extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    assert rules(m, tmp_path) == ["contrib-op"]


# -------------------------------------------------------------------------------------------------------- types


@pytest.mark.parametrize(
    "elem_type, version, expected",
    [
        (TP.UINT16, "10.3", ["unsupported-dtype"]),
        (TP.INT16, "10.3", ["unsupported-dtype"]),
        (TP.UINT64, "10.3", ["unsupported-dtype"]),
        (TP.UINT8, "10.3", ["unsupported-dtype"]),  # UINT8 only as network I/O
        (TP.DOUBLE, "10.3", []),  # converted to FLOAT by the parser
        (TP.INT64, "8.6", []),  # cast down to INT32 by the parser
        (TP.BFLOAT16, "10.3", []),
        (TP.BFLOAT16, "8.6", ["unsupported-dtype"]),
    ],
)
def test_initializer_dtype(tmp_path, elem_type, version, expected):
    t = helper.make_tensor("t", elem_type, [4], [1, 2, 3, 4])
    m = model([helper.make_node("Cast", ["t"], ["tf"], to=F), helper.make_node("Add", ["x", "tf"], ["y"])],
              inits=[t], opset=17)
    assert rules(m, tmp_path, version) == expected


def test_dtype_of_io_cast_and_constant(tmp_path):
    io = model([helper.make_node("Identity", ["x"], ["y"])], inputs=[vi("x", TP.UINT8)], outputs=[vi("y", TP.UINT8)])
    assert rules(io, tmp_path) == []  # UINT8 network I/O is allowed
    cast = model([helper.make_node("Cast", ["x"], ["h"], to=TP.UINT32, name="c"),
                  helper.make_node("Cast", ["h"], ["y"], to=F)])
    assert rules(cast, tmp_path) == ["unsupported-dtype"]
    constant = model([helper.make_node("Constant", [], ["k"], value=helper.make_tensor("v", TP.UINT16, [1], [1])),
                      helper.make_node("Identity", ["x"], ["y"])])
    assert rules(constant, tmp_path) == ["unsupported-dtype"]
    info = model([helper.make_node("Identity", ["x"], ["y"])], value_info=[vi("z", TP.STRING)])
    assert rules(info, tmp_path) == ["unsupported-dtype"]


# ----------------------------------------------------------------------------------------- constant-only inputs


def _unsqueeze(axes_from):
    nodes, inits = [], []
    if axes_from == "initializer":
        inits.append(const("axes", [0]))
    elif axes_from == "constant":
        nodes.append(helper.make_node("Constant", [], ["axes"], value=const("v", [0])))
    else:  # computed: Shape -> Slice, the pattern an exporter leaves when it does not fold
        nodes.append(helper.make_node("Shape", ["x"], ["axes"], start=0, end=1))
    nodes.append(helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="unsq"))
    return model(nodes, outputs=[vi("y", F, [1, "batch", 4])], inits=inits)


def test_unsqueeze_axes_must_be_constant(tmp_path):
    assert rules(_unsqueeze("initializer"), tmp_path) == []
    assert rules(_unsqueeze("constant"), tmp_path) == []
    found = check_onnx("embed", _save(_unsqueeze("computed"), tmp_path), "10.3")
    assert [v.rule for v in found] == ["non-constant-input"] and found[0].node == "unsq"
    assert "Shape" in found[0].message and "axes" in found[0].message


@pytest.mark.parametrize(
    "op, index, attrs",
    [("Squeeze", 1, {}), ("ReduceSum", 1, {}), ("ReduceMean", 1, {}), ("CumSum", 1, {}), ("Pad", 3, {}),
     ("OneHot", 1, {}), ("Slice", 3, {}), ("Dropout", 2, {})],
)
def test_constant_only_inputs(tmp_path, op, index, attrs):
    def graph(constant):
        inputs = ["x"] + [f"in{i}" for i in range(1, index + 1)]
        inits = [const(n, [0]) for n in inputs[1:index]]
        nodes = [helper.make_node(op, inputs, ["y"], name="n", **attrs)]
        if constant:
            inits.append(const(inputs[index], [0]))
        else:
            nodes.insert(0, helper.make_node("Shape", ["x"], [inputs[index]], start=0, end=1))
        return model(nodes, inits=inits)

    assert rules(graph(constant=True), tmp_path) == []
    assert rules(graph(constant=False), tmp_path) == ["non-constant-input"]


def test_squeeze_without_axes_needs_static_shape(tmp_path):
    def graph(shape):
        return model([helper.make_node("Squeeze", ["x"], ["y"])], inputs=[vi("x", F, shape)], outputs=[vi("y", F, [4])])

    assert rules(graph([1, 4]), tmp_path) == []
    assert rules(graph(["batch", 4]), tmp_path) == ["squeeze"]


# ------------------------------------------------------------------------------------------ per-op limitations


def test_topk(tmp_path):
    def graph(k, sorted_=1):
        return model([helper.make_node("TopK", ["x", "k"], ["y", "i"], sorted=sorted_)],
                     outputs=[vi("y"), vi("i", TP.INT64)], inits=[const("k", [k])])

    assert rules(graph(8), tmp_path) == []
    assert rules(graph(8, sorted_=0), tmp_path) == ["topk"]
    assert rules(graph(4000), tmp_path) == ["topk"]


def test_expand_shape_must_be_1d(tmp_path):
    def graph(shape):
        return model([helper.make_node("Expand", ["x", "s"], ["y"])], inits=[const("s", shape)])

    assert rules(graph([2, 4]), tmp_path) == []
    assert rules(graph([[2, 4]]), tmp_path) == ["expand"]


def test_scatternd_reduction(tmp_path):
    def graph(**attrs):
        return model([helper.make_node("ScatterND", ["x", "i", "u"], ["y"], **attrs)],
                     inits=[const("i", [[0]]), const("u", np.ones((1, 4)), np.float32)])

    assert rules(graph(), tmp_path) == []
    assert rules(graph(reduction="none"), tmp_path) == []
    assert rules(graph(reduction="add"), tmp_path) == ["scatternd"]


def test_resize(tmp_path):
    def graph(**attrs):
        return model([helper.make_node("Resize", ["x", "", "s"], ["y"], **attrs)],
                     inits=[const("s", [1.0, 2.0], np.float32)])

    assert rules(graph(mode="linear"), tmp_path) == []
    assert rules(graph(), tmp_path) == []  # default mode is nearest
    assert rules(graph(mode="cubic"), tmp_path) == ["resize"]
    assert rules(graph(mode="linear", antialias=1), tmp_path) == ["resize"]


def test_layernorm_extra_outputs(tmp_path):
    inits = [const("g", np.ones(4), np.float32), const("b", np.zeros(4), np.float32)]
    unused = model([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y", "mean", ""])], inits=inits)
    assert rules(unused, tmp_path) == []
    used = model([helper.make_node("LayerNormalization", ["x", "g", "b"], ["h", "mean"]),
                  helper.make_node("Add", ["h", "mean"], ["y"])], inits=inits)
    assert rules(used, tmp_path) == ["layernorm"]


# ---------------------------------------------------------------------------------------------------------- Q/DQ


def _qdq(zero_point=0, scale=0.1, zp_dtype=np.int8, weight_scales=None, act_scales=None, computed_scale=False,
         computed_zp=False):
    """Activation Q->DQ, then MatMul with a DQ'd int8 weight."""
    inits = [const("s", scale if act_scales is None else act_scales, np.float32),
             const("w", np.ones((4, 4)), np.int8),
             const("ws", 0.1 if weight_scales is None else weight_scales, np.float32),
             const("wzp", 0 if weight_scales is None else [0] * len(weight_scales), np.int8)]
    nodes = []
    if zero_point is not None:
        inits.append(const("zp", zero_point if act_scales is None else [zero_point] * len(act_scales), zp_dtype))
    if computed_scale:
        nodes.append(helper.make_node("Abs", ["s"], ["s_abs"]))
    if computed_zp:
        nodes.append(helper.make_node("Identity", ["zp"], ["zp_id"]))
    zp = ["zp_id" if computed_zp else "zp"] if zero_point is not None else []
    q_inputs = ["x", "s_abs" if computed_scale else "s"] + zp
    nodes += [helper.make_node("QuantizeLinear", q_inputs, ["xq"], name="q"),
              helper.make_node("DequantizeLinear", ["xq"] + q_inputs[1:], ["xd"], name="dq"),
              helper.make_node("DequantizeLinear", ["w", "ws", "wzp"], ["wd"], name="wdq", axis=1),
              helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    return model(nodes, inits=inits)


def test_qdq_symmetric_ok(tmp_path):
    assert rules(_qdq(), tmp_path, "10.3") == []
    assert rules(_qdq(), tmp_path, "8.6") == []
    assert rules(_qdq(weight_scales=[0.1, 0.2, 0.3, 0.4]), tmp_path) == []  # per-channel weights


def test_qdq_nonzero_zero_point(tmp_path):
    found = check_onnx("decoder", _save(_qdq(zero_point=3), tmp_path), "10.3")
    assert [v.rule for v in found] == ["qdq", "qdq"]  # the Q and its DQ
    assert {v.node for v in found} == {"q", "dq"} and "symmetric" in found[0].message


def test_qdq_scales(tmp_path):
    assert rules(_qdq(computed_scale=True), tmp_path) == ["qdq", "qdq"]
    assert rules(_qdq(scale=-0.1), tmp_path) == ["qdq", "qdq"]
    assert rules(_qdq(act_scales=[0.1, 0.2, 0.3, 0.4]), tmp_path) == ["qdq", "qdq"]  # per-channel activation


def test_qdq_zero_point_type_and_presence(tmp_path):
    assert rules(_qdq(zero_point=None), tmp_path, "10.3") == []
    assert rules(_qdq(computed_zp=True), tmp_path, "10.3") == ["qdq", "qdq"]
    assert rules(_qdq(zero_point=None), tmp_path, "8.6") == ["qdq", "qdq"]  # 8.6 needs the zero point
    assert rules(_qdq(zp_dtype=np.int32), tmp_path, "10.3") == ["qdq", "qdq"]  # INT32 is no Q/DQ type
    m = _qdq()
    zp = next(t for t in m.graph.initializer if t.name == "zp")
    zp.CopyFrom(helper.make_tensor("zp", TP.FLOAT8E4M3FN, [], [0.0]))
    assert rules(m, tmp_path, "10.3") == []
    assert rules(m, tmp_path, "8.6") == ["unsupported-dtype"]  # no FP8 on 8.6, reported once


# ---------------------------------------------------------------------------------------------- profile coverage

DYN = model([helper.make_node("Add", ["x", "z"], ["y"])], inputs=[vi("x", F, ["batch", 4]), vi("z", F, ["batch", 4])])


@pytest.mark.parametrize(
    "profile, expected",
    [
        ({"x": ((1, 4), (2, 4), (8, 4)), "z": ((1, 4), (2, 4), (8, 4))}, []),
        ({"x": ((1, 4), (2, 4), (8, 4))}, ["profile-coverage"]),  # z missing
        ({"x": ((1, 4), (2, 4), (8, 4)), "z": ((1,), (2,), (8,))}, ["profile-coverage"]),  # rank
        ({"x": ((1, 4), (9, 4), (8, 4)), "z": ((1, 4), (9, 4), (8, 4))}, ["profile-coverage"] * 2),  # opt > max
        ({"x": ((1, 2), (2, 4), (8, 4)), "z": ((1, 4), (2, 4), (8, 4))}, ["profile-coverage"]),  # fixed dim 4
        ({"x": ((1, 4), (2, 4), (8, 4)), "z": ((1, 4), (2, 4), (4, 4))}, ["profile-coverage"]),  # two 'batch' ranges
        ({"x": ((1, 4), (2, 4), (8, 4)), "z": ((1, 4), (2, 4), (8, 4)), "w": ((1,), (1,), (1,))},
         ["profile-coverage"]),  # not a graph input
    ],
)
def test_profile_coverage(tmp_path, profile, expected):
    assert rules(DYN, tmp_path, profiles=[profile]) == expected


def test_every_profile_is_checked(tmp_path):
    good = {"x": ((1, 4), (2, 4), (8, 4)), "z": ((1, 4), (2, 4), (8, 4))}
    found = check_onnx("decoder", _save(DYN, tmp_path), "10.3", [good, {"x": good["x"]}])
    assert [(v.rule, v.node) for v in found] == [("profile-coverage", "z")] and "profile 1" in found[0].message


# ------------------------------------------------------------------------------------------------- real bundle


@pytest.fixture(scope="module")
def bundle(tiny_base, tmp_path_factory):
    from vlexport.build import build

    out = tmp_path_factory.mktemp("trt") / "bundle"
    # A TensorRT target keeps the portable graph; FP32 keeps the check about graph structure, not precision.
    build(tiny_base, [], out, target="gpu-ampere", verify=False,
          precision={"vision": "fp32", "embed": "fp32", "decoder": "fp32"})
    return out, json.loads((out / "manifest.json").read_text())


def test_ort_native_part_is_refused_by_its_form(full_bundle):
    """A cpu bundle's decoder is ONNX Runtime's native form: check-trt says so once, naming the fix."""
    from vlexport.target import DEFAULT_SHAPES

    out = full_bundle  # conftest's cpu bundle, read only
    manifest = json.loads((out / "manifest.json").read_text())
    found = check_bundle(out, manifest, "10.3", DEFAULT_SHAPES)
    assert [(v.rule, v.part) for v in found["decoder"]] == [("form", "decoder")]
    assert "--target" in found["decoder"][0].message
    assert found["vision"] == [] and found["embed"] == []


def test_real_bundle_passes_10_3(bundle):
    from vlexport.target import DEFAULT_SHAPES

    out, manifest = bundle
    found = check_bundle(out, manifest, "10.3", DEFAULT_SHAPES)
    assert set(found) == {"vision", "embed", "decoder"}
    assert found == {"vision": [], "embed": [], "decoder": []}, [str(v) for vs in found.values() for v in vs]


def test_real_bundle_opset_is_too_new_for_8_6(bundle):
    from vlexport.target import DEFAULT_SHAPES

    out, manifest = bundle
    found = check_bundle(out, manifest, "8.6", DEFAULT_SHAPES)
    assert {part: [v.rule for v in vs] for part, vs in found.items()} == {p: ["opset"] for p in found}
    with pytest.raises(VlexportError, match="supported versions"):
        check_bundle(out, manifest, "7.0", DEFAULT_SHAPES)


def test_real_bundle_profiles_follow_the_manifest(bundle, tmp_path):
    """A manifest whose decoder inputs disagree with the graph is caught by profile coverage."""
    from vlexport.target import DEFAULT_SHAPES

    out, manifest = bundle
    edited = json.loads(json.dumps(manifest))
    edited["parts"]["decoder"]["inputs"] = edited["parts"]["decoder"]["inputs"][:-1]  # drop the last KV input
    found = check_bundle(out, edited, "10.3", DEFAULT_SHAPES)
    assert found["vision"] == [] and found["embed"] == []
    assert {v.rule for v in found["decoder"]} == {"profile-coverage"}
    assert len(found["decoder"]) == 2  # missing from the context and the generation profile


@pytest.mark.parametrize("planted", ["MatMulNBits", "MatMulInteger"])
def test_planted_op_in_real_decoder_is_reported(bundle, tmp_path, planted):
    from vlexport.target import DEFAULT_SHAPES
    from vlexport.trt.profiles import bundle_profiles

    out, manifest = bundle
    m = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    if planted == "MatMulNBits":
        node = helper.make_node("MatMulNBits", ["inputs_embeds", m.graph.initializer[0].name], ["planted"],
                                domain="com.microsoft", name="planted_node", K=64, N=64, bits=4, block_size=32)
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        rule = "contrib-op"
    else:
        node = helper.make_node("MatMulInteger", ["inputs_embeds", "inputs_embeds"], ["planted"], name="planted_node")
        rule = "unsupported-op"
    m.graph.node.append(node)
    m.graph.output.append(helper.make_tensor_value_info("planted", F, None))
    (tmp_path / "decoder.onnx.data").symlink_to(out / "decoder.onnx.data")
    onnx.save(m, str(tmp_path / "decoder.onnx"))

    profiles = bundle_profiles(manifest, DEFAULT_SHAPES)["decoder"]
    found = check_onnx("decoder", tmp_path / "decoder.onnx", "10.3", profiles)
    assert [(v.rule, v.node) for v in found] == [(rule, "planted_node")]
    assert planted in found[0].message and "10.3" in found[0].message
    assert os.path.getsize(tmp_path / "decoder.onnx") < os.path.getsize(out / "decoder.onnx.data")  # graph only

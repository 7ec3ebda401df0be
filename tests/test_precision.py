"""FP16 and calibrated INT8 parts: SmoothQuant, the sensitivity fallback, the outlier fixture, per-backend forms."""

import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from vlexport.cli import app
from vlexport.errors import VlexportError
from vlexport.precision.packing import products_of


@pytest.fixture(scope="module")
def cache(tmp_path_factory, monkeypatch_module):
    path = tmp_path_factory.mktemp("calibration-cache")
    monkeypatch_module.setenv("VLEXPORT_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def build(*args):
    return CliRunner().invoke(app, ["build", *map(str, args)])


def manifest(out):
    return json.loads((out / "manifest.json").read_text())


# -- fixture -------------------------------------------------------------------------------------------------------

def test_outlier_fixture_computes_the_same_function_with_outlier_ranges(tiny_base, outlier_base):
    from transformers import LlavaForConditionalGeneration

    plain = LlavaForConditionalGeneration.from_pretrained(str(tiny_base)).eval()
    spiky = LlavaForConditionalGeneration.from_pretrained(str(outlier_base)).eval()
    ids = torch.randint(3, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    seen = {}

    def grab(name):
        return lambda _m, args: seen.__setitem__(name, args[0].detach().abs().amax(dim=(0, 1)))

    for name, model in (("plain", plain), ("spiky", spiky)):
        layer = model.model.language_model.layers[0]
        h = layer.self_attn.q_proj.register_forward_pre_hook(grab(name))
        with torch.no_grad():
            seen[name + "_logits"] = model(input_ids=ids).logits
        h.remove()
    assert torch.allclose(seen["plain_logits"], seen["spiky_logits"], atol=1e-4)
    ratio = lambda x: float(x.max() / x.median())  # noqa: E731
    assert ratio(seen["spiky"]) > 10 * ratio(seen["plain"])  # a few channels tens of times the rest


def test_fixture_logits_are_as_confident_as_a_trained_model(tiny_base):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(tiny_base)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    ids = tok("a photo of the cat on the table with a red cup and the sky is blue", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        probs = model(input_ids=ids).logits.softmax(-1)
    assert probs.max(-1).values.mean() > 0.2  # random init gives ~1/vocab = 0.001


# -- SmoothQuant ---------------------------------------------------------------------------------------------------

def test_smoothquant_keeps_the_function_and_flattens_the_channels(outlier_base):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from vlexport.parity.data import builtin_cases
    from vlexport.precision import smoothquant

    model = LlavaForConditionalGeneration.from_pretrained(str(outlier_base)).eval()
    processor = AutoProcessor.from_pretrained(str(outlier_base))
    cases = builtin_cases()[:2]
    texts = ["USER: <image>\nWhat is this? ASSISTANT:"] * 2
    inputs = processor(images=cases[0].image, text=texts[0], return_tensors="pt")
    with torch.no_grad():
        before = model(**inputs).logits
    maxima = smoothquant.activation_maxima(model, processor, cases, texts, {"decoder", "vision"})
    n = smoothquant.smooth(model, maxima, 0.5, {"decoder", "vision"})
    # tiny: 2 decoder layers x 2 groups + lm_head; vision runs 2 of its 3 layers (feature layer -2) x 2 groups
    assert n == 2 * 2 + 1 + 2 * 2
    after_maxima = smoothquant.activation_maxima(model, processor, cases, texts, {"decoder"})
    with torch.no_grad():
        after = model(**inputs).logits
    assert torch.allclose(before, after, atol=1e-4 * before.abs().max())
    spread = lambda x: float(x.max() / np.median(x))  # noqa: E731
    key = "language_model.layers.0.input_layernorm"
    assert spread(after_maxima[key]) < spread(maxima[key]) / 3


# -- the ranking's quantization model ------------------------------------------------------------------------------

def test_emulated_dynamic_error_matches_onnxruntime(tmp_path):
    """The sensitivity ranking's NumPy model of dynamic INT8 predicts what ONNX Runtime's quantized MatMul does."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from vlexport.precision.int8 import emulated_error, quantize

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 32])], [numpy_helper.from_array(w, "w")])
    src = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(src))
    for outlier in (1.0, 50.0):
        x = rng.standard_normal((16, 64)).astype(np.float32)
        x[:, 3] *= outlier
        quantize(src, tmp_path / "q.onnx", "dynamic", ["mm"])
        y = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        actual = np.linalg.norm(y - x @ w) / np.linalg.norm(x @ w)
        num, den = emulated_error(x, w, "dynamic")
        assert actual > 0 and 0.5 < np.sqrt(num / den) / actual < 2.0, (outlier, actual, np.sqrt(num / den))


def test_fallback_search_finds_the_fewest_kept_nodes():
    from vlexport.precision.sensitivity import fallback_search

    ranked = [f"n{i}" for i in range(20)]
    calls = []

    def needs(k):
        def attempt(kept):
            calls.append(len(kept))
            return len(kept) >= k
        return attempt

    kept, tries = fallback_search(ranked, needs(5), enabled=True)
    assert kept == ranked[:5] and tries[-1] == {"kept": 5, "passed": True} and calls[-1] == 5
    assert fallback_search(ranked, needs(0), enabled=True)[0] == []
    assert fallback_search(ranked, needs(5), enabled=False) == ([], [{"kept": 0, "passed": False}])
    kept, tries = fallback_search(ranked, needs(99), enabled=True)
    assert kept == ranked and not tries[-1]["passed"]


# -- options -------------------------------------------------------------------------------------------------------

def test_int8_options_are_validated():
    from vlexport.precision import int8_options

    assert int8_options({}, "calibration=entropy,fallback=false").fallback is False
    for bad in ("calibration=median", "decoder=int4", "fallback=maybe", "smoothquant_alpha=2", "colour=red", "x"):
        with pytest.raises(VlexportError):
            int8_options({}, bad)


@pytest.mark.parametrize("args, words", [
    (["--int8", "calibration=median"], ["calibration", "minmax"]),
    (["--precision", "embed=int8"], ["embed=int8", "fp16"]),
    (["--target", "jetson-orin", "--precision", "decoder=int8", "--int8", "decoder=weight-only"], ["weight-only", "w8a8"]),
    (["--target", "jetson-orin", "--precision", "vision=int8", "--int8", "form=dynamic"], ["DynamicQuantizeLinear"]),
])
def test_bad_precision_requests_exit_2_before_any_work(tiny_base, tmp_path, args, words):
    out = tmp_path / "out"
    r = build("--base", tiny_base, "-o", out, "--target", "cpu-int8", *args)
    assert r.exit_code == 2, r.output
    assert all(w in r.output for w in words), r.output
    assert not out.exists()


def test_a_bad_calibration_folder_exits_2(tiny_base, tmp_path):
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "prompts.jsonl").write_text('{"image": "missing.png", "prompt": "hi"}\n')
    r = build("--base", tiny_base, "-o", tmp_path / "out", "--target", "cpu-int8", "--calib", tmp_path / "calib")
    assert r.exit_code == 2 and "missing.png" in r.output, r.output
    assert not (tmp_path / "out").exists()


# -- builds ------------------------------------------------------------------------------------------------------------

def test_outlier_int8_holds_with_the_fallback_and_fails_without(outlier_base, tmp_path, cache):
    """The issue's done criterion. Without SmoothQuant, INT8 breaks on the outliers and fails the gate; the sensitivity
    fallback alone makes it pass by keeping exactly the products whose inputs carry outliers; SmoothQuant (the
    default, with the fallback) folds most of them away first."""
    naive = build("--base", outlier_base, "-o", tmp_path / "naive", "--target", "cpu-int8",
                  "--int8", "smoothquant_alpha=0,fallback=false")
    assert naive.exit_code == 1 and "decoder/logits kl_mean" in naive.output, naive.output
    assert not (tmp_path / "naive").exists()

    out = tmp_path / "fallback"
    r = build("--base", outlier_base, "-o", out, "--target", "cpu-int8", "--int8", "smoothquant_alpha=0")
    assert r.exit_code == 0, r.output
    m = manifest(out)
    assert m["parity"]["passed"] and m["parts"]["decoder"]["precision"] == "int8"
    lowering = m["parts"]["decoder"]["lowering"]
    kept = {k["module"] for k in lowering["kept_fp32"]}
    # inject_outliers: hidden outliers feed q/k/v, gate/up and lm_head; layer 1's down_proj gets the MLP outlier.
    outlier_fed = {f"language_model.layers.{i}.{n}" for i in (0, 1) for n in
                   ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
    outlier_fed |= {"lm_head", "language_model.layers.1.mlp.down_proj"}
    assert "language_model.layers.1.mlp.down_proj" in kept and kept <= outlier_fed
    assert lowering["products_quantized"] == 15 - len(kept) > 0
    assert not lowering["fallback"]["tries"][0]["passed"] and lowering["calibration_gate"]["passed"]
    report = json.loads((out / "parity_report.json").read_text())
    assert report["precision"] == {"vision": "int8", "embed": "fp32", "decoder": "int8"}
    assert {c["threshold"] for c in report["checks"]} == {"top1_min", "kl_mean_max", "vision_cosine_min"}
    # The graph really is INT8 where it says so: dynamic quantized products, weights stored as int8.
    graph = onnx.load(str(out / m["parts"]["decoder"]["file"]))
    assert sum(n.op_type in ("DynamicQuantizeMatMul", "MatMulInteger") for n in graph.graph.node) == 15 - len(kept)
    assert any(i.data_type == onnx.TensorProto.INT8 for i in graph.graph.initializer)
    assert not (out / "decoder.onnx").exists()  # the FP32 original kept during the build is gone
    # Every try of the search rewrote the part; the shipped data file holds the final weights and nothing else.
    proto = onnx.load(str(out / m["parts"]["decoder"]["file"]), load_external_data=False)
    ends = [int(e["offset"]) + int(e["length"]) for e in
            ({x.key: x.value for x in i.external_data} for i in proto.graph.initializer if i.external_data)]
    data = out / (m["parts"]["decoder"]["file"] + ".data")
    assert data.stat().st_size == max(ends) and len(lowering["fallback"]["tries"]) > 2
    r = CliRunner().invoke(app, ["verify", str(out), "--json"])
    assert r.exit_code == 0, r.output

    default = tmp_path / "default"
    r = build("--base", outlier_base, "-o", default, "--target", "cpu-int8")
    assert r.exit_code == 0, r.output
    assert len(manifest(default)["parts"]["decoder"]["lowering"]["kept_fp32"]) < len(kept)
    # A rebuild reuses the saved SmoothQuant maxima.
    r = build("--base", outlier_base, "-o", default, "--target", "cpu-int8", "--force", "--no-verify")
    assert r.exit_code == 0 and "reusing channel maxima" in r.output, r.output


def test_fp16_bundle_passes_its_gate_with_fp16_weights(tiny_base, full_lora, tmp_path):
    out = tmp_path / "fp16"
    r = build("--base", tiny_base, "--adapter", full_lora, "-o", out, "--target", "cpu-fp16")
    assert r.exit_code == 0, r.output
    m = manifest(out)
    report = json.loads((out / "parity_report.json").read_text())
    assert report["passed"] and {c["threshold"] for c in report["checks"]} >= {"top1_min", "logit_cosine_min", "vision_cosine_min"}
    for name in ("vision", "embed", "decoder"):
        part = m["parts"][name]
        assert part["precision"] == "fp16" and part["file"] == f"{name}.fp16.onnx"
        graph = onnx.load(str(out / part["file"]))
        floats = [i for i in graph.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
        big = [i for i in floats if np.prod(i.dims) >= 1024]
        assert big and all(i.data_type == onnx.TensorProto.FLOAT16 for i in big), name
        assert all(i.type.tensor_type.elem_type != onnx.TensorProto.FLOAT16 for i in graph.graph.input)  # FP32 I/O


def test_qdq_form_with_calibration_cache_and_tensorrt_rules(tiny_base, tmp_path, cache):
    """TensorRT's INT8 form (static Q/DQ, symmetric) runs on ONNX Runtime here and passes the gate; its ranges are
    cached, and the graph follows onnx-tensorrt's Q/DQ rules."""
    out = tmp_path / "qdq"
    r = build("--base", tiny_base, "-o", out, "--target", "cpu-int8", "--int8", "form=qdq,calibration=minmax")
    assert r.exit_code == 0, r.output
    assert "computing minmax calibration ranges" in r.output
    m = manifest(out)
    assert m["parts"]["decoder"]["lowering"]["form"] == "qdq" and m["parts"]["decoder"]["lowering"]["calibration"] == "minmax"
    graph = onnx.load(str(out / m["parts"]["vision"]["file"]))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and not ops & {"MatMulInteger", "DynamicQuantizeLinear"}
    r = CliRunner().invoke(app, ["check-trt", str(out), "--trt-version", "10.3"])
    assert r.exit_code == 0, r.output
    r = build("--base", tiny_base, "-o", out, "--target", "cpu-int8", "--int8", "form=qdq,calibration=minmax", "--force")
    assert r.exit_code == 0 and "reusing minmax calibration ranges" in r.output, r.output
    # A cache truncated by a killed build is measured again (and said so), not a crash.
    files = sorted((cache / "calibration").glob("*-minmax.json"))
    assert files
    for f in files:
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    r = build("--base", tiny_base, "-o", out, "--target", "cpu-int8", "--int8", "form=qdq,calibration=minmax", "--force")
    text = " ".join(r.output.split())
    assert r.exit_code == 0 and "is unreadable (JSONDecodeError" in text and "computing minmax calibration ranges" in text, text
    for f in files:
        json.loads(f.read_text())  # rewritten whole
    assert not list((cache / "calibration").glob(".*.tmp"))


def test_calibration_cache_is_checked_and_written_atomically(tmp_path):
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData, save_tensors_data

    from vlexport.precision import CalibrationCache

    logged = []
    path = tmp_path / "vision-x-percentile.json"
    assert not CalibrationCache(path, "percentile", logged.append).valid and not logged  # none yet: nothing to say
    ranges = TensorsData(CalibrationMethod.Percentile, {"x": TensorData(lowest=np.float32(-1), highest=np.float32(2))})
    c = CalibrationCache(path, "percentile", logged.append)
    assert c.use() != path and c.use().parent == path.parent  # the quantizer writes beside it
    save_tensors_data(ranges, c.use())
    assert not path.exists()  # not visible until committed
    c.commit()
    assert path.exists() and not c.tmp.exists() and c.valid and c.use() == path
    assert CalibrationCache(path, "percentile", logged.append).valid and not logged
    # Another method's ranges under this name, and a truncated file: both deleted and measured again.
    assert not CalibrationCache(path, "entropy", logged.append).valid and not path.exists()
    assert "not entropy" in logged[-1]
    save_tensors_data(ranges, path)
    path.write_text(path.read_text()[:-7])
    assert not CalibrationCache(path, "percentile", logged.append).valid and not path.exists()
    assert "unreadable" in logged[-1] and str(path) in logged[-1]


def test_weight_only_decoder(tiny_base, tmp_path, cache):
    out = tmp_path / "wo"
    r = build("--base", tiny_base, "-o", out, "--target", "cpu-int8", "--int8", "decoder=weight-only")
    assert r.exit_code == 0, r.output
    m = manifest(out)
    assert m["parts"]["decoder"]["lowering"]["form"] == "weight-only"
    graph = onnx.load(str(out / m["parts"]["decoder"]["file"]), load_external_data=False)
    # 15 products; q/k/v and gate/up of each layer share one node (precision/packing.py)
    assert sum(len(products_of(n)) for n in graph.graph.node if n.op_type == "MatMulNBits") == 15
    assert len(m["parts"]["decoder"]["lowering"]["packed"]) == 2 * 2


def test_tensorrt_int8_target_writes_qdq_parts_and_int8_engine_commands(tiny_base, tmp_path, cache):
    out = tmp_path / "trt"
    r = build("--base", tiny_base, "-o", out, "--target", "jetson-orin", "--precision", "vision=int8,decoder=int8")
    assert r.exit_code == 0, r.output
    m = manifest(out)
    assert m["parts"]["decoder"]["file"] == "decoder.int8.onnx" and m["parts"]["embed"]["precision"] == "fp32"
    script = (out / "engines" / "build.sh").read_text()
    line = next(x for x in script.splitlines() if "decoder.int8.onnx" in x)
    assert "--int8" in line and "--fp16" in line
    assert CliRunner().invoke(app, ["check-trt", str(out), "--trt-version", "10.3"]).exit_code == 0


def test_end_to_end_thresholds_follow_the_least_precise_part():
    """Logits and tokens pass through every part: with an INT8 vision part an FP32 decoder is judged by the INT8
    gate (greedy identity cannot hold), while the vision features keep the vision part's own section."""
    from vlexport.parity.verify import thresholds_for
    from vlexport.target import load_target

    target = load_target("cpu-int8").to_dict()
    manifest = {"target": target, "parts": {"vision": {"precision": "int8"}, "embed": {"precision": "fp32"},
                                            "decoder": {"precision": "fp32"}}}
    t = thresholds_for(manifest)
    assert t["top1_min"] == 0.98 and t["kl_mean_max"] == 0.02 and "greedy_exact_match" not in t
    assert t["vision_cosine_min"] == 0.999 and t["hidden_rel_tol"] == 1e-4  # --layers: the decoder's own
    manifest["parts"]["vision"]["precision"] = "fp32"
    t = thresholds_for(manifest)
    assert t["greedy_exact_match"] == 1.0 and t["vision_cosine_min"] == 0.99999 and "top1_min" not in t


def test_failing_checks_blame_the_decoder_first_then_the_vision_part():
    from vlexport.precision import failing_int8_parts

    parts = {"vision": {"precision": "int8"}, "embed": {"precision": "fp32"}, "decoder": {"precision": "int8"}}
    report = {"checks": [{"part": "decoder", "passed": False}, {"part": "vision", "passed": True}]}
    assert failing_int8_parts({"parts": parts}, report) == ["decoder"]
    parts["decoder"]["precision"] = "fp32"
    assert failing_int8_parts({"parts": parts}, report) == ["vision"]
    report["checks"][0]["passed"] = True
    assert failing_int8_parts({"parts": parts}, report) == []


@pytest.mark.slow
def test_small_fixture_fp16_and_int8_with_lora_and_bank_task(tmp_path, cache):
    """Issue 6's done criterion on the LLaVA-1.5-shaped fixture (about 8 minutes on 2 cores; bench/precision.sh
    builds the same bundles and times them): a trained-size LoRA merged, a bottleneck bank task kept swappable."""
    from vlexport.fixture import make_adapterhub_bottleneck, make_llava, make_lora

    base = make_llava(tmp_path / "small", "small")
    lora = make_lora(base, tmp_path / "lora", scale=0.02)
    bottleneck = make_adapterhub_bottleneck(base, tmp_path / "bn", "language", scale=0.05)
    for target in ("cpu-fp16", "cpu-int8"):
        out = tmp_path / target
        r = build("--base", base, "--adapter", lora, "--adapter", f"vqa={bottleneck}", "-o", out, "--target", target)
        assert r.exit_code == 0, r.output
        report = json.loads((out / "parity_report.json").read_text())
        precision = target.split("-")[1]
        assert report["passed"] and report["precision"]["decoder"] == precision
        assert any(c["name"].startswith("vqa:") for c in report["cases"])

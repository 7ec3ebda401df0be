"""The 7B path at INT4 (issue 16): a model whose fp32 copy does not fit twice exports in fp16, and its decoder is
quantized with RTN and no calibration run, reading one weight at a time. A tiny model stands in for the 7B, with
the machine's memory made small (build.host_memory_bytes, as in test_scale.py) so that the low-memory path is taken."""

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from vlexport import build as build_module
from vlexport.cli import app
from vlexport.plan import parameter_counts
from vlexport.precision.packing import products_of

UNCALIBRATED = "algo=rtn,fallback=false,awq=false"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("VLEXPORT_CACHE", str(tmp_path_factory.mktemp("int4-7b-cache")))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def tiny_fp16_base(tiny_base, tmp_path_factory):
    """tiny's tokenizer and processor, with seeded random weights stored in fp16 (as a 7B checkpoint is)."""
    from transformers import LlavaConfig

    from vlexport.fixture import write_random_checkpoint

    out = tmp_path_factory.mktemp("tinyfp16-int4") / "llava"
    shutil.copytree(tiny_base, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    config = LlavaConfig.from_pretrained(str(tiny_base))
    config.dtype = "float16"
    write_random_checkpoint(config, out, seed=5, shard_bytes=60_000)
    return out


@pytest.fixture(scope="module")
def fp16_int4_target(tmp_path_factory):
    """cpu-int4 with FP16 vision and embedding, and FP16 gates (bench/int4_7b.sh's profile, at block 32)."""
    from vlexport.target import TARGETS_DIR

    text = (TARGETS_DIR / "cpu-int4.toml").read_text()
    for old, new in (('name = "cpu-int4"', 'name = "cpu-int4-fp16"'), ('vision = "int8"', 'vision = "fp16"'),
                     ('embed = "fp32"', 'embed = "fp16"')):
        assert old in text
        text = text.replace(old, new)
    text += ("\n[parity.fp16]\nexport_rel_tol = 1e-2\ntop1_min = 0.999\nlogit_cosine_min = 0.9999\n"
             "vision_cosine_min = 0.9999\nhidden_rel_tol = 1e-2\n")
    path = tmp_path_factory.mktemp("targets") / "cpu-int4-fp16.toml"
    path.write_text(text)
    return path


@pytest.fixture
def small_machine(tiny_fp16_base, monkeypatch):
    """Memory for 1.5 fp32 copies of the model: an fp32 export with its check would not fit."""
    config = json.loads((tiny_fp16_base / "config.json").read_text())
    monkeypatch.setattr(build_module, "host_memory_bytes", lambda: int(1.5 * 4 * sum(parameter_counts(config).values())))


def _nbits_weights(path) -> dict:
    """MatMulNBits product -> (bits, its weight bytes, its scale bytes); a packed node's rows are split back out."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            bits = next(a.i for a in node.attribute if a.name == "bits")
            start = 0
            for name, n in products_of(node):
                rows = slice(start, start + n)
                out[name] = (bits, inits[node.input[1]][rows].tobytes(), inits[node.input[2]][rows].tobytes())
                start += n
    return out


def _products(graph) -> int:
    return sum(len(products_of(n)) for n in graph.node if n.op_type == "MatMulNBits")


@pytest.mark.slow
def test_uncalibrated_rtn_writes_the_calibrated_rtn_weights_without_a_calibration_run(tiny_base, fp16_int4_target,
                                                                                      tmp_path, cache):
    """awq=false, fallback=false: no calibration set is read, and every product the calibrated RTN path (awq off)
    writes at INT4 or INT8 is bit for bit the same; the only difference is what its fallback kept."""
    runner = CliRunner()
    common = ["build", "--base", str(tiny_base), "--target", str(fp16_int4_target), "--no-verify"]
    plain, searched = tmp_path / "plain", tmp_path / "searched"
    r = runner.invoke(app, [*common, "--int4", UNCALIBRATED, "-o", str(plain)])
    assert r.exit_code == 0, r.output
    assert "calibration set" not in r.output and "uncalibrated" in r.output
    r = runner.invoke(app, [*common, "--int4", "algo=rtn,fallback=true,awq=false", "--calib",
                            str(tmp_path / "nowhere"), "-o", str(searched)])
    assert r.exit_code == 2 and "nowhere" in r.output  # the calibrated path reads a calibration set; ours does not
    r = runner.invoke(app, [*common, "--int4", "algo=rtn,fallback=true,awq=false", "-o", str(searched)])
    assert r.exit_code == 0, r.output
    assert "calibration set" in r.output

    def decoder(out):
        manifest = json.loads((out / "manifest.json").read_text())
        entry = manifest["parts"]["decoder"]
        return entry, _nbits_weights(out / entry["file"])

    (low_a, a), (low_b, b) = decoder(plain), decoder(searched)
    assert low_a["precision"] == "int4" and low_a["lowering"]["calibration_cases"] == 0
    assert low_a["lowering"]["products_quantized"] == low_a["lowering"]["products_total"] - 1  # lm_head at INT8
    kept = {k["node"] for k in low_b["lowering"]["kept"]}
    assert sum(bits == 4 for bits, *_ in a.values()) == low_a["lowering"]["products_quantized"]
    # Node names carry the bits (NAME_Q4, NAME_Q8): the products the fallback kept at INT8 differ, nothing else.
    assert set(a) - set(b) == {f"{n}_Q4" for n in kept}
    assert set(a) & set(b) and len(a) == len(b)
    for n in set(a) & set(b):
        assert a[n] == b[n], n


def test_lazy_quantization_equals_the_eager_quantizer_from_fp16_weights(tiny_fp16_base, tmp_path, monkeypatch):
    """From an fp16 decoder with external data, read one weight at a time, wherever the process runs from (onnx
    refuses absolute external-data locations when it loads a tensor)."""
    from vlexport.export.onnx import export_part, part_specs
    from vlexport.model import check_base_dir, facts_from_config, load_llava
    from vlexport.precision.int4 import Int4Options, lm_head_nodes, quantize_int4
    from vlexport.precision.int8 import weight_matmuls

    model = load_llava(tiny_fp16_base, dtype="float16")
    spec = next(s for s in part_specs(model, facts_from_config(check_base_dir(tiny_fp16_base))) if s.name == "decoder")
    src = export_part(spec, tmp_path / "part" / "decoder.onnx")
    matmuls = weight_matmuls(onnx.load(str(src), load_external_data=False))
    head = set(lm_head_nodes(matmuls))
    int4, int8 = [m.node for m in matmuls if m.node not in head], sorted(head)
    assert int4 and int8
    opts = Int4Options(block_size=32, fallback=False, awq=False)
    quantize_int4(src, tmp_path / "eager" / "d.onnx", "matmulnbits", opts, int4, int8, 32)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    quantize_int4(src, tmp_path / "lazy" / "d.onnx", "matmulnbits", opts, int4, int8, 32, lazy=True)
    eager, lazy = (onnx.load(str(tmp_path / d / "d.onnx")) for d in ("eager", "lazy"))
    assert _products(lazy.graph) == len(matmuls)
    assert [(n.name, n.op_type, list(n.input)) for n in lazy.graph.node] == \
           [(n.name, n.op_type, list(n.input)) for n in eager.graph.node]
    ours = {i.name: numpy_helper.to_array(i) for i in lazy.graph.initializer}
    theirs = {i.name: numpy_helper.to_array(i) for i in eager.graph.initializer}
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert value.dtype == ours[name].dtype and np.array_equal(value, ours[name]), name
    # The written part uses its own data file only (nothing points back at src's).
    written = onnx.load(str(tmp_path / "lazy" / "d.onnx"), load_external_data=False)
    locations = {e.value for i in written.graph.initializer for e in i.external_data if e.key == "location"}
    assert locations == {"d.onnx.data"}


@pytest.mark.slow
def test_low_memory_int4_build_exports_fp16_and_passes_int4_verify(tiny_fp16_base, small_machine, fp16_int4_target,
                                                                    tmp_path, cache):
    """The 7B recipe on the tiny model, with a LoRA merged into the fp16 weights (verify's reference keeps it
    unmerged): FP16 export, INT4 decoder by uncalibrated RTN, verify on the first 2 layers passes."""
    from vlexport.fixture import make_lora
    from vlexport.runtime import Bundle

    lora = make_lora(tiny_fp16_base, tmp_path / "lora", seed=9, scale=0.05)
    out = tmp_path / "b"
    logs = []
    manifest = build_module.build(tiny_fp16_base, [lora], out=out, target=str(fp16_int4_target), int4=UNCALIBRATED,
                                  log=logs.append)
    assert manifest["build"]["export_dtype"] == "float16"
    assert "uncalibrated RTN" in manifest["build"]["export_dtype_reason"]
    assert not any("calibration set" in line for line in logs)
    assert {n: p["precision"] for n, p in manifest["parts"].items()} == {"vision": "fp16", "embed": "fp16",
                                                                          "decoder": "int4"}
    lowering = manifest["parts"]["decoder"]["lowering"]
    assert lowering["calibration_cases"] == 0 and lowering["calibration_gate"] is None
    decoder = onnx.load(str(out / manifest["parts"]["decoder"]["file"]), load_external_data=False)
    ops = [n.op_type for n in decoder.graph.node]
    inits = {i.name for i in decoder.graph.initializer}
    assert _products(decoder.graph) == lowering["products_total"]
    assert not [n.name for n in decoder.graph.node if n.op_type == "MatMul" and n.input[1] in inits]  # none left
    # The ORT-native form (shared KV buffer), built from the fp16 weights and checked on its first layers in fp32.
    entry = manifest["parts"]["decoder"]
    assert entry["form"] == "ort-native" and "GroupQueryAttention" in ops
    assert entry["export_check"]["first_layers"] == 2 and entry["export_check"]["cases"] >= 6
    assert not any(p.key == "vlexport.fp16_products" for p in decoder.metadata_props)
    assert all(i.data_type != onnx.TensorProto.FLOAT16 for i in decoder.graph.initializer)
    report = json.loads((out / "parity_report.json").read_text())
    assert report["passed"] and report["mode"].startswith("first 2 decoder layers")
    assert not (out / "decoder.onnx").exists()  # the fp16 original was dropped once verify passed
    generation = Bundle(out).generate(np.zeros((40, 30, 3), np.uint8), "What is this?", max_new_tokens=4)
    assert len(generation.token_ids) >= 1


@pytest.mark.parametrize("target, args, words", [
    # The target's INT8 vision and FP32 embedding need the fp32 copy: named, with the --precision to use instead.
    ("cpu-int4", [], ["does not fit twice", "vision=int8", "embed=fp32", "--precision vision=fp16,embed=fp16"]),
    ("cpu-int8", [], ["does not fit twice", "vision=int8", "decoder=int8"]),
    # AWQ and the fallback need the calibration run: named, with the uncalibrated options to use instead.
    (None, [], ["awq=true", "fallback=true", UNCALIBRATED]),
    (None, ["--int4", "algo=gptq,fallback=false,awq=false"], ["algo=gptq", UNCALIBRATED]),
    (None, ["--int4", "algo=hqq,fallback=false,awq=false"], ["algo=hqq", UNCALIBRATED]),
])
def test_low_memory_int4_refuses_what_needs_calibration_by_name(tiny_fp16_base, small_machine, fp16_int4_target,
                                                                 tmp_path, target, args, words):
    out = tmp_path / "b"
    r = CliRunner().invoke(app, ["build", "--base", str(tiny_fp16_base), "--target", target or str(fp16_int4_target),
                                 *args, "-o", str(out)])
    assert r.exit_code == 2, r.output
    said = " ".join(r.output.split())  # rich wraps long lines
    for w in words:
        assert w in said, (w, said)
    assert not out.exists() and not list(tmp_path.glob(".b*"))


def test_native_decoder_from_fp16_weights_quantizes_as_the_fp32_native_graph(tiny_fp16_base, tmp_path):
    """The ORT-native decoder written from a model loaded in fp16 (its products' weights in fp16, the graph not
    runnable yet) and quantized lazily has the very MatMulNBits weights, scales and graph of the native decoder
    built from the same weights in fp32 and quantized by ONNX Runtime's quantizer whole; and it runs."""
    import onnxruntime as ort

    from vlexport.export.ort_native import FP16_PRODUCTS, write_native_decoder
    from vlexport.model import load_llava
    from vlexport.precision.int4 import Int4Options, lm_head_nodes, quantize_int4
    from vlexport.precision.int8 import weight_matmuls

    model = load_llava(tiny_fp16_base, dtype="float16")
    half = write_native_decoder(model, tmp_path / "half" / "decoder.onnx", fp16_products=True)
    meta = onnx.load(str(half), load_external_data=False)
    assert any(p.key == FP16_PRODUCTS for p in meta.metadata_props)
    half_weights = [i for i in meta.graph.initializer if i.data_type == onnx.TensorProto.FLOAT16]
    matmuls = weight_matmuls(meta)
    assert len(half_weights) == len(matmuls) > 0  # the products' weights, and nothing else, in fp16
    full = write_native_decoder(model.float(), tmp_path / "full" / "decoder.onnx")
    head = set(lm_head_nodes(matmuls))
    int4, int8 = [m.node for m in matmuls if m.node not in head], sorted(head)
    opts = Int4Options(block_size=32, fallback=False, awq=False)
    quantize_int4(half, tmp_path / "lazy" / "d.onnx", "matmulnbits", opts, int4, int8, 32, lazy=True)
    quantize_int4(full, tmp_path / "eager" / "d.onnx", "matmulnbits", opts, int4, int8, 32)
    lazy, eager = (onnx.load(str(tmp_path / d / "d.onnx")) for d in ("lazy", "eager"))
    assert not any(p.key == FP16_PRODUCTS for p in lazy.metadata_props)
    assert [(n.op_type, list(n.input)) for n in lazy.graph.node] == [(n.op_type, list(n.input)) for n in eager.graph.node]
    ours = {i.name: numpy_helper.to_array(i) for i in lazy.graph.initializer}
    theirs = {i.name: numpy_helper.to_array(i) for i in eager.graph.initializer}
    assert ours.keys() == theirs.keys()
    for name, value in theirs.items():
        assert value.dtype == ours[name].dtype and np.array_equal(value, ours[name]), name
    assert all(v.dtype != np.float16 for v in ours.values())
    session = ort.InferenceSession(str(tmp_path / "lazy" / "d.onnx"), providers=["CPUExecutionProvider"])
    cfg = model.config.text_config
    hd = cfg.hidden_size // cfg.num_attention_heads
    feed = {"inputs_embeds": np.random.default_rng(0).standard_normal((1, 5, cfg.hidden_size)).astype(np.float32),
            "attention_mask": np.ones((1, 5), np.int64), "position_ids": np.arange(5)[None]}
    for i in range(cfg.num_hidden_layers):
        for kv in ("key", "value"):
            feed[f"past_key_values.{i}.{kv}"] = np.zeros((1, cfg.num_key_value_heads, 0, hd), np.float32)
    logits = session.run(["logits"], feed)[0]
    assert logits.shape == (1, 1, model.lm_head.out_features) and np.isfinite(logits).all()


def test_fp16_embedding_table_stays_fp16_in_onnx_runtime(tiny_fp16_base, tmp_path):
    """An fp16 embed part is looked up in fp16 and cast after: ONNX Runtime, fully optimized, keeps the table in fp16.
    (Computing on in fp16 made its CPU provider cast the whole table to fp32 at load: 2x the table resident, 525 MB
    on a 7B.) Its output equals the fp16 lookup, exactly."""
    import onnxruntime as ort
    import torch

    from vlexport.export.onnx import export_part, part_specs
    from vlexport.model import check_base_dir, facts_from_config, load_llava

    model = load_llava(tiny_fp16_base, dtype="float16")
    spec = next(s for s in part_specs(model, facts_from_config(check_base_dir(tiny_fp16_base))) if s.name == "embed")
    path = export_part(spec, tmp_path / "embed" / "embed.onnx")
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    table = [i for i in optimized.graph.initializer if list(i.dims) == list(model.model.language_model.embed_tokens.weight.shape)]
    assert [t.data_type for t in table] == [onnx.TensorProto.FLOAT16]
    ids = np.array([[1, 5, 9, 3]], np.int64)
    got = session.run(["inputs_embeds"], {"input_ids": ids, "image_features": np.zeros((0, model.config.text_config.hidden_size), np.float32)})[0]
    with torch.no_grad():
        want = model.model.language_model.embed_tokens(torch.from_numpy(ids)).float().numpy()
    assert got.dtype == np.float32 and np.array_equal(got, want)

"""Target profiles, the memory planner and the TensorRT build plan (engines/build.sh), on a machine without TensorRT."""

import json
import shlex

import pytest
from typer.testing import CliRunner

from vlexport.cli import app
from vlexport.target import available_targets, load_target
from vlexport.trt.trtexec import options_for

SHIPPED = {"cpu", "cpu-fp16", "cpu-int8", "jetson-orin", "jetson-agx-orin-32gb", "jetson-orin-nx-16gb",
           "jetson-orin-nano-8gb", "gpu-turing", "gpu-ampere", "gpu-ada", "gpu-hopper"}


def test_shipped_profiles_load():
    assert SHIPPED <= set(available_targets())
    for name in SHIPPED:
        t = load_target(name)
        assert t.name == name
        if t.backend == "tensorrt":
            assert t.compute_capability and t.tensorrt_versions and t.usable_memory_gb and t.memory_bandwidth_gbs
    orin = load_target("jetson-orin")
    assert orin.compute_capability == "8.7" and orin.dla_cores == 2 and orin.builder["dla_vision"]
    assert load_target("jetson-orin-nano-8gb").dla_cores == 0


@pytest.mark.parametrize("edit,needle", [
    (lambda t: t.replace('backend = "tensorrt"', 'backend = "openvino"'), "backend 'openvino'"),
    (lambda t: t.replace('decoder = "fp16"', 'decoder = "fp8"'), "precision.decoder"),
    (lambda t: t.replace("prompt_tokens = [1, 640, 2048]", "prompt_tokens = [1, 4096, 2048]"), "shapes.prompt_tokens"),
    (lambda t: t.replace("optimization_level = 3", "optimization_level = 9"), "optimization_level"),
    (lambda t: t.replace('compute_capability = "8.7"\n', ""), "compute_capability"),
])
def test_bad_profile_is_refused(tmp_path, edit, needle):
    from vlexport.errors import VlexportError
    from vlexport.target import TARGETS_DIR

    bad = tmp_path / "mine.toml"
    bad.write_text(edit((TARGETS_DIR / "jetson-orin.toml").read_text()))
    with pytest.raises(VlexportError, match="mine.toml") as e:
        load_target(str(bad))
    assert needle in str(e.value)


def test_7b_parameter_count(llava7b_config):
    from vlexport.plan import parameter_counts

    counts = parameter_counts(json.loads((llava7b_config / "config.json").read_text()))
    # Llama-2-7B is 6.74B with embeddings; CLIP ViT-L/14-336 up to layer 23 plus the projector is ~0.31B.
    assert 6.7e9 < counts["decoder"] + counts["embed"] < 6.8e9
    assert 0.29e9 < counts["vision"] < 0.33e9


def test_parameter_count_is_exact_on_fixture(tiny_base):
    from vlexport.export.parts import DecoderPart, EmbedPart, VisionPart
    from vlexport.model import load_llava
    from vlexport.plan import parameter_counts

    model = load_llava(tiny_base)
    n = lambda m: sum(p.numel() for p in m.parameters())
    counts = parameter_counts(json.loads((tiny_base / "config.json").read_text()))
    assert counts["vision"] == n(VisionPart(model))
    assert counts["embed"] == n(EmbedPart(model))
    assert counts["decoder"] == n(DecoderPart(model)) - counts["embed"]  # the decoder graph takes embeddings


def test_plan_7b_fits_orin_fp16(llava7b_config):
    r = CliRunner().invoke(app, ["plan", "--base", str(llava7b_config), "--target", "jetson-orin", "--json"])
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["fits"] and plan["precision"]["decoder"] == "fp16"
    assert 12 < plan["weights_gib"]["decoder"] < 13 and plan["total_gib"] < plan["usable_gib"]


def test_plan_7b_refused_on_orin_nano(llava7b_config):
    r = CliRunner().invoke(app, ["plan", "--base", str(llava7b_config), "--target", "jetson-orin-nano-8gb"])
    assert r.exit_code == 2
    text = " ".join(r.output.split())
    assert "does not fit target 'jetson-orin-nano-8gb'" in text and "6.6 GiB is usable" in text
    assert "KV cache" in text and "It would fit with" in text and "context 2048" in text


def test_plan_precision_override_and_bad_override(llava7b_config):
    r = CliRunner().invoke(app, ["plan", "--base", str(llava7b_config), "--target", "jetson-orin", "--precision", "decoder=int8", "--json"])
    assert r.exit_code == 0 and 6 < json.loads(r.stdout)["weights_gib"]["decoder"] < 6.5
    r = CliRunner().invoke(app, ["plan", "--base", str(llava7b_config), "--target", "jetson-orin", "--precision", "decoder=int3"])
    assert r.exit_code == 2 and "--precision decoder=int3" in r.output


def test_orin_build_writes_parts_plan_and_script(orin_bundle):
    manifest = json.loads((orin_bundle / "manifest.json").read_text())
    assert set(manifest["parts"]) == {"vision", "embed", "decoder"}
    assert manifest["memory_plan"]["fits"] and manifest["memory_plan"]["target"] == "jetson-orin"
    engines = manifest["engines"]
    assert engines["status"] == "planned" and "tensorrt" in engines["reason"].lower()
    assert engines["parts"]["vision"]["dla_core"] == 0 and engines["parts"]["decoder"]["precision"] == "fp16"
    assert len(engines["parts"]["decoder"]["profiles"]) == 2  # context + generation
    assert (orin_bundle / "engines" / "build.sh").exists() and manifest["files"]["engines/build.sh"]
    assert manifest["parity"]["passed"]  # the FP32 ONNX parts were verified here


def _trtexec_lines(script):
    return [shlex.split(line)[1:] for line in script.read_text().splitlines() if line.startswith('"$TRTEXEC"')]


def test_trtexec_plan_uses_documented_flags_and_covers_inputs(orin_bundle):
    manifest = json.loads((orin_bundle / "manifest.json").read_text())
    allowed = options_for("10.3")
    lines = _trtexec_lines(orin_bundle / "engines" / "build.sh")
    assert len(lines) == 3
    for argv in lines:
        for a in argv:
            assert a.split("=", 1)[0] in allowed, a
        part = argv[0].split("=", 1)[1].removesuffix(".onnx")
        assert (orin_bundle / f"{part}.onnx").exists()
        assert "--fp16" in argv and "--skipInference" in argv
        assert any(a.startswith("--memPoolSize=workspace:") and a.endswith("M") for a in argv)
        inputs = {i["name"]: i["shape"] for i in manifest["parts"][part]["inputs"]}
        groups = [a for a in argv if a.startswith(("--minShapes=", "--optShapes=", "--maxShapes="))]
        assert len(groups) == 3 * len(manifest["engines"]["parts"][part]["profiles"])
        for group in zip(*[iter(groups)] * 3):
            parsed = []
            for spec in group:
                shapes = {}
                for item in spec.split("=", 1)[1].split(","):
                    name, dims = item.rsplit(":", 1)
                    shapes[name.strip("'")] = [int(d) for d in dims.split("x")]
                assert set(shapes) == set(inputs), spec
                parsed.append(shapes)
            for name, shape in inputs.items():
                lo, opt, hi = (p[name] for p in parsed)
                assert len(lo) == len(shape) and all(a <= b <= c for a, b, c in zip(lo, opt, hi))
                for d, a, c in zip(shape, lo, hi):
                    if isinstance(d, int):
                        assert a == c == d
        if part == "vision":
            assert "--useDLACore=0" in argv and "--allowGPUFallback" in argv
        if part == "decoder":
            assert [a for a in argv if a.startswith("--profile=")] == ["--profile=0", "--profile=1"]


def test_trtexec_8_6_gets_one_profile_and_mib():
    from vlexport.trt.trtexec import part_command

    p0 = {"x": ((1, 4), (1, 8), (1, 16))}
    p1 = {"x": ((1, 1), (1, 1), (1, 1))}
    argv = part_command("decoder", "decoder.onnx", "fp16", [p0, p1], "8.6", {"workspace_gb": 2}, False)
    assert not any(a.startswith("--profile") for a in argv)
    assert "--minShapes=x:1x1" in argv and "--maxShapes=x:1x16" in argv
    assert "--memPoolSize=workspace:2048" in argv
    assert all(a.split("=", 1)[0] in options_for("8.6") for a in argv[1:])


def test_engines_command_without_tensorrt(orin_bundle):
    r = CliRunner().invoke(app, ["engines", str(orin_bundle)])
    assert r.exit_code == 2 and "TensorRT" in r.output


def test_check_trt_cli_passes_real_bundle_and_fails_planted_op(orin_bundle, tmp_path):
    import onnx
    from onnx import helper

    r = CliRunner().invoke(app, ["check-trt", str(orin_bundle), "--trt-version", "10.3", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["passed"]

    import shutil

    planted = tmp_path / "planted"
    shutil.copytree(orin_bundle, planted)  # a copy, not links: a sealed bundle holds plain files only
    model = onnx.load(str(orin_bundle / "decoder.onnx"), load_external_data=False)
    model.graph.node.append(helper.make_node("MatMulInteger", ["inputs_embeds", "inputs_embeds"], ["planted_out"], name="planted"))
    model.graph.output.append(helper.make_tensor_value_info("planted_out", onnx.TensorProto.INT32, None))
    onnx.save(model, str(planted / "decoder.onnx"))
    from vlexport.files import sha256_file
    from vlexport.trt.onnx_rules import check_onnx

    violations = check_onnx("decoder", planted / "decoder.onnx", "10.3")
    assert [v.rule for v in violations] == ["unsupported-op"] and "MatMulInteger" in violations[0].message
    # Through the CLI: the copy is sealed again with the planted file's checksum, so the integrity check passes.
    try:
        from vlexport.bundle import reseal
    except ImportError:  # before sealed bundles: only the per-file table
        manifest = json.loads((orin_bundle / "manifest.json").read_text())
        manifest["files"]["decoder.onnx"] = sha256_file(planted / "decoder.onnx")
        (planted / "manifest.json").write_text(json.dumps(manifest))
    else:
        reseal(planted)
    r = CliRunner().invoke(app, ["check-trt", str(planted), "--trt-version", "10.3"])
    assert r.exit_code == 1 and "MatMulInteger" in r.output


@pytest.mark.parametrize("command", ["run", "verify", "bench"])
def test_tensorrt_backend_needs_built_engines(orin_bundle, full_bundle, tmp_path, photos, command):
    photos["astronaut"].save(tmp_path / "a.png")
    extra = ["--image", str(tmp_path / "a.png"), "--prompt", "hi"] if command == "run" else []
    r = CliRunner().invoke(app, [command, str(orin_bundle), "--backend", "tensorrt", *extra])
    assert r.exit_code == 2 and "engines are not built yet" in " ".join(r.output.split())
    r = CliRunner().invoke(app, [command, str(full_bundle), "--backend", "tensorrt", *extra])
    assert r.exit_code == 2 and "no TensorRT target" in " ".join(r.output.split())


def test_orin_bank_with_bottleneck_slots_is_planned_and_importable(tiny_base, tmp_path):
    """Slot inputs' dynamic bottleneck width and LoRA rank are covered by the engine profiles (0 = no adapter), and
    their row axis is the batch (lora_slots.py). INT8 Q/DQ calibration runs these graphs, which have no defaults on
    their slot inputs (TensorRT's rule), so the calibration feeds must carry "no adapter" themselves."""
    from vlexport.fixture import make_adapterhub_bottleneck, make_lora

    adapter = make_adapterhub_bottleneck(tiny_base, tmp_path / "a", "language", "double_seqbn")
    lora = make_lora(tiny_base, tmp_path / "l", seed=7)
    out = tmp_path / "bank"
    r = CliRunner().invoke(app, ["build", "--base", str(tiny_base), "--adapter", f"vqa={adapter}", "--adapter",
                                 f"ocr={lora}", "--target", "jetson-orin", "--precision", "vision=int8,decoder=int8",
                                 "-o", str(out), "--no-verify"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parts"]["vision"]["precision"] == "int8"
    # (The tiny random decoder does not hold INT8's gate: what matters here is that its calibration ran.)
    assert manifest["parts"]["decoder"]["lowering"]["calibration_gate"]["checks"]
    assert not manifest["tasks"]["ocr"]["parts"]  # the LoRA is fed through slots on TensorRT too
    generation = manifest["engines"]["parts"]["decoder"]["profiles"][1]
    lo, _, hi = generation["decoder_adapter.down_weight"]
    assert (lo[2], lo[3], hi[3]) == (1, 0, 256)  # rows from 1 (the batch), width 0..shapes.adapter_width
    lo, _, hi = generation["decoder_lora.layers.self_attn.q_proj.a"]
    assert (lo[3], hi[3]) == (0, 64)  # rank 0..shapes.lora_rank
    assert "decoder_adapter.down_weight:2x2x1x0x64" in (out / "engines" / "build.sh").read_text()
    # The portable decoder takes one row of slot inputs per batch row: a mixed batch on ONNX Runtime (the engines'
    # graphs) gives each request's tokens alone.
    import vlexport
    from skimage import data
    from PIL import Image

    bundle = vlexport.load(out)
    assert bundle.decoder_form() == "portable"
    image = Image.fromarray(data.astronaut())
    prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    requests = [vlexport.Request(image, raw_prompt=prompt, task=t, max_new_tokens=6 + 2 * i)
                for i, t in enumerate([None, "ocr", "vqa", "ocr"])]
    alone = [bundle.generate(image, raw_prompt=prompt, task=r.task, max_new_tokens=r.max_new_tokens).token_ids
             for r in requests]
    assert [g.token_ids for g in bundle.generate_batch(requests)] == alone
    r = CliRunner().invoke(app, ["check-trt", str(out), "--trt-version", "10.3"])
    assert r.exit_code == 0, r.output

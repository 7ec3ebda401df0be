"""`vlexport verify` passes a correct bundle and fails, naming the part, a bundle that is subtly wrong."""

import json
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from vlexport.files import sha256_file
from vlexport.cli import app


def verify(*args):
    return CliRunner().invoke(app, ["verify", *map(str, args)])


def test_correct_bundle_passes_with_reports(full_bundle, tmp_path):
    r = verify(full_bundle, "--json", "--junit", tmp_path / "j.xml", "--max-new-tokens", "16")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["passed"] and report["thresholds"]["logit_rel_tol"] == 1e-4
    assert {c["metric"] for c in report["checks"]} >= {"max_rel_logit_diff", "exact_match_rate", "cosine"}
    assert report["parts"]["decoder"]["logits"]["top1_agreement"] == 1.0
    assert report["parts"]["vision"]["image_features"]["min_atol"] < 1e-5
    assert len(report["cases"]) == 6
    root = ET.parse(tmp_path / "j.xml").getroot()
    assert root.get("failures") == "0" and int(root.get("tests")) == len(report["checks"])
    stored = json.loads((full_bundle / "parity_report.json").read_text())
    assert stored["passed"]
    # auto: the tiny model fits in float64, so the FP32 checks are judged against the oracle, and every output
    # reports the bundle's and PyTorch FP32's error against it
    assert report["oracle"]["mode"] == "fp64" and report["oracle"]["requested"] == "auto"
    assert {c["basis"] for c in report["checks"]} == {"oracle"}
    assert {(o["part"], o["output"]) for o in report["oracle"]["outputs"]} == {("vision", "image_features"), ("decoder", "logits")}
    for o in report["oracle"]["outputs"]:
        assert 0 <= o["bundle"] < 1e-4 and 0 < o["reference"] < 1e-4
    from rich.console import Console

    from vlexport.parity.report import render_table

    console = Console(record=True, width=240)
    render_table(report, console)
    text = console.export_text()
    assert "FP32 vs float64" in text and "error against the float64 oracle" in text and "oracle: float64" in text


def _largest_matrix(initializers):
    candidates = [t for t in initializers if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2]
    return max(candidates, key=lambda t: np.prod(t.dims) * (0 if any(s in t.name for s in ("embed", "lm_head", "rotary")) else 1))


def _scale_weight(bundle, part, pick=_largest_matrix, factor=1.01):
    """Rewrite one weight of a part in place and fix its checksum, so parity (not integrity) must catch it."""
    path = bundle / f"{part}.onnx"
    model = onnx.load(str(path))
    target = pick(model.graph.initializer)
    target.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(target) * np.float32(factor), target.name))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{part}.onnx.data")
    _reseal(bundle)
    return target.name


def _reseal(bundle):
    """Fix the bundle's checksums (and its manifest's seal, where bundles are sealed) after a deliberate change."""
    try:
        from vlexport.bundle import reseal
    except ImportError:  # before sealed bundles: only the per-file table
        manifest = json.loads((bundle / "manifest.json").read_text())
        for rel in manifest["files"]:
            manifest["files"][rel] = sha256_file(bundle / rel)
        (bundle / "manifest.json").write_text(json.dumps(manifest))
    else:
        reseal(bundle)


@pytest.mark.parametrize("part,output", [("decoder", "logits"), ("vision", "image_features")])
def test_one_weight_scaled_by_1_01_fails(full_bundle, tmp_path, part, output):
    bundle = tmp_path / "b"
    shutil.copytree(full_bundle, bundle)
    _scale_weight(bundle, part)
    r = verify(bundle, "--json", "--max-new-tokens", "8")
    assert r.exit_code == 1, r.output
    report = json.loads(r.stdout)
    failed = [(c["part"], c["output"]) for c in report["checks"] if not c["passed"]]
    assert (part, output) in failed
    assert f"{part}/{output}" in report["summary"]


@pytest.mark.slow  # a build of its own (~20 s); by default test_one_weight_scaled_by_1_01_fails catches a smaller change
def test_dropped_adapter_fails(tiny_base, full_lora, bitfit_dump, tmp_path):
    out = tmp_path / "no-adapter"
    r = CliRunner().invoke(app, ["build", "--base", str(tiny_base), "--adapter", str(bitfit_dump), "-o", str(out)])
    assert r.exit_code == 0, r.output
    r = verify(out, "--base", tiny_base, "--adapter", full_lora, "--adapter", bitfit_dump, "--max-new-tokens", "8")
    assert r.exit_code == 1
    assert "FAIL" in r.output


def test_changed_source_is_reported(full_bundle, tmp_path, bitfit_dump):
    bundle = tmp_path / "b"
    shutil.copytree(full_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["adapters"][1]["sha256"] = "0" * 64
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    _reseal(bundle)
    r = verify(bundle)
    assert r.exit_code == 2 and "changed since the bundle was built" in r.output and "bitfit.safetensors" in r.output


def test_user_data_folder(full_bundle, tmp_path, photos):
    photos["rocket"].save(tmp_path / "rocket.png")
    (tmp_path / "prompts.jsonl").write_text(
        json.dumps({"image": "rocket.png", "prompt": "What flies?"}) + "\n"
        + json.dumps({"image": "rocket.png", "raw_prompt": "USER: <image>\nLaunch? ASSISTANT:"}) + "\n"
    )
    r = verify(full_bundle, "--data", tmp_path, "--json", "--max-new-tokens", "8")
    assert r.exit_code == 0, r.output
    assert [c["name"] for c in json.loads(r.stdout)["cases"]] == ["rocket.png/l1", "rocket.png/l2"]


def test_few_layer_mode_passes_and_catches_layer_zero(full_bundle, tmp_path):
    r = verify(full_bundle, "--layers", "1", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["mode"].startswith("first 1 decoder layers")
    assert {c["output"] for c in report["checks"] if c["part"] == "decoder"} == {"present.0.key", "present.0.value"}
    # the oracle is the same 1-layer reference in float64: every K/V output reports both errors against it
    assert report["oracle"]["mode"] == "fp64" and "first 1 decoder layers" in report["oracle"]["reason"]
    assert {o["output"] for o in report["oracle"]["outputs"]} == {"image_features", "present.0.key", "present.0.value"}
    assert all(c["basis"] == "oracle" for c in report["checks"])

    bundle = tmp_path / "b"
    shutil.copytree(full_bundle, bundle)
    _scale_weight(bundle, "decoder", pick=lambda inits: next(t for t in inits if t.name.endswith("layers.0.input_layernorm.weight")))
    r = verify(bundle, "--layers", "1", "--json")
    assert r.exit_code == 1
    assert "decoder/present.0.key" in json.loads(r.stdout)["summary"]
    assert verify(bundle, "--layers", "9").exit_code == 2


def test_max_new_tokens_zero_is_refused_before_anything_loads(tmp_path):
    from vlexport.errors import VlexportError
    from vlexport.parity.verify import verify_bundle

    with pytest.raises(VlexportError, match="--max-new-tokens must be an integer of at least 1"):
        verify_bundle(tmp_path / "no-such-bundle", max_new_tokens=0)  # the bundle is never opened
    with pytest.raises(VlexportError, match="--oracle 'fp128'"):
        verify_bundle(tmp_path / "no-such-bundle", oracle="fp128")


def test_task_adapters_override_by_name(full_lora, bitfit_dump):
    from vlexport.errors import VlexportError
    from vlexport.parity.verify import reference_adapters

    recorded = {"path": str(bitfit_dump), "kind": "bitfit", "sha256": "0" * 64}  # would be refused if it were read
    manifest = {"adapters": [], "tasks": {"vqa": {"adapters": [recorded]}, "ocr": {"adapters": []}}}
    with pytest.raises(VlexportError, match="no task 'nosuch' .*its tasks: ocr, vqa"):
        reference_adapters(manifest, [f"nosuch={full_lora}"])
    base, tasks = reference_adapters(manifest, [f"vqa={full_lora}"])
    assert base == [] and [a.kind for a in tasks["vqa"]] == ["lora"] and tasks["ocr"] == []
    base, tasks = reference_adapters({**manifest, "tasks": {}}, [str(full_lora), str(bitfit_dump)])
    assert [a.kind for a in base] == ["lora", "bitfit"] and tasks == {}


def test_progress_advances_once_per_case(full_bundle, tmp_path, photos):
    """verify reports progress through log.track (the CLI's Reporter); a plain callable gets none."""
    import contextlib

    from vlexport.parity.verify import verify_bundle

    photos["rocket"].save(tmp_path / "rocket.png")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"image": "rocket.png", "prompt": p}) + "\n"
                                                    for p in ("One?", "Two?")))
    events = []

    class Log:
        def __call__(self, msg):
            events.append(("line", msg))

        @contextlib.contextmanager
        def track(self, description, total=None):
            events.append(("track", description, total))
            yield lambda n=1, note=None: events.append(("advance", n, note))

    report = verify_bundle(full_bundle, data=tmp_path, max_new_tokens=2, oracle="off", log=Log())
    assert report["passed"] and report["oracle"]["mode"] == "off"
    assert [e for e in events if e[0] == "track"] == [("track", "verify", 2)]
    assert [e[2] for e in events if e[0] == "advance"] == ["rocket.png/l1", "rocket.png/l2"]
    assert any(e[0] == "line" and "parity oracle: off (--oracle off)" in e[1] for e in events)

"""Bad input: exit code 2, a message naming the file/tensor/option and the fix, and nothing at -o."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from vlexport.cli import app


def build(base, adapters, out, *extra):
    args = ["build", "--base", str(base), "-o", str(out), "--no-verify", *extra]
    for a in adapters:
        args += ["--adapter", str(a)]
    return CliRunner().invoke(app, args)


def assert_clean_exit(result):
    """No exception escaped the command: CliRunner catches them (so "Traceback" never shows in its output); a
    clean exit leaves result.exception None or a SystemExit (typer.Exit)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"unexpected {type(result.exception).__name__}: {result.exception}\n{result.output}")


def assert_refused(result, out, *needles):
    assert result.exit_code == 2, result.output
    for n in needles:
        assert n in result.output, (n, result.output)
    assert_clean_exit(result)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "partial output left behind"


def _lora_copy(full_lora, tmp_path, edit_state=None, edit_config=None):
    dst = tmp_path / "edited"
    shutil.copytree(full_lora, dst)
    if edit_state:
        state = load_file(str(dst / "adapter_model.safetensors"))
        edit_state(state)
        save_file(state, str(dst / "adapter_model.safetensors"))
    if edit_config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        edit_config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_missing_base(tmp_path):
    assert_refused(build(tmp_path / "nope", [], tmp_path / "out"), tmp_path / "out", "nope", "not a directory")


def test_non_llava_base(tmp_path, tiny_base):
    fake = tmp_path / "llama"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert_refused(build(fake, [], tmp_path / "out"), tmp_path / "out", "llama", "not LLaVA")


def test_key_that_maps_to_no_module(tmp_path, tiny_base, full_lora):
    key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"

    def edit(s):
        s[key.replace("layers.0", "layers.9")] = s[key].clone()
        s[key.replace("layers.0", "layers.9").replace("lora_A", "lora_B")] = s[key.replace("lora_A", "lora_B")].clone()

    adapter = _lora_copy(full_lora, tmp_path, edit)
    assert_refused(build(tiny_base, [adapter], tmp_path / "out"), tmp_path / "out", "layers.9.self_attn.q_proj", "maps to no module")


def test_shape_mismatch_names_both_shapes(tmp_path, tiny_base, full_lora):
    key = "base_model.model.model.language_model.layers.1.mlp.gate_proj.lora_A.weight"

    def edit(s):
        s[key] = torch.randn(s[key].shape[0], 48)

    adapter = _lora_copy(full_lora, tmp_path, edit)
    r = build(tiny_base, [adapter], tmp_path / "out")
    assert_refused(r, tmp_path / "out", "layers.1.mlp.gate_proj", "(8, 48)", "(8, 64)")


def test_nan_in_adapter(tmp_path, tiny_base, bitfit_dump):
    state = load_file(str(bitfit_dump))
    key = sorted(state)[0]
    state[key][0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad))
    assert_refused(build(tiny_base, [bad], tmp_path / "out"), tmp_path / "out", str(bad), key, "NaN")


def test_truncated_safetensors(tmp_path, tiny_base, bitfit_dump):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(bitfit_dump.read_bytes()[:-100])
    assert_refused(build(tiny_base, [bad], tmp_path / "out"), tmp_path / "out", str(bad), "truncated")


@pytest.mark.parametrize("option,value", [("init_lora_weights", "pissa"), ("layer_replication", [[0, 1]]), ("use_qalora", True)])
def test_unsupported_option(tmp_path, tiny_base, full_lora, option, value):
    adapter = _lora_copy(full_lora, tmp_path, edit_config=lambda c: c.update({option: value}))
    assert_refused(build(tiny_base, [adapter], tmp_path / "out"), tmp_path / "out", option)


def test_unknown_target(tmp_path, tiny_base):
    r = build(tiny_base, [], tmp_path / "out", "--target", "jetson-mars")
    assert_refused(r, tmp_path / "out", "jetson-mars", "cpu")


def test_existing_output_without_force(tmp_path, tiny_base):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = build(tiny_base, [], out)
    assert r.exit_code == 2 and "--force" in r.output
    assert_clean_exit(r)
    assert (out / "keep.txt").read_text() == "mine"


def test_unreadable_image(tmp_path, full_bundle):
    bad = tmp_path / "photo.jpg"
    bad.write_text("not an image")
    r = CliRunner().invoke(app, ["run", str(full_bundle), "--image", str(bad), "--prompt", "hi"])
    assert r.exit_code == 2 and "photo.jpg" in r.output and "not a readable image" in r.output
    assert_clean_exit(r)


def test_pickle_with_code_is_refused(tmp_path, tiny_base):
    """Only weights_only pickles load: an arbitrary object in a .bin is refused, never executed."""
    bad = tmp_path / "adapter.bin"
    torch.save({"model.multi_modal_projector.linear_1.bias": torch.zeros(3), "x": __import__("pathlib").Path("payload")}, bad)
    r = build(tiny_base, [bad], tmp_path / "out", "--adapter-kind", "bitfit")
    assert_refused(r, tmp_path / "out", "adapter.bin", "weights_only")


def test_unsupported_peft_type_refused_by_name(tmp_path, tiny_base):
    d = tmp_path / "prompt"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}))
    assert_refused(build(tiny_base, [d], tmp_path / "out"), tmp_path / "out", "prompt tuning")


@pytest.mark.slow  # ~40 s; by default test_precision's naive INT8 build fails its gate and leaves no bundle, and
# test_cli::test_a_failed_check_is_exit_1_with_the_error_as_json checks that ParityError exits 1 cleanly
def test_parity_failure_writes_nothing(tmp_path, tiny_base, full_lora):
    """A build whose parity gate fails exits 1 and leaves no bundle. --oracle off: the fixed limit alone decides
    (with the float64 oracle, a limit of 0 still passes a bundle within oracle_k of PyTorch FP32's own error)."""
    strict = tmp_path / "strict.toml"
    from vlexport.target import TARGETS_DIR

    text = (TARGETS_DIR / "cpu.toml").read_text().replace("logit_rel_tol = 1e-4", "logit_rel_tol = 0.0")
    strict.write_text(text)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["build", "--base", str(tiny_base), "--adapter", str(full_lora), "--target", str(strict), "-o", str(out), "--oracle", "off"])
    assert r.exit_code == 1, r.output
    assert_clean_exit(r)
    assert "decoder/logits" in r.output
    assert not out.exists()

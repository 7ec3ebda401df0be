"""Target profiles are validated when they load: a key the gate does not know would otherwise drop its check."""

import math

import pytest

from vlexport.errors import VlexportError
from vlexport.target import TARGETS_DIR, Target, load_target

CPU = (TARGETS_DIR / "cpu.toml").read_text()


def _load(tmp_path, text):
    path = tmp_path / "mine.toml"
    path.write_text(text)
    return load_target(str(path))


@pytest.mark.parametrize("edit,needles", [
    # a misspelt threshold: named, with the closest known key
    (lambda t: t.replace("logit_rel_tol = 1e-4", "logit_rel_tl = 1e-4"), ["[parity.fp32]", "'logit_rel_tl'", "did you mean 'logit_rel_tol'"]),
    (lambda t: t.replace('name = "cpu"', 'name = "cpu"\nbakend = "onnxruntime"'), ["unknown key 'bakend'", "did you mean 'backend'"]),
    (lambda t: t.replace('decoder = "fp32"', 'decoder = "fp32"\nvison = "fp32"'), ["[precision]", "'vison'", "did you mean 'vision'"]),
    (lambda t: t.replace("context = 4096", "context = 4096\nbatchs = [1, 1, 1]"), ["[shapes]", "did you mean 'batch'"]),
    (lambda t: t + "\n[builder]\noptimisation_level = 3\n", ["[builder]", "did you mean 'optimization_level'"]),
    (lambda t: t + "\n[int8]\ncalibraton = \"minmax\"\n", ["[int8]", "did you mean 'calibration'"]),
    (lambda t: t + "\n[parity.fp61]\nexport_rel_tol = 1e-2\ntop1_min = 0.9\n", ["[parity.fp61]", "did you mean [parity.fp16]"]),
    (lambda t: t.replace("export_rel_tol = 1e-4\n", ""), ["[parity.fp32] has no export_rel_tol", "add it"]),
    # a section with no threshold: its gate would check nothing
    (lambda t: t + "\n[parity.fp16]\nexport_rel_tol = 1e-2\n", ["[parity.fp16] has no parity threshold", "logit_rel_tol"]),
    (lambda t: t + "\n[parity.fp16]\nexport_rel_tol = 1e-2\ntop1_min = 0.9\noracle_k = 2\n", ["'oracle_k'", "belongs in [parity.fp32]"]),
    (lambda t: t.replace("oracle_k = 2", "oracle_k = 1e9"), ["oracle_k = 1000000000.0", "(0, 10]"]),
    (lambda t: t.replace("oracle_k = 2", "oracle_k = inf"), ["oracle_k = inf", "finite"]),
    (lambda t: t.replace("logit_rel_tol = 1e-4", "logit_rel_tol = nan"), ["logit_rel_tol = nan", "finite"]),
    (lambda t: t.replace("logit_rel_tol = 1e-4", 'logit_rel_tol = "1e-4"'), ["logit_rel_tol = '1e-4'", "finite number"]),
    (lambda t: t.replace("vision_cosine_min = 0.99999", "vision_cosine_min = 99.999"), ["vision_cosine_min", "[0, 1]"]),
    (lambda t: t.replace('decoder = "fp32"', 'decoder = "fp16"'), ["no [parity.fp16]"]),
])
def test_bad_profile_is_refused_naming_file_and_key(tmp_path, edit, needles):
    text = edit(CPU)
    assert text != CPU
    with pytest.raises(VlexportError) as e:
        _load(tmp_path, text)
    assert "mine.toml" in str(e.value)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_shipped_profiles_set_oracle_k():
    from vlexport.target import available_targets

    for name in available_targets():
        assert load_target(name).parity["fp32"]["oracle_k"] == 2, name


def test_recorded_target_is_validated_too():
    """A manifest may have recorded an older profile with a typo: its check never ran, so verify refuses it."""
    from vlexport.parity.verify import thresholds_for

    target = load_target("cpu").to_dict()
    assert Target.from_dict(target) == load_target("cpu")
    bad = {**target, "parity": {"fp32": {**target["parity"]["fp32"], "logit_rel_tl": 1e-4}}}
    with pytest.raises(VlexportError, match="manifest.*'logit_rel_tl'.*did you mean 'logit_rel_tol'"):
        Target.from_dict(bad)
    manifest = {"target": bad, "parts": {p: {"precision": "fp32"} for p in ("vision", "embed", "decoder")}}
    with pytest.raises(VlexportError, match="'logit_rel_tl'"):
        thresholds_for(manifest)
    manifest["target"] = {**target, "parity": {}}
    with pytest.raises(VlexportError, match=r"no \[parity.fp32\]"):
        thresholds_for(manifest)
    with pytest.raises(VlexportError, match="unknown key 'colour'"):
        Target.from_dict({**target, "colour": "red"})
    with pytest.raises(VlexportError, match="has no 'backend'"):
        Target.from_dict({k: v for k, v in target.items() if k != "backend"})


def test_profile_without_oracle_k_loads_and_reports_fixed_limits(tmp_path):
    t = _load(tmp_path, CPU.replace("oracle_k = 2\n", ""))
    assert "oracle_k" not in t.parity["fp32"]
    from vlexport.parity.verify import oracle_gated

    manifest = {"target": t.to_dict(), "parts": {p: {"precision": "fp32"} for p in ("vision", "embed", "decoder")}}
    assert oracle_gated(manifest) == ({}, None)
    assert math.isclose(oracle_gated({**manifest, "target": load_target("cpu").to_dict()})[1], 2)

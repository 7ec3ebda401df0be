"""PEFT's other mergeable methods (AdaLoRA, VeRA, IA3, LoHa, LoKr, OFT, BOFT and the rest of SUPPORTED_TYPES).

Every adapter is made with the real PEFT (vlexport.fixture.make_peft_adapter) over the vision tower, projector and
language model, and moved off PEFT's identity init. Each merge is compared with PEFT's own merge_and_unload (1e-5)
and must differ from the base in all three places; the reference is PEFT's unmerged forward, loaded here from the
adapter directory PEFT wrote (no vlexport code in it).
"""

import json

import pytest
import torch
from typer.testing import CliRunner

from vlexport.adapters import load_adapter, merge_adapters
from vlexport.adapters.peft_methods import SUPPORTED_TYPES
from vlexport.cli import app
from vlexport.errors import VlexportError
from vlexport.fixture import PEFT_METHOD_OPTIONS, make_lora, make_peft_adapter
from vlexport.model import load_llava

REQUIRED = ["ADALORA", "VERA", "IA3", "LOHA", "LOKR", "OFT", "BOFT"]
OTHERS = [t for t in SUPPORTED_TYPES if t not in REQUIRED]
PROMPT = "USER: <image>\nWhat is shown here? ASSISTANT:"


def _peft_merged(base, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_llava(base), str(adapter_dir)).merge_and_unload().state_dict()


def _peft_unmerged(base, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_llava(base), str(adapter_dir)).eval()


def _ours(base, *adapters):
    model = load_llava(base)
    merge_adapters(model, [load_adapter(a) if not hasattr(a, "kind") else a for a in adapters])
    return model


def _assert_merge(ours, expected, base):
    """ours ≈ expected everywhere (1e-5), and the adapter moved weights in the vision tower, projector and LM."""
    changed = set()
    assert set(ours) == set(expected)
    for name, want in expected.items():
        got = ours[name]
        assert got.shape == want.shape, name
        assert torch.allclose(got, want, atol=1e-5, rtol=0), f"{name}: max diff {(got - want).abs().max()}"
        if name in base and (want - base[name]).abs().max() > 1e-4:
            changed.add(next(p for p in ("vision_tower", "multi_modal_projector", "language_model", "lm_head") if p in name))
    assert changed >= {"vision_tower", "multi_modal_projector", "language_model"}, changed


@pytest.fixture(scope="module")
def base_states(tiny_base, tiny_gqa_base):
    return {"tiny": load_llava(tiny_base).state_dict(), "tiny-gqa": load_llava(tiny_gqa_base).state_dict()}


def _cases():
    for t in SUPPORTED_TYPES:
        yield pytest.param(t, "tiny", id=f"{t}-tiny")
        marks = () if t in REQUIRED else (pytest.mark.slow,)
        yield pytest.param(t, "tiny-gqa", id=f"{t}-tiny-gqa", marks=marks)


@pytest.mark.parametrize("peft_type,preset", list(_cases()))
def test_merge_matches_peft_merge_and_unload(peft_type, preset, tiny_base, tiny_gqa_base, base_states, tmp_path):
    base = tiny_base if preset == "tiny" else tiny_gqa_base
    adapter = make_peft_adapter(base, tmp_path / peft_type, peft_type, seed=len(peft_type))
    _assert_merge(_ours(base, adapter).state_dict(), _peft_merged(base, adapter), base_states[preset])


@pytest.mark.parametrize("peft_type", ["OFT", pytest.param("IA3", marks=pytest.mark.slow)])
def test_fp16_model_merges_each_module_in_fp32(peft_type, tiny_base, tmp_path):
    """The low-memory path (an fp16 model): each module is lifted to fp32 for PEFT's merge and cast back once, which
    is PEFT's fp32 merge_and_unload of the same (fp16-rounded) base, rounded to fp16 once."""
    from peft import PeftModel

    adapter = make_peft_adapter(tiny_base, tmp_path / peft_type, peft_type, seed=4)
    rounded = load_llava(tiny_base).half().float()
    want = PeftModel.from_pretrained(rounded, str(adapter)).merge_and_unload().half().state_dict()
    model = load_llava(tiny_base, dtype="float16")
    merge_adapters(model, [load_adapter(adapter)])
    got = model.state_dict()
    base = load_llava(tiny_base, dtype="float16").state_dict()
    assert all(v.dtype == torch.float16 for v in got.values())
    for name, value in want.items():
        assert torch.equal(got[name], value), f"{name}: {(got[name].float() - value.float()).abs().max()}"
    assert sum(not torch.equal(got[n], base[n]) for n in base) >= 23


def test_modules_to_save_next_to_a_method(tiny_base, base_states, tmp_path):
    """A full copy of lm_head trained next to LoKr on the vision tower: PEFT's unload puts the copy in place."""
    adapter = make_peft_adapter(tiny_base, tmp_path / "lokr", "LOKR", target_modules=r".*vision_tower.*\.fc1",
                                modules_to_save=["lm_head"])
    described = load_adapter(adapter).describe()
    assert described["parts"] == ["decoder", "vision"]  # lm_head is in the decoder part
    ours, want = _ours(tiny_base, adapter).state_dict(), _peft_merged(tiny_base, adapter)
    for name, value in want.items():
        assert torch.allclose(ours[name], value, atol=1e-6, rtol=0), name
    assert (ours["lm_head.weight"] - base_states["tiny"]["lm_head.weight"]).abs().max() > 1e-2


def test_every_listed_type_has_a_fixture():
    assert set(SUPPORTED_TYPES) == set(PEFT_METHOD_OPTIONS)


def _inputs(base, photos, name="chelsea", prompt=PROMPT):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(base))(images=photos[name], text=prompt, return_tensors="pt")


@pytest.mark.parametrize("peft_type", ["ADALORA", "IA3", pytest.param("VERA", marks=pytest.mark.slow),
                                       pytest.param("BOFT", marks=pytest.mark.slow)])
def test_reference_is_peft_unmerged_and_merged_matches_it(peft_type, tiny_base, tmp_path, photos):
    from vlexport.backends.torch_reference import build_reference

    adapter = make_peft_adapter(tiny_base, tmp_path / peft_type, peft_type, seed=7)
    inputs = _inputs(tiny_base, photos)
    with torch.no_grad():
        peft = _peft_unmerged(tiny_base, adapter)(**inputs).logits
        ref = build_reference(tiny_base, [load_adapter(adapter)])(**inputs).logits
        merged = _ours(tiny_base, adapter)(**inputs).logits
        base = load_llava(tiny_base)(**inputs).logits
    assert torch.allclose(ref, peft, atol=1e-6, rtol=0), (ref - peft).abs().max()
    assert torch.allclose(merged, peft, atol=1e-4, rtol=0), (merged - peft).abs().max()
    assert (peft - base).abs().max() > 1e-2


def _rewrite_layout(src, dst, rename_key, rename_module):
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    state = load_file(str(src / "adapter_model.safetensors"))
    save_file({rename_key(k): v for k, v in state.items()}, str(dst / "adapter_model.safetensors"))
    config = json.loads((src / "adapter_config.json").read_text())
    if config.get("peft_type") == "ADALORA" and config.get("rank_pattern"):  # module names at training time
        config["rank_pattern"] = {rename_module(k): v for k, v in config["rank_pattern"].items()}
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def _pre_452(k):
    return (k.replace("model.language_model.", "language_model.model.")
             .replace("model.vision_tower.", "vision_tower.vision_model.")
             .replace("model.multi_modal_projector.", "multi_modal_projector."))


def _module_pre_452(name):
    return _pre_452("base_model.model." + name)[len("base_model.model."):]


def _from_452(k):
    return k.replace("model.vision_tower.", "model.vision_tower.vision_model.")


LOHA_PATTERNS = {"rank_pattern": {"fc1": 2, "q_proj": 3}, "alpha_pattern": {"linear_1": 3}}


@pytest.mark.parametrize("peft_type,options,layout", [
    ("ADALORA", {}, "pre_4_52"), ("ADALORA", {}, "4_52_to_4_57"), ("LOHA", LOHA_PATTERNS, "pre_4_52"),
    ("VERA", {}, "4_52_to_4_57"),
    *[pytest.param(t, o, lay, marks=pytest.mark.slow) for t, o, lay in
      [("IA3", {}, "pre_4_52"), ("IA3", {}, "4_52_to_4_57"), ("VERA", {}, "pre_4_52"), ("LOHA", LOHA_PATTERNS, "4_52_to_4_57")]],
])
def test_old_key_layouts_merge_identically(peft_type, options, layout, tiny_base, tmp_path):
    adapter = make_peft_adapter(tiny_base, tmp_path / "new", peft_type, seed=3, **options)
    if layout == "pre_4_52":
        old = _rewrite_layout(adapter, tmp_path / layout, lambda k: "base_model.model." + _pre_452(k[len("base_model.model."):])
                              if k.startswith("base_model.model.") else k, _module_pre_452)
    else:
        old = _rewrite_layout(adapter, tmp_path / layout, _from_452, _from_452)
    assert set(load_adapter(old).source_keys.values()) != set(load_adapter(adapter).source_keys.values())
    want = _peft_merged(tiny_base, adapter)
    got = _ours(tiny_base, old).state_dict()
    for name, value in want.items():
        assert torch.allclose(got[name], value, atol=1e-6, rtol=0), name
    assert load_adapter(old).describe()["parts"] == ["decoder", "vision"]


def test_inspect_shows_type_targets_and_size(tiny_base, tmp_path):
    adapter = make_peft_adapter(tiny_base, tmp_path / "ia3", "IA3")
    r = CliRunner().invoke(app, ["inspect", str(adapter), "--json"])
    assert r.exit_code == 0, r.output
    from test_cli import validate

    info = validate("inspect", r.stdout)  # the README's schema
    assert info["kind"] == "peft" and info["type"] == "IA3" and info["modules"] == 23
    assert {"q_proj", "fc1", "linear_1", "down_proj"} <= set(info["targets"])
    assert info["parameters"] > 0 and info["bytes"] == 4 * info["parameters"]


# -- several adapters of different types --------------------------------------------------------------------------
@pytest.mark.parametrize("order", ["lora_then_ia3", "ia3_then_lora"])
def test_lora_and_ia3_compose_as_one_after_the_other(order, tiny_base, tmp_path, photos):
    """PEFT cannot stack LoRA and IA3 on one module. The reference nests them in the order given; that must equal
    merging the first with PEFT and applying the second unmerged with PEFT, and the build's merge must equal it."""
    from peft import PeftModel

    from vlexport.backends.torch_reference import build_reference

    lora = make_lora(tiny_base, tmp_path / "lora", seed=21)
    ia3 = make_peft_adapter(tiny_base, tmp_path / "ia3", "IA3", seed=22)
    first, second = (lora, ia3) if order == "lora_then_ia3" else (ia3, lora)
    inputs = _inputs(tiny_base, photos)
    with torch.no_grad():
        one_after_other = PeftModel.from_pretrained(
            PeftModel.from_pretrained(load_llava(tiny_base), str(first)).merge_and_unload(), str(second)).eval()
        want = one_after_other(**inputs).logits
        ref = build_reference(tiny_base, [load_adapter(first), load_adapter(second)])(**inputs).logits
        merged = _ours(tiny_base, first, second)(**inputs).logits
        swapped = _ours(tiny_base, second, first)(**inputs).logits
    assert torch.allclose(ref, want, atol=1e-5, rtol=0), (ref - want).abs().max()
    assert torch.allclose(merged, want, atol=1e-4, rtol=0), (merged - want).abs().max()
    assert (swapped - want).abs().max() > 1e-3  # the order matters, so the test above can fail


# -- refusals -----------------------------------------------------------------------------------------------------
def test_shapes_from_another_base_are_refused_by_tensor(tiny_base, tiny_gqa_base, tmp_path):
    adapter = make_peft_adapter(tiny_base, tmp_path / "ia3", "IA3")  # k_proj/v_proj are 64 wide, 32 on tiny-gqa
    model = load_llava(tiny_gqa_base)
    with pytest.raises(VlexportError, match=r"k_proj\.ia3_l.*shape \(64, 1\).*\(32, 1\).*--base"):
        merge_adapters(model, [load_adapter(adapter)])


def test_unknown_module_is_refused(tiny_base, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = make_peft_adapter(tiny_base, tmp_path / "loha", "LOHA")
    state = load_file(str(adapter / "adapter_model.safetensors"))
    state = {k.replace("layers.1.", "layers.7."): v for k, v in state.items()}
    save_file(state, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(VlexportError, match=r"layers\.7\..*maps to no module"):
        merge_adapters(load_llava(tiny_base), [load_adapter(adapter)])


@pytest.mark.parametrize("option,value,needle", [
    ("fan_in_fan_out", True, "Conv1D"),
    ("target_parameters", ["mlp.experts"], "nn.Parameters"),
    ("init_lora_weights", "pissa", "changes the base"),
])
def test_options_that_cannot_merge_are_refused_by_name(option, value, needle, tiny_base, tmp_path):
    adapter = make_peft_adapter(tiny_base, tmp_path / "a", "ADALORA")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config[option] = value
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(VlexportError, match=rf"{option}=.*{needle}"):
        load_adapter(adapter)


def test_unmerged_peft_types_are_refused_with_the_reason(tiny_base, tmp_path):
    adapter = make_peft_adapter(tiny_base, tmp_path / "a", "IA3")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["peft_type"] = "LILY"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(VlexportError, match="LILY.*cannot merge"):
        load_adapter(adapter)
    config["peft_type"] = "POLY"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(app, ["inspect", str(adapter)])
    assert r.exit_code == 2 and "POLY" in r.output


# -- build + run --------------------------------------------------------------------------------------------------
def _build_and_run(base, adapters, out, photos, tmp_path, extra=()):
    args = ["build", "--base", str(base), "-o", str(out), *extra]
    for a in adapters:
        args += ["--adapter", str(a)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"]
    photos["astronaut"].save(tmp_path / "a.png")
    r = CliRunner().invoke(app, ["run", str(out), "--image", str(tmp_path / "a.png"), "--raw-prompt", PROMPT,
                                 "--max-new-tokens", "24", "--json"])
    assert r.exit_code == 0, r.output
    return manifest, json.loads(r.stdout)["token_ids"]


def _peft_greedy(model, base, photos):
    from transformers import AutoProcessor

    inputs = AutoProcessor.from_pretrained(str(base))(images=photos["astronaut"], text=PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


# Per type, how far the e2e fixtures move off PEFT's init (0.3 otherwise). RoAd and HiRA at 0.3 leave the 24 greedy
# tokens as the base's, so the token test could not fail; GraLoRA at 0.3 makes a model so large-valued that FP32's own
# rounding reaches verify's limit (measured 1.14e-4 against the 1e-4 gate), far from a trained adapter's size.
E2E_SCALE = {"ROAD": 1.0, "HIRA": 1.0, "GRALORA": 0.1}


def _e2e_cases():
    for t in REQUIRED:
        for preset in ("tiny", "tiny-gqa"):
            yield pytest.param(t, preset, id=f"{t}-{preset}", marks=pytest.mark.slow)
    for t in OTHERS:
        yield pytest.param(t, "tiny", id=f"{t}-tiny", marks=pytest.mark.slow)


@pytest.mark.parametrize("peft_type,preset", list(_e2e_cases()))
def test_build_verifies_and_run_matches_peft_unmerged_greedy(peft_type, preset, tiny_base, tiny_gqa_base, tmp_path, photos):
    base = tiny_base if preset == "tiny" else tiny_gqa_base
    adapter = make_peft_adapter(base, tmp_path / "adapter", peft_type, seed=9, scale=E2E_SCALE.get(peft_type, 0.3))
    manifest, tokens = _build_and_run(base, [adapter], tmp_path / "bundle", photos, tmp_path)
    assert manifest["adapters"][0]["type"] == SUPPORTED_TYPES[peft_type]
    assert tokens == _peft_greedy(_peft_unmerged(base, adapter), base, photos)
    assert tokens != _peft_greedy(load_llava(base), base, photos)


@pytest.mark.slow  # ~40 s; the default run keeps each type's merge vs PEFT, the LoRA+IA3 order test, and LoRA builds
def test_three_methods_in_order_build_verify_and_run(tiny_base, tmp_path, photos):
    """IA3, then VeRA, then LoHa on the same modules, in one bundle: verify passes, and `run` gives the tokens of
    PEFT applying them one after the other (the first two merged by PEFT, the last unmerged)."""
    from peft import PeftModel

    adapters = [make_peft_adapter(tiny_base, tmp_path / t, t, seed=30 + i, scale=0.3)
                for i, t in enumerate(("IA3", "VERA", "LOHA"))]
    manifest, tokens = _build_and_run(tiny_base, adapters, tmp_path / "bundle", photos, tmp_path)
    assert [a["type"] for a in manifest["adapters"]] == ["IA3", "VeRA", "LoHa"]
    model = load_llava(tiny_base)
    for a in adapters[:-1]:
        model = PeftModel.from_pretrained(model, str(a)).merge_and_unload()
    expected = _peft_greedy(PeftModel.from_pretrained(model, str(adapters[-1])).eval(), tiny_base, photos)
    assert tokens == expected
    assert tokens != _peft_greedy(load_llava(tiny_base), tiny_base, photos)


@pytest.mark.slow
def test_bank_with_ia3_and_vera_tasks_merges_each_for_its_task(tiny_base, tmp_path, photos):
    """--lora-mode merged: a named IA3 or VeRA task is merged for that task (its own copy of the parts it changes),
    and each task answers with PEFT's unmerged tokens for its adapter."""
    import vlexport

    ia3 = make_peft_adapter(tiny_base, tmp_path / "ia3", "IA3", seed=51, scale=0.3)
    vera = make_peft_adapter(tiny_base, tmp_path / "vera", "VERA", seed=52, scale=0.3)
    out = tmp_path / "bank"
    r = CliRunner().invoke(app, ["build", "--base", str(tiny_base), "--adapter", f"ia3={ia3}", "--adapter", f"vera={vera}",
                                 "--lora-mode", "merged", "-o", str(out)])  # (swappable: tests/test_peft_slots.py)
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and set(manifest["tasks"]) == {"ia3", "vera"}
    assert all(manifest["tasks"][t]["parts_bytes"] > 0 for t in ("ia3", "vera"))
    bundle = vlexport.load(out)
    for task, adapter in (("ia3", ia3), ("vera", vera)):
        got = bundle.generate(photos["astronaut"], raw_prompt=PROMPT, max_new_tokens=24, task=task).token_ids
        assert got == _peft_greedy(_peft_unmerged(tiny_base, adapter), tiny_base, photos), task

"""Single-file LoRA: kohya/sd-scripts, mlx-lm and a bare PEFT-style safetensors, each written here by hand in its
documented key layout from a PEFT LoRA's tensors, must merge to PEFT's own merge_and_unload of that LoRA (1e-5),
and the reference must be PEFT's unmerged forward of it."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from vlexport.adapters import load_adapter, merge_adapters
from vlexport.cli import app
from vlexport.errors import VlexportError
from vlexport.fixture import make_lora
from vlexport.model import load_llava

PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def peft_lora(tiny_base, tmp_path_factory):
    """Ranks and alphas that differ per module, so a format that loses either shows."""
    return make_lora(tiny_base, tmp_path_factory.mktemp("sf") / "peft", seed=41, r=8, lora_alpha=16,
                     rank_pattern={"v_proj": 4}, alpha_pattern={"fc1": 5})


@pytest.fixture(scope="module")
def uniform_lora(tiny_base, tmp_path_factory):
    return make_lora(tiny_base, tmp_path_factory.mktemp("sf") / "uniform", seed=42, r=8, lora_alpha=16)


@pytest.fixture(scope="module")
def states(tiny_base, peft_lora, uniform_lora):
    from peft import PeftModel

    def merged(d):
        return PeftModel.from_pretrained(load_llava(tiny_base), str(d)).merge_and_unload().state_dict()

    return {"base": load_llava(tiny_base).state_dict(), "peft": merged(peft_lora), "uniform": merged(uniform_lora)}


def _modules(adapter_dir):
    """{transformers 5 module name: (A [r, in], B [out, r])} from a PEFT LoRA directory."""
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    out = {}
    for key, value in state.items():
        module, slot = key[len(PREFIX):].rsplit(".lora_", 1)
        out.setdefault(module, [None, None])["AB".index(slot[0])] = value
    return out


def _alpha(module):  # the alpha_pattern of peft_lora
    return 5.0 if module.endswith("fc1") else 16.0


def _kohya_name(module):
    """kohya names modules by the model it trained; here each part in another layout, dots as underscores."""
    if module.startswith("model.language_model."):
        return "lora_te_" + module.replace("model.language_model.", "model.").replace(".", "_")  # a Llama's own names
    if module.startswith("model.vision_tower."):
        return "lora_unet_" + module.replace("model.vision_tower.", "vision_tower.vision_model.").replace(".", "_")
    return "lora_unet_" + module.replace(".", "_")


def _merge(base, path, **kw):
    model = load_llava(base)
    merge_adapters(model, [load_adapter(path, **kw)])
    return model.state_dict()


def _assert_same(got, want, base):
    assert set(got) == set(want)
    changed = 0
    for name, value in want.items():
        assert torch.allclose(got[name], value, atol=1e-5, rtol=0), f"{name}: {(got[name] - value).abs().max()}"
        changed += int((value - base[name]).abs().max() > 1e-3)
    assert changed >= 20


def test_kohya_merges_like_the_peft_lora(tiny_base, peft_lora, states, tmp_path):
    state = {}
    for module, (A, B) in _modules(peft_lora).items():
        name = _kohya_name(module)
        state[f"{name}.lora_down.weight"] = A
        state[f"{name}.lora_up.weight"] = B
        state[f"{name}.alpha"] = torch.tensor(_alpha(module))
    path = tmp_path / "kohya.safetensors"
    save_file(state, str(path))
    adapter = load_adapter(path)
    assert adapter.format == "kohya" and sorted(adapter.describe()["parts"]) == ["decoder", "vision"]
    _assert_same(_merge(tiny_base, path), states["peft"], states["base"])


def test_kohya_without_alpha_keys_takes_alpha_r_as_kohya_does(tiny_base, uniform_lora, states, tmp_path):
    """kohya's loader gives a module without an .alpha key alpha = r; --lora-alpha says otherwise."""
    state = {}
    for module, (A, B) in _modules(uniform_lora).items():
        state[f"{_kohya_name(module)}.lora_down.weight"] = A
        state[f"{_kohya_name(module)}.lora_up.weight"] = 2 * B  # alpha 16 / r 8 folded into B
    path = tmp_path / "kohya.safetensors"
    save_file(state, str(path))
    _assert_same(_merge(tiny_base, path), states["uniform"], states["base"])
    halved = _merge(tiny_base, path, lora_alpha=4.0)  # scale 0.5 instead of 1
    name = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(halved[name], states["uniform"][name], atol=1e-3)


def test_kohya_key_that_names_no_llava_module_is_refused(tmp_path):
    path = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(2, 4),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(4, 2)}, str(path))
    with pytest.raises(VlexportError, match="down_blocks_0.*does not name a LLaVA module"):
        load_adapter(path)


def _write_mlx(adapter_dir, out, params):
    out.mkdir()
    state = {}
    for module, (A, B) in _modules(adapter_dir).items():
        old = module.replace("model.language_model.", "language_model.model.")  # mlx-vlm's LLaVA keys
        old = old.replace("model.vision_tower.", "vision_tower.vision_model.").replace("model.multi_modal_projector.", "multi_modal_projector.")
        state[f"{old}.lora_a"] = A.T.contiguous()
        state[f"{old}.lora_b"] = B.T.contiguous()
    save_file(state, str(out / "adapters.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora", "num_layers": 2,
                                                         "lora_parameters": params}))
    return out


def test_mlx_merges_like_the_peft_lora(tiny_base, uniform_lora, states, tmp_path):
    mlx = _write_mlx(uniform_lora, tmp_path / "mlx", {"rank": 8, "scale": 2.0, "dropout": 0.0})
    assert load_adapter(mlx).format == "mlx"
    _assert_same(_merge(tiny_base, mlx), states["uniform"], states["base"])
    _assert_same(_merge(tiny_base, mlx / "adapters.safetensors"), states["uniform"], states["base"])


def test_mlx_without_scale_needs_lora_alpha(tiny_base, uniform_lora, states, tmp_path):
    mlx = _write_mlx(uniform_lora, tmp_path / "mlx", {"rank": 8, "dropout": 0.0})
    with pytest.raises(VlexportError, match="--lora-alpha"):
        load_adapter(mlx)
    _assert_same(_merge(tiny_base, mlx, lora_alpha=16.0), states["uniform"], states["base"])


def test_mlx_dora_is_refused(uniform_lora, tmp_path):
    mlx = _write_mlx(uniform_lora, tmp_path / "mlx", {"rank": 8, "scale": 2.0})
    (mlx / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "dora", "lora_parameters": {"rank": 8}}))
    with pytest.raises(VlexportError, match="fine_tune_type='dora'"):
        load_adapter(mlx)


def _bare(adapter_dir, path, metadata=None):
    save_file(load_file(str(adapter_dir / "adapter_model.safetensors")), str(path), metadata=metadata)
    return path


def test_bare_file_with_diffusers_metadata(tiny_base, peft_lora, states, tmp_path):
    config = json.loads((peft_lora / "adapter_config.json").read_text())
    path = _bare(peft_lora, tmp_path / "lora.safetensors", {"lora_adapter_metadata": json.dumps(config)})
    _assert_same(_merge(tiny_base, path), states["peft"], states["base"])


def test_bare_file_with_plain_metadata(tiny_base, uniform_lora, states, tmp_path):
    path = _bare(uniform_lora, tmp_path / "lora.safetensors", {"lora_alpha": "16", "r": "8"})
    _assert_same(_merge(tiny_base, path), states["uniform"], states["base"])


def test_bare_file_without_alpha_is_refused_until_lora_alpha(tiny_base, uniform_lora, states, tmp_path):
    path = _bare(uniform_lora, tmp_path / "lora.safetensors")
    with pytest.raises(VlexportError, match=r"lora\.safetensors.*alpha cannot be.*--lora-alpha"):
        load_adapter(path)
    r = CliRunner().invoke(app, ["inspect", str(path)])
    assert r.exit_code == 2 and "--lora-alpha" in r.output
    r = CliRunner().invoke(app, ["inspect", str(path), "--lora-alpha", "16", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["lora_alpha_given"] == 16.0
    _assert_same(_merge(tiny_base, path, lora_alpha=16), states["uniform"], states["base"])


def test_reference_of_a_single_file_is_peft_unmerged_of_the_same_lora(tiny_base, peft_lora, tmp_path, photos):
    """kohya's per-module ranks and alphas reach PEFT's reference too (pinned by exact module name)."""
    from peft import PeftModel
    from transformers import AutoProcessor

    from vlexport.backends.torch_reference import build_reference

    state = {}
    for module, (A, B) in _modules(peft_lora).items():
        state[f"{_kohya_name(module)}.lora_down.weight"] = A
        state[f"{_kohya_name(module)}.lora_up.weight"] = B
        state[f"{_kohya_name(module)}.alpha"] = torch.tensor(_alpha(module))
    save_file(state, str(tmp_path / "kohya.safetensors"))
    inputs = AutoProcessor.from_pretrained(str(tiny_base))(images=photos["rocket"], text="USER: <image>\nhi ASSISTANT:",
                                                          return_tensors="pt")
    with torch.no_grad():
        want = PeftModel.from_pretrained(load_llava(tiny_base), str(peft_lora)).eval()(**inputs).logits
        got = build_reference(tiny_base, [load_adapter(tmp_path / "kohya.safetensors")])(**inputs).logits
        base = load_llava(tiny_base)(**inputs).logits
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert (want - base).abs().max() > 1e-2


@pytest.mark.slow
def test_build_with_lora_alpha_and_run_match_peft(tiny_base, uniform_lora, tmp_path, photos):
    from peft import PeftModel
    from transformers import AutoProcessor

    path = _bare(uniform_lora, tmp_path / "lora.safetensors")
    out = tmp_path / "bundle"
    r = CliRunner().invoke(app, ["build", "--base", str(tiny_base), "--adapter", str(path), "--lora-alpha", "16", "-o", str(out)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["verify", str(out)])
    assert r.exit_code == 0, r.output
    photos["coffee"].save(tmp_path / "c.png")
    prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    r = CliRunner().invoke(app, ["run", str(out), "--image", str(tmp_path / "c.png"), "--raw-prompt", prompt,
                                 "--max-new-tokens", "24", "--json"])
    assert r.exit_code == 0, r.output
    inputs = AutoProcessor.from_pretrained(str(tiny_base))(images=photos["coffee"], text=prompt, return_tensors="pt")
    with torch.no_grad():
        ref = PeftModel.from_pretrained(load_llava(tiny_base), str(uniform_lora)).eval()
        expected = ref.generate(**inputs, max_new_tokens=24, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    assert json.loads(r.stdout)["token_ids"] == expected

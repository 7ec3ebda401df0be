"""Merging against PEFT's own merge_and_unload, for every LoRA option and key layout we accept.

Each adapter is initialised to non-identity values; every test asserts merged ≈ PEFT-merged (1e-5) and merged ≠ base.
"""

import json

import pytest
import torch

from vlexport.adapters import load_adapter, merge_adapters
from vlexport.fixture import make_lora
from vlexport.model import load_llava

VARIANTS = {
    "plain": {},
    "dora": {"use_dora": True},
    "rslora_patterns": {"use_rslora": True, "rank_pattern": {"v_proj": 3, "fc1": 2}, "alpha_pattern": {"down_proj": 7}},
    "lora_bias": {"lora_bias": True, "target_modules": r".*(vision_tower.*\.(q_proj|fc1)|multi_modal_projector\.linear_1)"},
    "bias_all": {"bias": "all"},
    "bias_lora_only": {"bias": "lora_only"},
    "modules_to_save_lm_head": {"modules_to_save": ["lm_head"]},
    "embedding": {"target_modules": r".*(language_model\.embed_tokens|q_proj)"},
    "embedding_dora": {"target_modules": r".*language_model\.embed_tokens", "use_dora": True},
    "conv2d": {"target_modules": r".*(patch_embedding|linear_2)"},
    "conv2d_dora": {"target_modules": r".*patch_embedding", "use_dora": True},
    "trainable_tokens": {"target_modules": r".*o_proj", "trainable_token_indices": {"embed_tokens": [3, 17, 40]}},
}


def _peft_merged(base, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_llava(base), str(adapter_dir)).merge_and_unload().state_dict()


def _ours(base, adapter_path, **kw):
    model = load_llava(base)
    merge_adapters(model, [load_adapter(adapter_path, **kw)])
    return model


def _assert_merge(ours_state, expected_state, base_state):
    changed = 0
    for name, expected in expected_state.items():
        got = ours_state[name]
        assert got.shape == expected.shape, name
        assert torch.allclose(got, expected, atol=1e-5, rtol=0), f"{name}: max diff {(got - expected).abs().max()}"
        if name in base_state and (expected - base_state[name]).abs().max() > 1e-3:
            changed += 1
    assert changed > 0, "the adapter changed nothing: the test would pass trivially"
    for name in ours_state:
        assert name in expected_state or name.endswith(".bias"), f"unexpected parameter {name}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_merge_matches_peft(tiny_base, tmp_path, variant):
    adapter = make_lora(tiny_base, tmp_path / variant, seed=hash(variant) % 1000, **VARIANTS[variant])
    base_state = load_llava(tiny_base).state_dict()
    expected = _peft_merged(tiny_base, adapter)
    ours = _ours(tiny_base, adapter).state_dict()
    _assert_merge(ours, expected, base_state)


def test_merged_model_matches_unmerged_forward(tiny_base, full_lora, photos):
    """The merged weights give the logits of PEFT's unmerged forward (DoRA, rsLoRA, patterns, lm_head)."""
    from transformers import AutoProcessor

    from vlexport.backends.torch_reference import build_reference

    processor = AutoProcessor.from_pretrained(str(tiny_base))
    inputs = processor(images=photos["chelsea"], text="USER: <image>\nhello ASSISTANT:", return_tensors="pt")
    ref = build_reference(tiny_base, [load_adapter(full_lora)])
    merged = _ours(tiny_base, full_lora)
    base = load_llava(tiny_base)
    with torch.no_grad():
        a, b, c = ref(**inputs).logits, merged(**inputs).logits, base(**inputs).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert (a - c).abs().max() > 1e-2


def test_lora_bias_on_llama_linear_becomes_a_bias(tiny_base, tmp_path, photos):
    """PEFT cannot merge lora_bias into a Linear without bias; vlexport creates the bias. Checked on the forward."""
    from transformers import AutoProcessor

    from vlexport.backends.torch_reference import build_reference

    adapter = make_lora(tiny_base, tmp_path / "lb", seed=8, lora_bias=True, target_modules=r".*language_model.*\.(o_proj|up_proj)")
    processor = AutoProcessor.from_pretrained(str(tiny_base))
    inputs = processor(images=photos["rocket"], text="USER: <image>\nhi ASSISTANT:", return_tensors="pt")
    merged = _ours(tiny_base, adapter)
    assert merged.model.language_model.layers[1].mlp.up_proj.bias is not None
    with torch.no_grad():
        a = build_reference(tiny_base, [load_adapter(adapter)])(**inputs).logits
        b, c = merged(**inputs).logits, load_llava(tiny_base)(**inputs).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert (a - c).abs().max() > 1e-3


def _rewrite(src_dir, dst, rename, fmt="safetensors"):
    from safetensors.torch import load_file, save_file

    state = {rename(k): v for k, v in load_file(str(src_dir / "adapter_model.safetensors")).items()}
    dst.mkdir(parents=True)
    (dst / "adapter_config.json").write_text((src_dir / "adapter_config.json").read_text())
    if fmt == "bin":
        torch.save(state, dst / "adapter_model.bin")
        return dst / "adapter_model.bin"
    save_file(state, str(dst / "adapter_model.safetensors"))
    return dst / "adapter_model.safetensors"


def _layout_pre_452(k):
    return (k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model.")
             .replace("base_model.model.model.vision_tower.", "base_model.model.vision_tower.vision_model.")
             .replace("base_model.model.model.multi_modal_projector.", "base_model.model.multi_modal_projector.")
             .replace("base_model.model.lm_head.", "base_model.model.language_model.lm_head."))


def _layout_452_457(k):
    return k.replace("base_model.model.model.vision_tower.", "base_model.model.model.vision_tower.vision_model.")


@pytest.mark.parametrize("layout,fmt", [("pre_4_52", "safetensors"), ("4_52_to_4_57", "safetensors"), ("pre_4_52", "bin")])
def test_old_key_layouts_merge_identically(tiny_base, full_lora, tmp_path, layout, fmt):
    rename = _layout_pre_452 if layout == "pre_4_52" else _layout_452_457
    weights = _rewrite(full_lora, tmp_path / layout, rename, fmt)
    reference = _ours(tiny_base, full_lora).state_dict()
    ours = _ours(tiny_base, weights).state_dict()
    for name, value in reference.items():
        assert torch.equal(ours[name], value), name
    # The projector and vision keys were really found (PEFT would silently drop the old projector keys).
    described = load_adapter(weights).describe()
    assert described["parts"] == ["decoder", "vision"]


def test_llava_repo_lora(tiny_base, tmp_path):
    """Original LLaVA repo: adapter_model.bin with model.layers keys + non_lora_trainables.bin (projector)."""
    from safetensors.torch import load_file

    peft_dir = make_lora(tiny_base, tmp_path / "peft", seed=4, target_modules=r".*language_model.*\.(q_proj|v_proj)")
    state = load_file(str(peft_dir / "adapter_model.safetensors"))
    repo = tmp_path / "llava-repo"
    repo.mkdir()
    torch.save({k.replace("model.language_model.layers.", "model.layers."): v for k, v in state.items()},
               repo / "adapter_model.bin")
    (repo / "adapter_config.json").write_text((peft_dir / "adapter_config.json").read_text())
    base = load_llava(tiny_base)
    g = torch.Generator().manual_seed(9)
    projector = {
        "base_model.model.model.mm_projector.0.weight": torch.randn(base.model.multi_modal_projector.linear_1.weight.shape, generator=g),
        "base_model.model.model.mm_projector.0.bias": torch.randn(base.model.multi_modal_projector.linear_1.bias.shape, generator=g),
        "base_model.model.model.mm_projector.2.weight": torch.randn(base.model.multi_modal_projector.linear_2.weight.shape, generator=g),
        "base_model.model.model.mm_projector.2.bias": torch.randn(base.model.multi_modal_projector.linear_2.bias.shape, generator=g),
    }
    torch.save(projector, repo / "non_lora_trainables.bin")
    adapter = load_adapter(repo)
    assert adapter.format == "llava-repo"
    ours = _ours(tiny_base, repo).state_dict()
    expected = _peft_merged(tiny_base, peft_dir)
    for key, value in projector.items():
        layer = "linear_1" if ".0." in key else "linear_2"
        expected[f"model.multi_modal_projector.{layer}.{key.rsplit('.', 1)[1]}"] = value
    _assert_merge(ours, expected, base.state_dict())


def test_bitfit_dump_absolute_and_new_bias(tiny_base, bitfit_dump):
    from safetensors.torch import load_file

    dump = load_file(str(bitfit_dump))
    model = _ours(tiny_base, bitfit_dump)
    params = dict(model.named_parameters())
    for name, value in dump.items():
        assert torch.equal(params[name], value), name
    # Llama o_proj has no bias in the base: the merge created one.
    o_proj = model.model.language_model.layers[0].self_attn.o_proj
    assert o_proj.bias is not None and o_proj.bias.abs().max() > 0
    assert load_llava(tiny_base).model.language_model.layers[0].self_attn.o_proj.bias is None


def test_peft_beft_deltas_match_peft_forward(tiny_base, tmp_path, photos):
    from peft import BeftConfig, PeftModel, get_peft_model
    from transformers import AutoProcessor

    from vlexport.fixture import _randomize

    pm = get_peft_model(load_llava(tiny_base), BeftConfig(target_modules=["q_proj", "o_proj", "linear_1", "fc2"]))
    _randomize(pm, seed=6)
    pm.save_pretrained(str(tmp_path / "beft"))
    adapter = load_adapter(tmp_path / "beft")
    assert adapter.kind == "bitfit" and adapter.format == "peft-beft"
    processor = AutoProcessor.from_pretrained(str(tiny_base))
    inputs = processor(images=photos["coffee"], text="USER: <image>\nhi ASSISTANT:", return_tensors="pt")
    ref = PeftModel.from_pretrained(load_llava(tiny_base), str(tmp_path / "beft"))
    merged = _ours(tiny_base, tmp_path / "beft")
    with torch.no_grad():
        a, b, c = ref(**inputs).logits, merged(**inputs).logits, load_llava(tiny_base)(**inputs).logits
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert (a - c).abs().max() > 1e-3


def test_adapters_apply_in_order(tiny_base, bitfit_dump, tmp_path):
    """A later absolute replacement wins over an earlier one."""
    from safetensors.torch import load_file, save_file

    dump = load_file(str(bitfit_dump))
    key = "model.multi_modal_projector.linear_1.bias"
    second = tmp_path / "second.safetensors"
    save_file({key: dump[key] + 1.0}, str(second))
    model = load_llava(tiny_base)
    merge_adapters(model, [load_adapter(bitfit_dump), load_adapter(second)])
    assert torch.equal(dict(model.named_parameters())[key], dump[key] + 1.0)


def test_detection_and_override(tiny_base, full_lora, bitfit_dump):
    assert load_adapter(full_lora).kind == "lora"
    assert load_adapter(full_lora / "adapter_model.safetensors").kind == "lora"
    assert load_adapter(bitfit_dump).kind == "bitfit"
    assert load_adapter(bitfit_dump, kind="bitfit").format == "bitfit-dump"
    cfg = json.loads((full_lora / "adapter_config.json").read_text())
    assert cfg["use_dora"] and cfg["use_rslora"]

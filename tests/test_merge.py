"""Merging against PEFT's own merge_and_unload, for every LoRA option and key layout we accept.

Each adapter is initialised to non-identity values; every test asserts merged ≈ PEFT-merged (1e-5) and merged ≠ base.
"""

import dataclasses
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


# Full-name patterns, as a user writes them for transformers 5 names; alphas and ranks differ from lora_alpha / r.
_FULL_ALPHAS = {"model.language_model.layers.1.mlp.down_proj": 5, "model.vision_tower.encoder.layers.0.self_attn.q_proj": 3,
                "model.multi_modal_projector.linear_1": 2.5}
_FULL_RANKS = {"model.language_model.layers.0.self_attn.v_proj": 4, "model.vision_tower.encoder.layers.0.mlp.fc1": 2}


def _module_rename(rename):
    return lambda name: rename("base_model.model." + name).removeprefix("base_model.model.")


def _pattern_layout(src_dir, dst, layout):
    """The adapter in another transformers layout: state-dict keys AND full-name pattern keys renamed, as PEFT
    would have saved it under that transformers version (module names at training time)."""
    if layout == "5":
        return src_dir
    rename = _layout_pre_452 if layout == "pre_4_52" else _layout_452_457
    _rewrite(src_dir, dst, rename)
    config = json.loads((src_dir / "adapter_config.json").read_text())
    names = _module_rename(rename)
    config["alpha_pattern"] = {names(k): v for k, v in config["alpha_pattern"].items()}
    config["rank_pattern"] = {names(k): v for k, v in config["rank_pattern"].items()}
    if layout == "pre_4_52":
        # a suffix pattern in the old layout (it matched vision_tower.vision_model.encoder... at training time)
        key = "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"
        config["alpha_pattern"]["vision_model.encoder.layers.0.self_attn.q_proj"] = config["alpha_pattern"].pop(key)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def full_name_pattern_lora(tiny_base, tmp_path_factory):
    return make_lora(tiny_base, tmp_path_factory.mktemp("patterns") / "lora", seed=21, lora_alpha=16,
                     alpha_pattern=_FULL_ALPHAS, rank_pattern=_FULL_RANKS, use_dora=True)


@pytest.mark.parametrize("layout", ["5", "4_52_to_4_57", "pre_4_52"])
def test_full_name_patterns_in_every_layout(tiny_base, full_name_pattern_lora, tmp_path, photos, layout):
    """Full-name alpha_pattern/rank_pattern keys in each key layout: the merge and the reference both use the
    pattern's alpha (not lora_alpha) and equal PEFT's unmerged forward of the adapter as trained."""
    from peft import PeftModel
    from transformers import AutoProcessor

    from vlexport.backends.torch_reference import build_reference

    path = _pattern_layout(full_name_pattern_lora, tmp_path / layout, layout)
    adapter = load_adapter(path)
    scaling = {m.module: m.scaling for m in adapter.modules}
    assert set(_FULL_ALPHAS) <= set(scaling), sorted(scaling)
    for module, alpha in _FULL_ALPHAS.items():
        r = _FULL_RANKS.get(module, 8)
        assert scaling[module] == pytest.approx(alpha / r), module  # lora_alpha would give 16 / r
    assert scaling["model.language_model.layers.0.mlp.down_proj"] == pytest.approx(16 / 8)
    ranks = {m.module: m.A.shape[0] for m in adapter.modules}
    assert all(ranks[k] == v for k, v in _FULL_RANKS.items())

    processor = AutoProcessor.from_pretrained(str(tiny_base))
    inputs = processor(images=photos["astronaut"], text="USER: <image>\nwhat? ASSISTANT:", return_tensors="pt")
    trained = PeftModel.from_pretrained(load_llava(tiny_base), str(full_name_pattern_lora)).eval()
    ref = build_reference(tiny_base, [adapter])
    merged = _ours(tiny_base, path)
    without_patterns = load_llava(tiny_base)
    plain = load_adapter(path)
    plain.modules = [dataclasses.replace(m, scaling=(16 / m.A.shape[0])) for m in plain.modules]
    merge_adapters(without_patterns, [plain])
    with torch.no_grad():
        expected = trained(**inputs).logits
        got_ref, got_merged = ref(**inputs).logits, merged(**inputs).logits
        base, alpha_ignored = load_llava(tiny_base)(**inputs).logits, without_patterns(**inputs).logits
    assert (got_ref - expected).abs().max() < 1e-5, (got_ref - expected).abs().max()
    assert (got_merged - expected).abs().max() < 1e-5, (got_merged - expected).abs().max()
    assert (expected - base).abs().max() > 1e-2
    assert (expected - alpha_ignored).abs().max() > 1e-3  # the patterns matter, so this test can fail


def test_pattern_keys_are_rewritten_like_state_keys(tiny_base, full_name_pattern_lora, tmp_path):
    """The config PEFT gets for the reference holds transformers 5 module names."""
    adapter = load_adapter(_pattern_layout(full_name_pattern_lora, tmp_path / "old", "pre_4_52"))
    written = json.loads((adapter.write_peft_dir(tmp_path / "peft") / "adapter_config.json").read_text())
    assert "model.language_model.layers.1.mlp.down_proj" in written["alpha_pattern"]
    assert "model.multi_modal_projector.linear_1" in written["alpha_pattern"]
    assert "model.vision_tower.encoder.layers.0.mlp.fc1" in written["rank_pattern"]
    assert not any(k.startswith("language_model.") or "vision_tower.vision_model" in k for k in written["alpha_pattern"])


def _refuse_merge(self, model):
    raise AssertionError("the reference went through vlexport's merge code")


def test_bitfit_reference_sets_parameters_by_name_without_merge_code(tiny_base, bitfit_dump, tmp_path, monkeypatch):
    """The BitFit dump reference loads the file's values into the model's own parameters by PyTorch name; it never
    calls the build's merge (so a key-mapping bug there cannot hide in the reference). Old-layout names too."""
    from safetensors.torch import load_file, save_file

    from vlexport.adapters.bitfit import BitFitAdapter
    from vlexport.backends.torch_reference import build_reference

    dump = load_file(str(bitfit_dump))
    paths = [bitfit_dump]
    for name, rename in (("pre_4_52", _layout_pre_452), ("4_52_to_4_57", _layout_452_457)):
        paths.append(tmp_path / f"{name}.safetensors")
        save_file({_module_rename(rename)(k): v for k, v in dump.items()}, str(paths[-1]))
        assert set(load_file(str(paths[-1]))) != set(dump)
    monkeypatch.setattr(BitFitAdapter, "merge_into", _refuse_merge)
    for path in paths:
        ref = build_reference(tiny_base, [load_adapter(path)])
        for name, value in dump.items():
            assert torch.equal(ref.get_parameter(name), value), name
        o_proj = ref.get_submodule("model.language_model.layers.0.self_attn.o_proj")
        assert isinstance(o_proj.bias, torch.nn.Parameter) and "bias" in dict(o_proj.named_parameters())


def test_beft_next_to_lora_reference_without_merge_code(tiny_base, full_lora, tmp_path, photos, monkeypatch):
    """BEFT next to a LoRA (PEFT cannot stack both): the reference adds the deltas to the biases by name, under
    PEFT's LoRA. It equals the build's merge, and its biases are base + delta, read from the file."""
    from peft import BeftConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoProcessor

    from vlexport.adapters.bitfit import BitFitAdapter
    from vlexport.backends.torch_reference import build_reference
    from vlexport.fixture import _randomize

    pm = get_peft_model(load_llava(tiny_base), BeftConfig(target_modules=["q_proj", "o_proj", "linear_1", "fc2"]))
    _randomize(pm, seed=7)
    pm.save_pretrained(str(tmp_path / "beft"))
    lora, beft = load_adapter(full_lora), load_adapter(tmp_path / "beft")
    processor = AutoProcessor.from_pretrained(str(tiny_base))
    inputs = processor(images=photos["chelsea"], text="USER: <image>\nhi ASSISTANT:", return_tensors="pt")
    merged = load_llava(tiny_base)
    merge_adapters(merged, [lora, beft])
    with monkeypatch.context() as m:
        m.setattr(BitFitAdapter, "merge_into", _refuse_merge)
        ref = build_reference(tiny_base, [lora, beft])
    base = load_llava(tiny_base)
    deltas = load_file(str(tmp_path / "beft" / "adapter_model.safetensors"))
    assert deltas
    llava = ref.get_base_model()
    for key, delta in deltas.items():
        module = key.removeprefix("base_model.model.").removesuffix(".beft_bias")
        bias = llava.get_submodule(module)
        bias = getattr(bias, "base_layer", bias).bias
        before = base.get_submodule(module).bias
        want = delta.reshape(-1) + (before if before is not None else 0)
        assert torch.allclose(bias, want, atol=0, rtol=0), module
    with torch.no_grad():
        a, b = ref(**inputs).logits, merged(**inputs).logits
        c = build_reference(tiny_base, [lora])(**inputs).logits
    assert (a - b).abs().max() < 1e-5, (a - b).abs().max()
    assert (a - c).abs().max() > 1e-3  # the BEFT deltas matter


def test_float64_reference_is_float64_throughout(tiny_base, full_lora, bitfit_dump, photos):
    """build_reference(dtype=float64): every parameter and buffer (base, PEFT layers, BitFit biases) is float64,
    and it agrees with the float32 reference to float32's precision."""
    from transformers import AutoProcessor

    from vlexport.backends.torch_reference import build_reference

    adapters = [load_adapter(full_lora), load_adapter(bitfit_dump)]
    ref32, ref64 = build_reference(tiny_base, adapters), build_reference(tiny_base, adapters, dtype=torch.float64)
    assert {p.dtype for p in ref64.parameters()} == {torch.float64}
    assert {b.dtype for b in ref64.buffers() if b.is_floating_point()} <= {torch.float64}
    assert ref64.get_base_model().model.language_model.layers[0].self_attn.o_proj.base_layer.bias.dtype == torch.float64
    processor = AutoProcessor.from_pretrained(str(tiny_base))
    inputs = processor(images=photos["rocket"], text="USER: <image>\nhi ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        a, b = ref32(**inputs).logits, ref64(**inputs).logits
    assert b.dtype == torch.float64
    assert 0 < (a.double() - b).abs().max() < 1e-4

"""AdapterHub bottleneck adapters, read from files the `adapters` library wrote itself, against its own outputs.

tests/data/adapterhub/ was made by tests/golden/make_adapterhub_golden.py in the library's own environment
(adapters 1.3.0, transformers 4.57); SEMANTICS.md there records what the library computes. Here vlexport's reader
and its PyTorch reference (hooks at the residual adds, the same math the exported slots compute) must reproduce
those outputs on transformers 5.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlexport.adapters import load_adapter
from vlexport.backends.torch_reference import attach_bottleneck_adapter, attach_bottleneck_to_layers
from vlexport.errors import VlexportError

DATA = Path(__file__).parent / "data" / "adapterhub"
SUPPORTED = ["seqbn", "double_seqbn", "parbn", "options"]
REFUSED = {"seq_gated_ln": "use_gating", "par_gated_ln": "use_gating", "adapterplus": "scaling",
           "seq_residual_after_ln": "residual_before_ln"}


def _tower(name):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    config = json.loads((DATA / name / "config.json").read_text())
    state = load_file(str(DATA / name / "base_model.safetensors"))
    if name == "llama":
        model = LlamaForCausalLM(LlamaConfig(**config))
        layers = lambda m: m.model.layers
    else:
        model = CLIPVisionModel(CLIPVisionConfig(**config))
        state = {k.removeprefix("vision_model."): v for k, v in state.items()}  # transformers 4.x wrapped CLIP
        layers = lambda m: m.encoder.layers if hasattr(m, "encoder") else m.vision_model.encoder.layers
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    return model.eval(), layers(model), load_file(str(DATA / name / "inputs.safetensors"))


def _run(model, name, inputs):
    with torch.no_grad():
        if name == "llama":
            return model(input_ids=inputs["input_ids"]).logits
        return model(pixel_values=inputs["pixel_values"], output_hidden_states=True).last_hidden_state


@pytest.mark.parametrize("hooks", ["reference", "slots"])
@pytest.mark.parametrize("tower", ["llama", "clip"])
@pytest.mark.parametrize("case", SUPPORTED)
def test_reference_reproduces_the_library(tower, case, hooks):
    """hooks=reference: the reference's own hooks, from the adapter's per-layer weights; hooks=slots: the slot
    arrays the exported graph is fed (vlexport/slots.py), so both packings are checked against the library."""
    model, layers, inputs = _tower(tower)
    base = _run(model, tower, inputs)
    adapter = load_adapter(DATA / tower / case)
    assert adapter.kind == "bottleneck" and adapter.part == ("decoder" if tower == "llama" else "vision")
    cfg = model.config
    if hooks == "reference":
        assert attach_bottleneck_adapter(layers, adapter)
    else:
        attach_bottleneck_to_layers(layers, adapter.part, adapter.slot_feed(cfg.num_hidden_layers, cfg.hidden_size))
    got = _run(model, tower, inputs)
    expected = load_file(str(DATA / tower / case / "outputs.safetensors"))["logits" if tower == "llama" else "last_hidden_state"]
    assert (got - expected).abs().max() < 1e-4, (got - expected).abs().max()
    assert (expected - base).abs().max() > 0.1  # the adapter matters, so this comparison can fail


def test_library_output_without_adapter_matches_base():
    for tower in ("llama", "clip"):
        model, _, inputs = _tower(tower)
        expected = load_file(str(DATA / tower / "base_outputs.safetensors"))["logits" if tower == "llama" else "last_hidden_state"]
        assert (_run(model, tower, inputs) - expected).abs().max() < 1e-4


@pytest.mark.parametrize("case,option", sorted(REFUSED.items()))
def test_unsupported_options_are_refused_by_name(case, option):
    with pytest.raises(VlexportError, match=option):
        load_adapter(DATA / "llama" / case)


def test_presets_are_recognised():
    assert [load_adapter(DATA / "clip" / c).format for c in ("seqbn", "double_seqbn", "parbn")] == [
        "adapterhub-seqbn", "adapterhub-double_seqbn", "adapterhub-parbn"]
    options = load_adapter(DATA / "llama" / "options").describe()
    assert options["activation"] == "gelu" and options["mix"][2] == 2.0 and len(options["widths"]) >= 1


def test_safetensors_layout_of_a_bare_llama_model():
    adapter = load_adapter(DATA / "llama_bare" / "seqbn_safetensors")
    assert adapter.weights_file.name == "adapter.safetensors" and adapter.weights


@pytest.fixture(scope="module")
def bottleneck_bank(tiny_base, full_lora, tmp_path_factory):
    """A bank of three tasks of different kinds on one base graph (with a LoRA merged for every task):
    vqa = bottleneck in both towers, caption = PEFT prefix + ParBn in the language model, plain = prefix only."""
    from typer.testing import CliRunner

    from vlexport.cli import app
    from vlexport.fixture import make_adapterhub_bottleneck
    from tests.test_tasks import make_prefix

    tmp = tmp_path_factory.mktemp("bnbank")
    paths = {
        "vqa_vision": make_adapterhub_bottleneck(tiny_base, tmp / "vqa_vision", "vision", "seqbn", seed=1),
        "vqa_language": make_adapterhub_bottleneck(tiny_base, tmp / "vqa_language", "language", "double_seqbn", seed=2),
        "caption_language": make_adapterhub_bottleneck(tiny_base, tmp / "cap_language", "language", "parbn", seed=3),
        "caption_prefix": make_prefix(tiny_base, tmp / "cap_prefix", seed=4, tokens=3, projection=False),
        "plain_prefix": make_prefix(tiny_base, tmp / "plain_prefix", seed=5, tokens=5, projection=True),
    }
    out = tmp / "bundle"
    args = ["build", "--base", str(tiny_base), "--adapter", str(full_lora),
            "--adapter", f"vqa={paths['vqa_vision']}", "--adapter", f"vqa={paths['vqa_language']}",
            "--adapter", f"caption={paths['caption_prefix']}", "--adapter", f"caption={paths['caption_language']}",
            "--adapter", f"plain={paths['plain_prefix']}", "-o", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return out, paths


def test_bottleneck_bank_manifest(bottleneck_bank):
    out, _ = bottleneck_bank
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["slots"]) == {"vision", "decoder"}
    assert manifest["tasks"]["vqa"]["bottleneck_parts"] == ["decoder", "vision"]
    assert manifest["tasks"]["caption"]["prefix_tokens"] == 3 and manifest["tasks"]["caption"]["bottleneck_parts"] == ["decoder"]
    assert manifest["parity"]["passed"]
    names = [i["name"] for i in manifest["parts"]["decoder"]["inputs"]]
    assert "decoder_adapter.down_weight" in names
    width = next(i for i in manifest["parts"]["decoder"]["inputs"] if i["name"] == "decoder_adapter.down_weight")["shape"][2]
    assert isinstance(width, str)  # the bottleneck width is a dynamic dimension


@pytest.mark.parametrize("task", ["vqa", "caption", "plain", None])
def test_every_task_matches_its_reference(bottleneck_bank, tiny_base, full_lora, photos, task):
    import vlexport
    from transformers import AutoProcessor

    from vlexport.backends.torch_reference import build_reference, reference_generate

    out, paths = bottleneck_bank
    task_adapters = {"vqa": ["vqa_vision", "vqa_language"], "caption": ["caption_prefix", "caption_language"],
                     "plain": ["plain_prefix"], None: []}[task]
    model = build_reference(tiny_base, [load_adapter(full_lora), *(load_adapter(paths[k]) for k in task_adapters)])
    processor = AutoProcessor.from_pretrained(str(tiny_base))
    bundle = vlexport.load(out)
    prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    for photo in ("astronaut", "chelsea"):
        expected = reference_generate(model, processor, photos[photo], prompt, 32)
        assert bundle.generate(photos[photo], raw_prompt=prompt, max_new_tokens=32, task=task).token_ids == expected


def test_tasks_switch_per_request_and_differ(bottleneck_bank, photos):

    import vlexport

    out, _ = bottleneck_bank
    bundle = vlexport.load(out)
    prompt = "USER: <image>\nDescribe it. ASSISTANT:"
    first = {}
    for task in ["vqa", "caption", "plain", None, "caption", "vqa", None, "plain"]:
        tokens = bundle.generate(photos["rocket"], raw_prompt=prompt, max_new_tokens=12, task=task).token_ids
        assert first.setdefault(task, tokens) == tokens
    assert len({tuple(t) for t in first.values()}) == 4


def test_slot_geometry_mismatch_is_refused(bottleneck_bank, tiny_gqa_base, tiny_base, tmp_path):
    from typer.testing import CliRunner

    from vlexport.cli import app
    from vlexport.fixture import make_adapterhub_bottleneck

    wide = make_adapterhub_bottleneck(tiny_base, tmp_path / "a", "language", "seqbn")
    cfg = json.loads((wide / "adapter_config.json").read_text())
    state = torch.load(wide / "pytorch_adapter.bin", weights_only=True)
    for key, value in state.items():  # the same adapter as trained on a model 48 wide
        if key.endswith("adapter_down.0.weight"):
            state[key] = torch.randn(value.shape[0], 48)
        elif key.endswith("adapter_up.weight"):
            state[key] = torch.randn(48, value.shape[1])
        elif key.endswith("adapter_up.bias"):
            state[key] = torch.randn(48)
    torch.save(state, wide / "pytorch_adapter.bin")
    r = CliRunner().invoke(app, ["build", "--base", str(tiny_base), "--adapter", f"t={wide}", "-o", str(tmp_path / "o"), "--no-verify"])
    assert r.exit_code == 2 and "works on width 48" in r.output and not (tmp_path / "o").exists()
    assert cfg["model_class"] == "LlamaForCausalLM"


def test_slot_inputs_are_optional_for_hosts_without_adapters(bottleneck_bank, photos):
    """Slot inputs default to "no adapter", so onnxruntime-genai (which binds no extra inputs in its multimodal
    pipeline) and plain C++ hosts run the base model from a bank bundle unchanged."""
    import numpy as np
    import onnxruntime_genai as og

    import vlexport

    out, _ = bottleneck_bank
    bundle = vlexport.load(out)
    prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    ids, pixels = bundle.encode(prompt), bundle.pixel_values(photos["chelsea"])
    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 12, do_sample=False)
    generator = og.Generator(model, params)
    inputs = og.NamedTensors()
    inputs["input_ids"] = np.array([ids], dtype=np.int32)
    inputs["pixel_values"] = pixels
    inputs["num_image_tokens"] = np.array([bundle.num_image_tokens], dtype=np.int64)
    generator.set_inputs(inputs)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens == bundle.generate(photos["chelsea"], raw_prompt=prompt, max_new_tokens=12).token_ids


@pytest.mark.parametrize("tower,case", [("llama", "options"), ("clip", "parbn"), ("llama", "double_seqbn")])
def test_plain_safetensors_layout_round_trips(tower, case, tmp_path):
    """vlexport's documented plain layout carries exactly what the AdapterHub files do."""
    import numpy as np

    from vlexport.adapters.bottleneck import save_plain

    original = load_adapter(DATA / tower / case)
    plain = load_adapter(save_plain(original, tmp_path / "adapter.safetensors"))
    assert plain.kind == "bottleneck" and plain.format == "vlexport-plain" and plain.part == original.part
    dim = next(iter(original.weights.values()))[0].shape[1]
    a, b = original.slot_feed(2, dim), plain.slot_feed(2, dim)
    assert all(np.array_equal(a[k], b[k]) for k in a)


PREFIX_DATA = Path(__file__).parent / "data" / "adapterhub_prefix"


@pytest.mark.parametrize("case", ["prefix_mlp", "prefix_flat"])
def test_adapterhub_prefix_matches_the_library(case):
    """Reader: the library's own injected keys/values; positions from 0 and P ones in the mask: its logits."""
    import numpy as np
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    adapter = load_adapter(PREFIX_DATA / case)
    assert adapter.kind == "prefix" and adapter.format == "adapterhub-prefix" and adapter.position_offset == 0
    config = LlamaConfig(**json.loads((PREFIX_DATA / "config.json").read_text()))
    head_dim = config.hidden_size // config.num_attention_heads
    kv = adapter.key_values(config.num_hidden_layers, config.num_key_value_heads, head_dim)
    golden = load_file(str(PREFIX_DATA / case / "kv.safetensors"))
    assert max(float(np.abs(kv[k] - golden[k].numpy()).max()) for k in golden) < 1e-5

    model = LlamaForCausalLM(config).eval()
    model.load_state_dict(load_file(str(PREFIX_DATA / "base_model.safetensors")), strict=False)
    ids = load_file(str(PREFIX_DATA / "inputs.safetensors"))["input_ids"]
    batch, length = ids.shape
    cache = DynamicCache(config=config)
    for i in range(config.num_hidden_layers):
        k = torch.from_numpy(kv[f"past_key_values.{i}.key"])[None].expand(batch, -1, -1, -1)
        v = torch.from_numpy(kv[f"past_key_values.{i}.value"])[None].expand(batch, -1, -1, -1)
        cache.update(k, v, i)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones(batch, adapter.num_tokens + length, dtype=torch.long),
                       position_ids=torch.arange(length).expand(batch, -1), cache=cache).logits
    expected = load_file(str(PREFIX_DATA / case / "outputs.safetensors"))["logits"]
    assert (logits - expected).abs().max() < 1e-4


def test_adapterhub_prefix_task_in_a_llava_bank(tiny_gqa_base, photos, tmp_path):
    """An AdapterHub prefix (positions from 0) next to a PEFT prefix (positions from P) in one bank."""
    from transformers import AutoProcessor
    from typer.testing import CliRunner

    import vlexport
    from vlexport.backends.torch_reference import build_reference, reference_generate
    from vlexport.cli import app
    from vlexport.fixture import make_adapterhub_prefix
    from tests.test_tasks import make_prefix

    ah = make_adapterhub_prefix(tiny_gqa_base, tmp_path / "ah", prefix_length=4, seed=41, scale=2.0)
    flat = make_adapterhub_prefix(tiny_gqa_base, tmp_path / "flat", prefix_length=3, flat=True, seed=42, scale=2.0)
    peft = make_prefix(tiny_gqa_base, tmp_path / "peft", seed=43, tokens=4, projection=False)
    out = tmp_path / "b"
    r = CliRunner().invoke(app, ["build", "--base", str(tiny_gqa_base), "--adapter", f"ah={ah}", "--adapter", f"flat={flat}",
                                 "--adapter", f"peft={peft}", "-o", str(out)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tasks"]["ah"]["position_offset"] == 0 and manifest["tasks"]["peft"]["position_offset"] == 4
    bundle = vlexport.load(out)
    processor = AutoProcessor.from_pretrained(str(tiny_gqa_base))
    prompt = "USER: <image>\nWhat is it? ASSISTANT:"
    outputs = {}
    for task, path in (("ah", ah), ("flat", flat), ("peft", peft)):
        expected = reference_generate(build_reference(tiny_gqa_base, [load_adapter(path)]), processor, photos["astronaut"], prompt, 32)
        outputs[task] = bundle.generate(photos["astronaut"], raw_prompt=prompt, max_new_tokens=32, task=task).token_ids
        assert outputs[task] == expected
    assert len({tuple(v) for v in outputs.values()}) == 3

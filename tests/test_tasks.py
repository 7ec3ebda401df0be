"""Adapter banks with prefix-tuning tasks: one base graph, one pack per task, switched per request."""

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vlexport.cli import app
from vlexport.bundle import reseal

PROMPTS = ["USER: <image>\nWhat is shown here? ASSISTANT:", "USER: <image>\nCount the objects. ASSISTANT:"]


def make_prefix(base, out, seed, tokens, projection):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(base))
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens, prefix_projection=projection,
                                encoder_hidden_size=16)
    peft_model = get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # PEFT's initial prefix is random too, but small: make it matter
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(3.0 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def bank(tiny_gqa_base, tmp_path_factory):
    """GQA base + BitFit merged for every task + two PEFT prefix tasks (with and without projection)."""
    from vlexport.fixture import make_bitfit

    tmp = tmp_path_factory.mktemp("bank")
    bitfit = make_bitfit(tiny_gqa_base, tmp / "bitfit.safetensors", seed=21)
    vqa = make_prefix(tiny_gqa_base, tmp / "vqa", seed=1, tokens=4, projection=False)
    caption = make_prefix(tiny_gqa_base, tmp / "caption", seed=2, tokens=6, projection=True)
    out = tmp / "bundle"
    r = CliRunner().invoke(app, ["build", "--base", str(tiny_gqa_base), "--adapter", str(bitfit),
                                 "--adapter", f"vqa={vqa}", "--adapter", f"caption={caption}", "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out, {"bitfit": bitfit, "vqa": vqa, "caption": caption}


def test_manifest_and_inspect_list_the_packs(bank):
    out, _ = bank
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["tasks"]) == {"vqa", "caption"}
    assert manifest["tasks"]["caption"]["prefix_tokens"] == 6 and manifest["tasks"]["caption"]["position_offset"] == 6
    assert manifest["files"]["packs/vqa.safetensors"]
    assert [a["kind"] for a in manifest["adapters"]] == ["bitfit"]
    assert manifest["parity"]["passed"]
    r = CliRunner().invoke(app, ["inspect", str(out)])
    assert "task vqa: pack packs/vqa.safetensors" in r.output and "task caption" in r.output


@pytest.mark.parametrize("task", ["vqa", "caption"])
@pytest.mark.parametrize("photo", ["astronaut", "chelsea"])
def test_each_task_matches_its_peft_reference(bank, tiny_gqa_base, photos, tmp_path, task, photo):
    from transformers import AutoProcessor

    from vlexport.adapters import load_adapter
    from vlexport.backends.torch_reference import build_reference, reference_generate

    out, paths = bank
    model = build_reference(tiny_gqa_base, [load_adapter(paths["bitfit"]), load_adapter(paths[task])])
    assert type(model).__name__ == "PeftModelForCausalLM"  # PEFT's own forward applies the prefix
    processor = AutoProcessor.from_pretrained(str(tiny_gqa_base))
    base_only = build_reference(tiny_gqa_base, [load_adapter(paths["bitfit"])])
    photos[photo].save(tmp_path / "p.png")
    differs = False
    for prompt in PROMPTS:
        expected = reference_generate(model, processor, photos[photo], prompt, 32)
        differs |= expected != reference_generate(base_only, processor, photos[photo], prompt, 32)
        r = CliRunner().invoke(app, ["run", str(out), "--image", str(tmp_path / "p.png"), "--raw-prompt", prompt,
                                     "--task", task, "--json"])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["token_ids"] == expected
    assert differs, "the prefix changed no token: this test would pass without it"


def test_switching_tasks_per_request(bank, photos):
    import vlexport

    out, _ = bank
    bundle = vlexport.load(out)
    runs = [(t, bundle.generate(photos["coffee"], raw_prompt=PROMPTS[0], max_new_tokens=16, task=t).token_ids)
            for t in ("vqa", "caption", None, "vqa", None, "caption")]
    by_task = {}
    for t, tokens in runs:
        assert by_task.setdefault(t, tokens) == tokens  # the same answer every time the task comes back
    assert len({tuple(v) for v in by_task.values()}) == 3  # each task answers differently, and so does the base


def test_prefix_reimplementation_equals_peft_forward(tiny_gqa_base, bank, photos):
    """PrefixReference (used next to LoRA, which PEFT cannot stack with a prefix) computes PEFT's forward."""
    from transformers import AutoProcessor

    from vlexport.adapters import load_adapter
    from vlexport.backends.torch_reference import PrefixReference, build_reference
    from vlexport.model import load_llava

    _, paths = bank
    prefix = load_adapter(paths["caption"])
    processor = AutoProcessor.from_pretrained(str(tiny_gqa_base))
    inputs = processor(images=photos["rocket"], text=PROMPTS[1], return_tensors="pt")
    with torch.no_grad():
        a = build_reference(tiny_gqa_base, [prefix])(**inputs).logits
        b = PrefixReference(load_llava(tiny_gqa_base), prefix)(**inputs).logits
        c = load_llava(tiny_gqa_base)(**inputs).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert (a - c).abs().max() > 1e-2


def test_altered_pack_fails_verify(bank, tmp_path):
    from safetensors.numpy import load_file, save_file

    out, _ = bank
    copy = tmp_path / "b"
    shutil.copytree(out, copy)
    pack = copy / "packs" / "vqa.safetensors"
    tensors = load_file(str(pack))
    tensors["past_key_values.0.key"] = tensors["past_key_values.0.key"] * np.float32(1.01)
    save_file(tensors, str(pack))
    reseal(copy)  # the change is deliberate: the bundle's seal is renewed, so only parity can catch it
    r = CliRunner().invoke(app, ["verify", str(copy), "--json", "--max-new-tokens", "8"])
    assert r.exit_code == 1
    report = json.loads(r.stdout)
    assert "vqa:" in report["summary"] and "caption:" not in report["summary"]


def test_prefix_geometry_that_does_not_fit_is_refused(tiny_base, bank, tmp_path):
    _, paths = bank  # trained on the GQA base: 2 KV heads, not tiny's 4
    r = CliRunner().invoke(app, ["build", "--base", str(tiny_base), "--adapter", f"vqa={paths['vqa']}",
                                 "-o", str(tmp_path / "o"), "--no-verify"])
    assert r.exit_code == 2 and "prompt_embeddings has width" in r.output and not (tmp_path / "o").exists()


def test_bank_of_three_kinds_with_a_merged_lora_task(tiny_gqa_base, bank, photos, tmp_path):
    """Three tasks of different kinds on one bundle: a LoRA merged for its task alone (its own copies of the parts
    it changes), a PEFT prefix, and AdapterHub bottlenecks in both towers; every task equals its reference."""
    import vlexport
    from transformers import AutoProcessor

    from vlexport.adapters import load_adapter
    from vlexport.backends.torch_reference import build_reference, reference_generate
    from vlexport.fixture import make_adapterhub_bottleneck, make_lora

    _, paths = bank
    lora = make_lora(tiny_gqa_base, tmp_path / "ocr_lora", seed=31, use_rslora=True, rank_pattern={"v_proj": 4})
    vision = make_adapterhub_bottleneck(tiny_gqa_base, tmp_path / "vqa_v", "vision", "seqbn", seed=32)
    language = make_adapterhub_bottleneck(tiny_gqa_base, tmp_path / "vqa_l", "language", "double_seqbn", seed=33)
    out = tmp_path / "b"
    r = CliRunner().invoke(app, ["build", "--base", str(tiny_gqa_base), "--adapter", str(paths["bitfit"]),
                                 "--adapter", f"ocr={lora}", "--adapter", f"chat={paths['vqa']}",
                                 "--adapter", f"vqa={vision}", "--adapter", f"vqa={language}", "-o", str(out),
                                 "--lora-mode", "merged"])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    ocr = manifest["tasks"]["ocr"]
    assert set(ocr["parts"]) == {"vision", "decoder"} and ocr["parts_bytes"] > 0  # the cost of merging per task
    assert manifest["parity"]["passed"]
    bundle = vlexport.load(out)
    processor = AutoProcessor.from_pretrained(str(tiny_gqa_base))
    task_adapters = {"ocr": [lora], "chat": [paths["vqa"]], "vqa": [vision, language]}
    for task, extra in task_adapters.items():
        model = build_reference(tiny_gqa_base, [load_adapter(p) for p in [paths["bitfit"], *extra]])
        expected = reference_generate(model, processor, photos["chelsea"], PROMPTS[0], 32)
        assert bundle.generate(photos["chelsea"], raw_prompt=PROMPTS[0], max_new_tokens=32, task=task).token_ids == expected


def test_unknown_task(bank, photos, tmp_path):
    out, _ = bank
    photos["coffee"].save(tmp_path / "c.png")
    r = CliRunner().invoke(app, ["run", str(out), "--image", str(tmp_path / "c.png"), "--prompt", "hi", "--task", "ocr"])
    assert r.exit_code == 2 and "unknown --task 'ocr'" in r.output and "vqa" in r.output

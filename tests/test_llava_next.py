"""LLaVA-NeXT (1.6, any-resolution) as a base: build with a LoRA + BitFit, run, tokens equal HF's own
LlavaNextForConditionalGeneration with PEFT unmerged (and its processor) on a square, a wide and a tall photo."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from vlexport.cli import app
from vlexport.errors import VlexportError

PROMPTS = ["What is shown in this image?", "Describe the colours in detail."]


@pytest.fixture(scope="module")
def next_base(tmp_path_factory):
    from vlexport.fixture_family import make_llava_next

    return make_llava_next(tmp_path_factory.mktemp("next") / "base", "tiny", seed=0)


@pytest.fixture(scope="module")
def next_adapters(next_base, tmp_path_factory):
    from vlexport.fixture_family import make_family_bitfit, make_family_lora

    d = tmp_path_factory.mktemp("next_adapters")
    return make_family_lora(next_base, d / "lora", seed=11), make_family_bitfit(next_base, d / "bitfit.safetensors", seed=12)


@pytest.fixture(scope="module")
def next_photos():
    import skimage.data
    from PIL import Image

    return {"square": Image.fromarray(skimage.data.astronaut()),           # 512 x 512
            "wide": Image.fromarray(skimage.data.rocket()),                # 640 x 427
            "tall": Image.fromarray(skimage.data.astronaut()[:, :256]),    # 256 x 512
            "panorama": Image.fromarray(skimage.data.astronaut()[:128])}   # 512 x 128: a 1 x 3 grid


@pytest.fixture(scope="module")
def next_bundle(next_base, next_adapters, tmp_path_factory):
    """Built through the CLI, build-time verify (against the unmerged reference, float64 oracle) included."""
    out = tmp_path_factory.mktemp("next_bundles") / "b"
    lora, bitfit = next_adapters
    result = CliRunner().invoke(app, ["build", "--base", str(next_base), "--adapter", str(lora), "--adapter",
                                      str(bitfit), "-o", str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def hf_reference(next_base, next_adapters):
    """HF's own model and processor, the LoRA through PEFT unmerged and the BitFit biases loaded by name: no
    vlexport merge or key-map code."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    lora, bitfit = next_adapters
    model = LlavaNextForConditionalGeneration.from_pretrained(str(next_base)).eval()
    with torch.no_grad():
        for key, value in load_file(str(bitfit)).items():
            module = model.get_submodule(key.removesuffix(".bias"))
            if module.bias is None:
                module.register_parameter("bias", torch.nn.Parameter(value.clone()))
            else:
                module.bias.copy_(value)
    model = PeftModel.from_pretrained(model, str(lora)).eval()
    return model, AutoProcessor.from_pretrained(str(next_base))


def hf_generate(reference, image, text, n=24):
    import torch

    model, processor = reference
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist(), inputs


@pytest.mark.slow
@pytest.mark.parametrize("photo", ["square", "wide", "tall", "panorama"])
def test_run_matches_hf_generate(next_bundle, hf_reference, next_photos, photo, tmp_path):
    from vlexport.runtime import Bundle, render_chat_prompt

    path = tmp_path / f"{photo}.png"
    next_photos[photo].save(path)
    bundle = Bundle(next_bundle)
    tok = bundle.manifest["tokenizer"]
    for prompt in PROMPTS:
        result = CliRunner().invoke(app, ["run", str(next_bundle), "--image", str(path), "--prompt", prompt,
                                          "--max-new-tokens", "24", "--json"])
        assert result.exit_code == 0, result.output
        got = json.loads(result.stdout)
        text = render_chat_prompt(bundle.chat_template, prompt, tok["bos_token"], tok["eos_token"])
        expected, inputs = hf_generate(hf_reference, next_photos[photo], text)
        assert len(expected) == 24
        assert got["token_ids"] == expected
        # The runtime expanded <image> as HF's processor does, by the image's size.
        image = next_photos[photo]
        assert bundle.encode(text, (image.height, image.width)) == inputs["input_ids"][0].tolist()


@pytest.mark.slow
def test_image_token_counts_follow_the_image(next_bundle, next_photos):
    from vlexport.runtime import Bundle

    bundle = Bundle(next_bundle)
    counts = {name: bundle.image_tokens((im.height, im.width)) for name, im in next_photos.items()}
    assert len(set(counts.values())) == 4, counts  # each aspect ratio packs to its own length
    # The tiny fixture's pinpoints are llava-hf's grids (1x2, 2x1, 2x2, 3x1, 1x3) at 56 px: the 2 x 2 grid keeps the
    # most pixels of a 3:2 photo, as llava-v1.6's 672 x 672 does.
    tiles = {name: bundle.pixel_values(im).shape[0] for name, im in next_photos.items()}
    assert tiles == {"square": 5, "wide": 5, "tall": 3, "panorama": 4}
    raw = "USER: <image>\nWhat is this? ASSISTANT:"
    with pytest.raises(VlexportError, match="depends on its size"):
        bundle.encode(raw)
    # A prompt expanded for one image and fed another's features is refused before the embed graph runs.
    square = next_photos["square"]
    ids = bundle.prepare(None, raw, 8, None, image_size=(square.height, square.width))
    with pytest.raises(VlexportError, match=f"{counts['square']} image tokens but the image gave {counts['wide']}"):
        bundle.features_for(next_photos["wide"], ids, None)


@pytest.mark.slow
def test_manifest_and_packing_against_hf(next_bundle, next_base, hf_reference, next_photos):
    """The vision graph's packed features equal HF's get_image_features (pack_image_features) for each photo, and
    the manifest records the geometry (packing in the vision graph) and the worst-case token count."""
    from vlexport.backends.torch_reference import reference_features
    from vlexport.runtime import Bundle

    bundle = Bundle(next_bundle)
    m = bundle.manifest
    assert m["base"]["model_type"] == "llava_next"
    assert m["model"]["anyres"]["packing"] == "vision-graph"
    assert m["model"]["num_image_tokens"] == m["model"]["anyres"]["max_image_tokens"] == 88
    assert m["parity"]["passed"] and m["onnxruntime_genai"]["files"] == []
    inputs_names = [i["name"] for i in m["parts"]["vision"]["inputs"]]
    assert inputs_names[:3] == ["pixel_values", "pack_index", "pack_weight"]
    model, processor = hf_reference
    for image in next_photos.values():
        inputs = processor(images=image, text="<image>", return_tensors="pt")
        ref = reference_features(model, inputs["pixel_values"], inputs["image_sizes"])
        got = bundle.image_features(bundle.pixel_values(image), None, (image.height, image.width))
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


@pytest.mark.slow
def test_genai_refuses_next_bundles(next_bundle):
    from vlexport.genai import open_model

    with pytest.raises(VlexportError, match="LLaVA-NeXT bundles do not run in onnxruntime-genai"):
        open_model(next_bundle)


def test_plan_counts_worst_case_tiles(next_base):
    result = CliRunner().invoke(app, ["plan", "--base", str(next_base), "--target", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert any("up to 5 tiles" in n and "up to 88 image tokens" in n for n in plan["notes"]), plan["notes"]


def test_tensorrt_target_is_refused_by_name(next_base, tmp_path):
    result = CliRunner().invoke(app, ["build", "--base", str(next_base), "--target", "jetson-orin", "-o",
                                      str(tmp_path / "b")])
    assert result.exit_code == 2, result.output
    assert "TensorRT" in result.output and "tile count" in result.output
    assert not (tmp_path / "b").exists()


def test_onevision_base_is_refused_clearly(tmp_path):
    from vlexport.model import check_config_dir

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava_onevision"}))
    with pytest.raises(VlexportError, match="LLaVA-OneVision"):
        check_config_dir(tmp_path)


def make_next_prefix(base, out, seed, tokens):
    """A PEFT prefix-tuning adapter trained on HF's LlavaNextForConditionalGeneration (non-trivial values)."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(str(base))
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(3.0 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(out))
    return out


@pytest.mark.slow
def test_bank_of_prefix_and_bottleneck_tasks_switches_per_request(next_base, next_adapters, next_photos, tmp_path):
    """A NeXT bank: BitFit merged for every task, a PEFT prefix task and an AdapterHub bottleneck task (both
    towers); each request's --task picks its pack, and every task's tokens equal its own reference (PEFT's
    forward for the prefix, hooks that reproduce AdapterHub (tests/test_adapterhub.py) for the bottlenecks)."""
    import vlexport
    from transformers import AutoProcessor

    from vlexport.adapters import load_adapter
    from vlexport.backends.torch_reference import build_reference, reference_generate
    from vlexport.fixture import make_adapterhub_bottleneck

    _, bitfit = next_adapters
    prefix = make_next_prefix(next_base, tmp_path / "caption", seed=1, tokens=4)
    vision = make_adapterhub_bottleneck(next_base, tmp_path / "vqa_v", "vision", "seqbn", seed=32)
    language = make_adapterhub_bottleneck(next_base, tmp_path / "vqa_l", "language", "double_seqbn", seed=33)
    out = tmp_path / "bank"
    r = CliRunner().invoke(app, ["build", "--base", str(next_base), "--adapter", str(bitfit),
                                 "--adapter", f"caption={prefix}", "--adapter", f"vqa={vision}",
                                 "--adapter", f"vqa={language}", "-o", str(out)])
    assert r.exit_code == 0, r.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"] and set(manifest["tasks"]) == {"caption", "vqa"}
    assert manifest["onnxruntime_genai"]["tasks"]["vqa"]["unsupported"].startswith("LLaVA-NeXT bundles")
    bundle = vlexport.load(out)
    processor = AutoProcessor.from_pretrained(str(next_base))
    raw = "USER: <image>\nWhat is shown here? ASSISTANT:"
    references = {"caption": [prefix], "vqa": [vision, language], None: []}
    expected = {}
    for task, extra in references.items():
        model = build_reference(next_base, [load_adapter(p) for p in [bitfit, *extra]])
        if task == "caption":
            assert type(model).__name__ == "PeftModelForCausalLM"  # PEFT's own forward applies the prefix
        expected[task] = {name: reference_generate(model, processor, next_photos[name], raw, 16)
                          for name in ("wide", "tall")}
    assert len({tuple(v["wide"]) for v in expected.values()}) == 3  # each task answers differently
    # Requests alternate tasks and photos on one loaded bundle.
    for task, name in [("caption", "wide"), ("vqa", "tall"), (None, "wide"), ("vqa", "wide"), ("caption", "tall"),
                       (None, "tall")]:
        got = bundle.generate(next_photos[name], raw_prompt=raw, max_new_tokens=16, task=task).token_ids
        assert got == expected[task][name], (task, name)
    # And mixed in one batch (rows of different tasks share decode steps).
    batch = bundle.generate_batch([vlexport.Request(next_photos[n], raw_prompt=raw, task=t, max_new_tokens=16)
                                   for t, n in [("vqa", "wide"), ("caption", "tall"), (None, "wide")]])
    assert [g.token_ids for g in batch] == [expected["vqa"]["wide"], expected["caption"]["tall"], expected[None]["wide"]]

"""Fixtures load with transformers' own classes; the runtime's preprocessing and prompts equal the HF processor's."""

import json

import numpy as np
import pytest


def test_tiny_fixture_is_a_real_llava(tiny_base):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(tiny_base))
    processor = AutoProcessor.from_pretrained(str(tiny_base))
    cfg = model.config
    assert cfg.vision_feature_layer == -2 and cfg.vision_feature_select_strategy == "default"
    assert cfg.vision_config.patch_size == 14
    assert cfg.image_token_id < cfg.text_config.vocab_size
    tok = json.loads((tiny_base / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "BPE" and tok["pre_tokenizer"]["type"] == "ByteLevel"
    assert len(processor.tokenizer) == cfg.text_config.vocab_size
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == cfg.image_token_id
    assert (tiny_base / "chat_template.jinja").exists()


def test_gqa_fixture(tiny_gqa_base):
    cfg = json.loads((tiny_gqa_base / "config.json").read_text())["text_config"]
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]


@pytest.mark.slow
def test_small_fixture_has_llava_ratios(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from vlexport.fixture import make_llava

    base = make_llava(tmp_path / "small", "small")
    model = LlavaForConditionalGeneration.from_pretrained(str(base))
    n = sum(p.numel() for p in model.parameters())
    assert 150e6 < n < 260e6
    cfg = model.config
    assert cfg.text_config.vocab_size == 32064 and cfg.text_config.hidden_size // cfg.text_config.num_attention_heads == 64
    assert cfg.vision_config.patch_size == 14


def test_same_seed_same_weights(tmp_path):
    from safetensors.torch import load_file

    from vlexport.fixture import make_llava

    a = load_file(str(make_llava(tmp_path / "a", "tiny", seed=7) / "model.safetensors"))
    b = load_file(str(make_llava(tmp_path / "b", "tiny", seed=7) / "model.safetensors"))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


@pytest.mark.parametrize("size", [None, (17, 40), (300, 120), (33, 33)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_preprocessing_equals_hf_processor(tiny_base, photos, size, mode):
    from transformers import AutoProcessor

    from vlexport.build import read_text_assets
    from vlexport.preprocess import preprocess_image

    processor = AutoProcessor.from_pretrained(str(tiny_base))
    spec = read_text_assets(tiny_base)["image_spec"]
    for photo in photos.values():
        img = photo.resize(size) if size else photo
        img = img.convert(mode)
        expected = processor.image_processor(images=img, return_tensors="np")["pixel_values"][0]
        got = preprocess_image(img, spec)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-6


def test_prompt_token_ids_equal_hf_processor(full_bundle, tiny_base, photos):
    from transformers import AutoProcessor

    import vlexport

    bundle = vlexport.load(full_bundle)
    processor = AutoProcessor.from_pretrained(str(tiny_base))
    for prompt in ["What is it?", "Describe: colours, shapes & numbers 123!", "  spaces  "]:
        text = bundle.chat_prompt(prompt)
        expected = processor(images=photos["astronaut"], text=text, return_tensors="np")["input_ids"][0].tolist()
        assert bundle.encode(text) == expected

"""A CPU bundle opens with onnxruntime-genai (ORT-GenAI) as it is, and generates the tokens vlexport's runtime does."""

import json
import shutil

import numpy as np
import onnxruntime_genai as og  # test dependency: onnxruntime-genai==0.18.0 (needs onnxruntime>=1.31)
import pytest

import vlexport
from vlexport.genai import write_genai_files
from vlexport.runtime import Bundle

MAX_NEW = 16
PROMPTS = {
    "question": "USER: <image>\nWhat is in this picture? ASSISTANT:",
    "describe": "<image>\nDescribe the photo in detail, then name one colour.",
}


@pytest.fixture(scope="module")
def genai_bundle(full_bundle, tmp_path_factory):
    """conftest's cpu bundle (tiny base + LoRA + BitFit): its build wrote the ORT-GenAI files itself. A copy, since
    test_genai_config_from_manifest writes them again."""
    out = tmp_path_factory.mktemp("genai") / "b"
    shutil.copytree(full_bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    return out, manifest, manifest["onnxruntime_genai"]["files"]


@pytest.fixture(scope="module")
def og_model(genai_bundle):
    return og.Model(str(genai_bundle[0]))


@pytest.fixture(scope="module")
def runtime(genai_bundle):
    return vlexport.load(genai_bundle[0])


def _og_generate(model, bundle: Bundle, image, text: str, max_new: int):
    """Greedy generation in ORT-GenAI from vlexport's preprocessing, fed as named tensors."""
    ids = bundle.encode(text)
    inputs = og.NamedTensors()
    # ORT-GenAI reads input_ids as int32: an int64 array is reinterpreted (1 0 55 0 ...), silently.
    inputs["input_ids"] = np.array([ids], dtype=np.int32)
    inputs["pixel_values"] = bundle.pixel_values(image)
    # Without it ORT-GenAI skips the vision model and the image positions get no features.
    inputs["num_image_tokens"] = np.array([bundle.num_image_tokens], dtype=np.int64)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new, do_sample=False)
    generator = og.Generator(model, params)
    generator.set_inputs(inputs)
    tokens, logits = [], []
    while not generator.is_done() and len(tokens) < max_new:
        # In 0.18 set_inputs runs the prefill and generate_next_token picks a token from the current logits, then
        # runs the model on it: the logits a token is chosen from are read before the call.
        logits.append(np.array(generator.get_logits()).reshape(-1))
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return ids, tokens, logits


def _reference_logits(bundle: Bundle, image, ids: list[int], tokens: list[int]) -> list[np.ndarray]:
    """vlexport's runtime steps (Bundle.prefill/step), teacher-forced on `tokens`: the logits of each step."""
    features = bundle.image_features(bundle.pixel_values(image))
    return list(bundle.teacher_forced_logits(ids, features, tokens))


def test_genai_config_from_manifest(genai_bundle, og_model):
    out, manifest, written = genai_bundle
    assert written == ["genai_config.json", "processor_config.json", "tokenizer_config.json"]
    assert all((out / name).exists() for name in written)
    cfg = json.loads((out / "genai_config.json").read_text())
    m = manifest["model"]
    assert og_model.type == cfg["model"]["type"] == "videochat_flash_qwen"
    assert cfg["search"]["past_present_share_buffer"] is False
    assert cfg["model"]["image_token_id"] == m["image_token_id"]
    assert cfg["model"]["vocab_size"] == m["vocab_size"]
    assert cfg["model"]["eos_token_id"] == manifest["generation"]["eos_token_ids"][0]
    assert cfg["model"]["bos_token_id"] == 1  # the fixture tokenizer's <s>
    assert cfg["model"]["vision"]["num_visual_tokens"] == m["num_image_tokens"]
    dec = cfg["model"]["decoder"]
    assert (dec["hidden_size"], dec["head_size"]) == (m["hidden_size"], m["head_dim"])
    assert dec["num_hidden_layers"] == m["num_layers"]
    assert (dec["num_attention_heads"], dec["num_key_value_heads"]) == (m["num_attention_heads"], m["num_kv_heads"])
    assert dec["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert dec["outputs"]["present_value_names"] == "present.%d.value"
    # The files are part of the bundle: listed with their sha256, and the bundle loads.
    assert all(name in manifest["files"] for name in written)
    vlexport.load(out)
    # Writing them again changes nothing but keeps a tokenizer_config.json that is already there.
    assert write_genai_files(out, manifest) == ["genai_config.json", "processor_config.json"]
    assert json.loads((out / "genai_config.json").read_text()) == cfg


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
@pytest.mark.parametrize("photo", ["astronaut", "chelsea"])  # square 512x512, non-square 300x451
def test_genai_tokens_match_runtime(og_model, runtime, photos, photo, prompt):
    image, text = photos[photo], PROMPTS[prompt]
    ids, tokens, logits = _og_generate(og_model, runtime, image, text, MAX_NEW)
    expected = runtime.generate(image, raw_prompt=text, max_new_tokens=MAX_NEW)
    assert ids == expected.prompt_ids
    assert tokens == expected.token_ids
    # Greedy tokens of a tiny random model repeat a lot; the logits of every step (prefill's last position
    # included) pin down that vision, embedding, mask, positions and cache are all used the same way.
    reference = _reference_logits(runtime, image, ids, tokens)
    assert len(logits) == len(reference)
    for step, (got, want) in enumerate(zip(logits, reference)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(), err_msg=f"step {step}")


def test_genai_image_changes_prefill(og_model, runtime, photos):
    """The image reaches the decoder through ORT-GenAI: two photos give different prefill logits."""
    text = PROMPTS["question"]
    first = _og_generate(og_model, runtime, photos["astronaut"], text, 1)[2][0]
    second = _og_generate(og_model, runtime, photos["chelsea"], text, 1)[2][0]
    assert np.abs(first - second).max() > 1e-3


def test_genai_processor_and_tokenizer(genai_bundle, og_model, runtime, photos, tmp_path):
    """ORT-GenAI's own image processor (processor_config.json) equals vlexport's on a square photo; its
    tokenizer decodes like vlexport's."""
    path = tmp_path / "astronaut.png"
    photos["astronaut"].save(path)
    processor = og_model.create_multimodal_processor()
    # videochat_flash_qwen's processor wants its own image marker; only pixel_values are compared here.
    tensors = processor("<|vision_start|>", images=og.Images.open(str(path)))
    pixels = tensors["pixel_values"].as_numpy()  # [1, num_images, 3, S, S]: one more axis than our vision takes
    ours = runtime.pixel_values(photos["astronaut"])
    np.testing.assert_allclose(pixels.reshape(ours.shape), ours, atol=1e-5)

    tokenizer = og.Tokenizer(og_model)
    ids = runtime.encode(PROMPTS["question"])[1:]  # without BOS: ORT-GenAI's encode does not add it here
    assert tokenizer.decode(np.array(ids, dtype=np.int32)) == runtime.decode(ids)

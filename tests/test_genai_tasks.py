"""Bank tasks in onnxruntime-genai: a merged-LoRA task and a bottleneck task open as og.Model through the config
overlay the build records, and generate exactly vlexport's tokens; a prefix task says why it cannot."""

import json

import numpy as np
import pytest
from test_genai import _og_generate

import vlexport
from vlexport.errors import VlexportError
from vlexport.genai import open_model

TEXT = "USER: <image>\nWhat is in this picture? ASSISTANT:"
MAX_NEW = 12


def og_generate(model, bundle, image, text, max_new):
    """Greedy tokens and the logits each was chosen from (test_genai's driver of ORT-GenAI)."""
    _ids, tokens, logits = _og_generate(model, bundle, image, text, max_new)
    return tokens, logits


def first_logits(bundle, image, text, task):
    """vlexport's prefill logits for the task (what the first token is chosen from)."""
    features = bundle.image_features(bundle.pixel_values(image), task)
    return bundle.prefill(bundle.encode(text), features, task).logits[0]


def bank_bundle(base, tmp, with_prefix: bool, seed=5):
    from test_tasks import make_prefix

    from vlexport.build import build
    from vlexport.fixture import make_adapterhub_bottleneck, make_lora

    lora = make_lora(base, tmp / "lora", seed=seed)
    language = make_adapterhub_bottleneck(base, tmp / "bn", "language")
    vision = make_adapterhub_bottleneck(base, tmp / "bnv", "vision", seed=4)
    adapters = [f"lora={lora}", f"bn={language}", f"bn={vision}"]
    if with_prefix:
        adapters.append(f"prefix={make_prefix(base, tmp / 'prefix', seed=2, tokens=4, projection=False)}")
    out = tmp / "bundle"
    build(base, adapters, out, verify=False)
    return out


@pytest.fixture(scope="module")
def tiny_bank(tiny_base, tmp_path_factory):
    return bank_bundle(tiny_base, tmp_path_factory.mktemp("genai-bank"), with_prefix=True)


def test_manifest_records_an_overlay_per_task(tiny_bank):
    entry = json.loads((tiny_bank / "manifest.json").read_text())["onnxruntime_genai"]["tasks"]
    # A swappable LoRA task, like a bottleneck task, is its weights baked as the slot defaults of graph-only copies.
    assert entry["lora"]["overlay"] == {"model": {"decoder": {"filename": "decoder.task-lora.onnx"},
                                                  "vision": {"filename": "vision.task-lora.onnx"}}}
    assert entry["bn"]["overlay"] == {"model": {"decoder": {"filename": "decoder.task-bn.onnx"},
                                                "vision": {"filename": "vision.task-bn.onnx"}}}
    # The baked copies are graphs only: their weights are read from the base part's file.
    import onnx

    graph = onnx.load(str(tiny_bank / "decoder.task-bn.onnx"), load_external_data=False)
    locations = {e.value for i in graph.graph.initializer for e in i.external_data if e.key == "location"}
    assert locations == {"decoder.onnx.data"} and not (tiny_bank / "decoder.task-bn.onnx.data").exists()
    assert "KV prefix" in entry["prefix"]["unsupported"]
    with pytest.raises(VlexportError, match="cannot run in onnxruntime-genai"):
        open_model(tiny_bank, "prefix")


@pytest.mark.parametrize("task", [None, "lora", "bn"])
def test_genai_task_tokens_match_runtime(tiny_bank, photos, task):
    runtime = vlexport.load(tiny_bank)
    model = open_model(tiny_bank, task)
    for photo in ("astronaut", "chelsea"):
        tokens, logits = og_generate(model, runtime, photos[photo], TEXT, MAX_NEW)
        assert tokens == runtime.generate(photos[photo], raw_prompt=TEXT, max_new_tokens=MAX_NEW, task=task).token_ids
        want = first_logits(runtime, photos[photo], TEXT, task)
        np.testing.assert_allclose(logits[0], want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_tasks_really_differ_in_genai(tiny_bank, photos):
    runtime = vlexport.load(tiny_bank)
    firsts = [og_generate(open_model(tiny_bank, t), runtime, photos["astronaut"], TEXT, 1)[1][0] for t in (None, "lora", "bn")]
    assert min(np.abs(a - b).max() for i, a in enumerate(firsts) for b in firsts[i + 1:]) > 1e-2


@pytest.mark.slow  # the small fixture (about 4 minutes on 2 cores); the tiny bank above covers the same paths
def test_small_fixture_with_lora_and_bank_task_in_genai(tmp_path_factory, photos):
    """Issue 8's done criterion: the small (LLaVA-1.5-shaped) fixture with a merged LoRA and bank tasks; og.Model
    gives vlexport run's tokens on a square and a non-square photo."""
    from vlexport.fixture import make_llava

    tmp = tmp_path_factory.mktemp("genai-small")
    base = make_llava(tmp / "small", "small")
    bundle = bank_bundle(base, tmp, with_prefix=False)
    runtime = vlexport.load(bundle)
    for task in (None, "lora", "bn"):
        model = open_model(bundle, task)
        for photo in ("astronaut", "chelsea"):  # 512x512 and 451x300
            tokens, _ = og_generate(model, runtime, photos[photo], TEXT, 8)
            assert tokens == runtime.generate(photos[photo], raw_prompt=TEXT, max_new_tokens=8, task=task).token_ids

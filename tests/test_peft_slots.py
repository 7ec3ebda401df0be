"""Swappable forms of PEFT methods (issue 18 item 2): named IA3, VeRA and AdaLoRA tasks fed through the LoRA slots
over one base graph (IA3 as per-input/per-output scales, VeRA and AdaLoRA as a and b), switched per request and mixed
in a batch. Every adapter is made with the real PEFT and moved off its identity init; the reference is PEFT's
unmerged forward (backends/torch_reference.py), never the slots."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from vlexport.cli import app

PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
TASKS = ("ia3", "vera", "ada")
TYPES = {"ia3": "IA3", "vera": "VERA", "ada": "ADALORA"}


@pytest.fixture(scope="module")
def peft_bank(tiny_gqa_base, tmp_path_factory):
    """IA3 (k/v/q/o/gate scaled on their outputs, down_proj/fc1/linear_2 on their inputs), VeRA and AdaLoRA (after
    its rank allocation) tasks over the vision tower, projector and language model, built with verify."""
    from vlexport.fixture import make_peft_adapter

    tmp = tmp_path_factory.mktemp("peft-bank")
    adapters = {name: make_peft_adapter(tiny_gqa_base, tmp / name, TYPES[name], seed=60 + i, scale=0.3)
                for i, name in enumerate(TASKS)}
    out = tmp / "bundle"
    args = ["build", "--base", str(tiny_gqa_base), "-o", str(out), "--json", "--quiet"]
    for name, path in adapters.items():
        args += ["--adapter", f"{name}={path}"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    return out, adapters


@pytest.fixture(scope="module")
def expected(peft_bank, tiny_gqa_base, photos):
    """Per task (None = the base) and photo: PEFT's unmerged greedy tokens, and how far the task moves the logits
    from the base's along them."""
    from transformers import AutoProcessor

    from vlexport.adapters import load_adapter
    from vlexport.backends.torch_reference import build_reference, reference_generate, reference_logits

    _, adapters = peft_bank
    processor = AutoProcessor.from_pretrained(str(tiny_gqa_base))
    base = build_reference(tiny_gqa_base, [])
    out = {}
    for task in (None, *TASKS):
        model = build_reference(tiny_gqa_base, [load_adapter(adapters[task])]) if task else base
        for photo in ("astronaut", "coffee"):
            tokens = reference_generate(model, processor, photos[photo], PROMPT, 16)
            inputs = processor(images=photos[photo], text=PROMPT, return_tensors="pt")
            moved = np.abs(reference_logits(model, inputs, tokens) - reference_logits(base, inputs, tokens)).max()
            out[task, photo] = tokens, float(moved)
    return out


def test_bank_has_no_copy_of_a_part(peft_bank):
    out, _ = peft_bank
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parity"]["passed"]
    tasks = manifest["tasks"]
    assert set(tasks) == set(TASKS)
    assert all(not t["parts"] and t["parts_bytes"] == 0 for t in tasks.values())
    assert sorted(f.name for f in out.glob("*.data")) == ["decoder.onnx.data", "embed.onnx.data", "vision.onnx.data"]
    assert manifest["parts"]["decoder"]["form"] == "ort-native"
    for name in TASKS:
        (described,) = tasks[name]["adapters"]
        assert described["merged"] is False and described["slots"] == "lora", described
        assert tasks[name]["lora_parts"] == ["decoder", "vision"]
    groups = manifest["lora_slots"]
    # IA3: a scale on the output (bias included: CLIP's q_proj has one) or, for feedforward modules, on the input.
    assert groups["decoder"]["layers.self_attn.k_proj"]["out_scale"]
    assert groups["decoder"]["layers.mlp.down_proj"]["in_scale"]
    assert not groups["decoder"]["layers.mlp.down_proj"].get("out_scale")
    assert groups["vision"]["layers.self_attn.q_proj"]["out_scale"] and groups["vision"]["layers.mlp.fc1"]["in_scale"]
    assert groups["vision"]["projector.linear_2"]["in_scale"]
    # Packs: IA3 feeds scales only; VeRA (r = 8) and AdaLoRA (its kept ranks) feed a and b, no scales.
    from safetensors.numpy import load_file

    packs = {n: load_file(str(out / tasks[n]["pack"])) for n in TASKS}
    assert packs["ia3"] and all(k.endswith(("in_scale", "out_scale")) for k in packs["ia3"])
    assert packs["vera"]["decoder_lora.layers.self_attn.q_proj.a"].shape[-1] == 8
    assert all(k.endswith((".a", ".b")) for n in ("vera", "ada") for k in packs[n])


@pytest.mark.parametrize("task", TASKS)
def test_each_task_runs_peft_unmerged_tokens(peft_bank, expected, photos, tmp_path, task):
    out, _ = peft_bank
    for photo in ("astronaut", "coffee"):
        tokens, moved = expected[task, photo]
        assert moved > 1e-2, "the task changes nothing: this test would pass without it"
        photos[photo].save(tmp_path / "p.png")
        r = CliRunner().invoke(app, ["run", str(out), "--image", str(tmp_path / "p.png"), "--raw-prompt", PROMPT,
                                     "--max-new-tokens", "16", "--json", "--task", task])
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["token_ids"] == tokens, photo
    assert any(expected[task, p][0] != expected[None, p][0] for p in ("astronaut", "coffee"))  # tokens differ too


def test_switching_per_request_and_mixed_batch(peft_bank, expected, photos):
    """One process, one set of sessions: alternating tasks (base included) gives each task's own tokens, and a batch
    whose rows are different tasks gives each row's tokens alone."""
    import vlexport

    out, _ = peft_bank
    bundle = vlexport.load(out)
    for task in ("ia3", "vera", None, "ada", "ia3", "ada", None, "vera"):
        got = bundle.generate(photos["coffee"], raw_prompt=PROMPT, max_new_tokens=16, task=task).token_ids
        assert got == expected[task, "coffee"][0], task
    requests = [vlexport.Request(photos[p], raw_prompt=PROMPT, task=t, max_new_tokens=16)
                for t, p in (("vera", "astronaut"), (None, "coffee"), ("ia3", "astronaut"), ("ada", "coffee"))]
    assert len({bundle.decoder_group(r.task) for r in requests}) == 1  # one decoder graph serves all four
    got = [g.token_ids for g in bundle.generate_batch(requests)]
    assert got == [expected[r.task, p][0] for r, p in zip(requests, ("astronaut", "coffee", "astronaut", "coffee"))]


def test_what_has_no_slot_form_is_merged_for_its_task(tiny_gqa_base, tmp_path):
    """LoHa has no exact slot form; IA3 next to a LoRA on one task multiplies what the LoRA adds, in the order
    given, so that task is merged whole; --lora-mode merged merges every task."""
    from vlexport.fixture import make_lora, make_peft_adapter
    from vlexport.tasks import load_bank

    loha = make_peft_adapter(tiny_gqa_base, tmp_path / "loha", "LOHA", seed=71)
    ia3 = make_peft_adapter(tiny_gqa_base, tmp_path / "ia3", "IA3", seed=72)
    vera = make_peft_adapter(tiny_gqa_base, tmp_path / "vera", "VERA", seed=73)
    lora = make_lora(tiny_gqa_base, tmp_path / "lora", seed=74)
    logged = []
    _, tasks = load_bank([f"a={loha}", f"b={ia3}", f"b={lora}", f"c={vera}", f"c={lora}", f"d={ia3}"],
                         log=logged.append)
    swappable = {name: [a.swappable for a in adapters] for name, adapters in tasks.items()}
    assert swappable == {"a": [False], "b": [False, False], "c": [True, True], "d": [True]}
    assert any("LoHa" in m and "no exact LoRA-slot form" in m for m in logged)
    assert any(m.startswith("task b:") for m in logged)
    _, merged = load_bank([f"c={vera}", f"d={ia3}"], lora_mode="merged")
    assert not any(a.swappable for adapters in merged.values() for a in adapters)


@pytest.mark.parametrize("task", ["ia3", "vera"])
def test_genai_overlay_bakes_the_task(peft_bank, expected, photos, task):
    """ORT-GenAI feeds no adapter inputs: the task's graph-only copies take its slot tensors (IA3's scales
    included) as their defaults, and og.Model answers with PEFT's unmerged tokens."""
    from test_genai import _og_generate

    import vlexport
    from vlexport.genai import open_model

    out, _ = peft_bank
    _ids, tokens, _logits = _og_generate(open_model(out, task), vlexport.load(out), photos["astronaut"], PROMPT, 16)
    assert tokens == expected[task, "astronaut"][0]


def test_new_slot_inputs_are_in_the_engine_profiles(peft_bank):
    """The portable vision graph (TensorRT's) takes IA3's scales with one row per image, which the profiles cover."""
    from vlexport.trt.profiles import part_profiles

    out, _ = peft_bank
    manifest = json.loads((out / "manifest.json").read_text())
    shapes = {"batch": [1, 1, 2], "images": [1, 1, 1], "prompt_tokens": [1, 64, 128], "context": 256,
              "lora_rank": 64}
    (profile,) = part_profiles("vision", manifest["parts"]["vision"]["inputs"], shapes, 4)
    lo, _, hi = profile["vision_lora.layers.mlp.fc1.in_scale"]
    assert (lo[1], hi[1], hi[2]) == (1, 2, 32)
    lo, _, hi = profile["vision_lora.layers.self_attn.q_proj.a"]
    assert (lo[3], hi[3]) == (0, 64)

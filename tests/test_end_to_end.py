"""The issue's acceptance path: build through the CLI, run through the CLI, tokens identical to PyTorch (unmerged)."""

import json

import pytest
from typer.testing import CliRunner

from vlexport.cli import app

RAW_PROMPTS = ["USER: <image>\nWhat is shown here? ASSISTANT:", "USER: <image>\nDescribe the colours in detail. ASSISTANT:"]


@pytest.fixture(scope="module")
def reference(tiny_base, full_lora, bitfit_dump):
    from transformers import AutoProcessor

    from vlexport.adapters import load_adapter
    from vlexport.backends.torch_reference import build_reference

    model = build_reference(tiny_base, [load_adapter(full_lora), load_adapter(bitfit_dump)])
    assert type(model).__name__ == "PeftModel"  # LoRA applied unmerged, by PEFT
    return model, AutoProcessor.from_pretrained(str(tiny_base))


@pytest.mark.parametrize("photo", ["astronaut", "chelsea", "rocket"])
@pytest.mark.parametrize("prompt", RAW_PROMPTS)
def test_cli_run_matches_pytorch_greedy(full_bundle, reference, photos, photo, prompt, tmp_path):
    from vlexport.backends.torch_reference import reference_generate

    image_path = tmp_path / f"{photo}.png"
    photos[photo].save(image_path)
    result = CliRunner().invoke(
        app, ["run", str(full_bundle), "--image", str(image_path), "--raw-prompt", prompt, "--max-new-tokens", "32", "--json"]
    )
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    model, processor = reference
    expected = reference_generate(model, processor, photos[photo], prompt, 32)
    assert len(expected) == 32
    assert got["token_ids"] == expected
    assert set(got["timings"]) >= {"vision_ms", "prefill_ms", "decode_ms_per_token"}


def test_adapters_change_the_output(full_bundle, tiny_base, photos):
    """Guards the test above against passing trivially: the base alone answers differently."""
    import vlexport
    from vlexport.backends.torch_reference import reference_generate
    from vlexport.model import load_llava
    from transformers import AutoProcessor

    base_tokens = reference_generate(load_llava(tiny_base), AutoProcessor.from_pretrained(str(tiny_base)),
                                     photos["astronaut"], RAW_PROMPTS[0], 32)
    bundle_tokens = vlexport.load(full_bundle).generate(photos["astronaut"], raw_prompt=RAW_PROMPTS[0]).token_ids
    assert base_tokens != bundle_tokens


def test_python_api_chat_prompt(full_bundle, photos, tiny_base):
    from transformers import AutoProcessor

    import vlexport

    bundle = vlexport.load(full_bundle)
    processor = AutoProcessor.from_pretrained(str(tiny_base))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is the cat?"}]}]
    assert bundle.chat_prompt("Where is the cat?") == processor.apply_chat_template(messages, add_generation_prompt=True)
    a = bundle.generate(photos["chelsea"], prompt="Where is the cat?", max_new_tokens=8)
    b = bundle.generate(photos["chelsea"], raw_prompt=bundle.chat_prompt("Where is the cat?"), max_new_tokens=8)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 8


def test_release_vision_closes_the_vision_session_before_the_decoder_opens(full_bundle, photos):
    """generate(release_vision=True), as `vlexport run` calls it: the vision session is closed once the image is
    encoded and before the decoder's session opens (so that a 7B's decoder reuses its memory); the tokens are the
    same, and the next image opens it again."""
    import vlexport

    kept = vlexport.load(full_bundle).generate(photos["chelsea"], prompt="Where is the cat?", max_new_tokens=6)
    bundle = vlexport.load(full_bundle)
    vision, decoder = bundle.runners["vision"], bundle.runners["decoder"]
    opened = []
    infer = vision.infer

    def record(feed):  # the decoder is not open yet when the image is encoded
        opened.append("session" in decoder.__dict__)
        return infer(feed)

    vision.infer = record
    first = bundle.generate(photos["chelsea"], prompt="Where is the cat?", max_new_tokens=6, release_vision=True)
    assert first.token_ids == kept.token_ids
    assert opened == [False] and "session" not in vision.__dict__ and "session" in decoder.__dict__
    again = bundle.generate(photos["chelsea"], prompt="Where is the cat?", max_new_tokens=6)
    assert again.token_ids == kept.token_ids and "session" in vision.__dict__


def test_sampling_is_seeded(full_bundle, photos):
    import vlexport

    bundle = vlexport.load(full_bundle)
    run = lambda seed: bundle.generate(photos["coffee"], prompt="Hi", max_new_tokens=12, temperature=1.5, top_p=0.9, seed=seed).token_ids
    assert run(1) == run(1)
    assert run(1) != run(2)


def test_manifest_describes_the_bundle(full_bundle, full_lora, bitfit_dump):
    from vlexport.files import sha256_file

    manifest = json.loads((full_bundle / "manifest.json").read_text())
    assert manifest["schema_version"] == 3
    assert set(manifest["parts"]) == {"vision", "embed", "decoder"}
    dec = manifest["parts"]["decoder"]
    names = [i["name"] for i in dec["inputs"]]
    assert names[:4] == ["inputs_embeds", "attention_mask", "position_ids", "past_key_values.0.key"]
    assert dec["inputs"][3]["shape"][2] == "past_sequence"
    assert [o["name"] for o in dec["outputs"]][:2] == ["logits", "present.0.key"]
    emb = manifest["parts"]["embed"]["inputs"][1]
    assert emb["name"] == "image_features" and emb["shape"][0] == "num_image_features"
    kinds = [(a["kind"], a["format"], a["merged"]) for a in manifest["adapters"]]
    assert kinds == [("lora", "peft", True), ("bitfit", "bitfit-dump", True)]
    assert manifest["adapters"][1]["sha256"] == sha256_file(bitfit_dump)
    assert manifest["parity"]["passed"] is True
    assert manifest["files"]["decoder.onnx"]
    assert len(manifest["base"]["fingerprint"]) == 64


def test_inspect_bundle_and_adapter(full_bundle, full_lora):
    r = CliRunner().invoke(app, ["inspect", str(full_bundle), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["parts"]["vision"]["file"] == "vision.onnx"
    r = CliRunner().invoke(app, ["inspect", str(full_lora), "--json"])
    info = json.loads(r.stdout)
    assert info["kind"] == "lora" and info["dora"] and info["rslora"] and "lm_head.weight" in info["replaced_tensors"]


def test_tampered_bundle_is_refused(full_bundle, tmp_path, photos):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(full_bundle, copy)
    with open(copy / "embed.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    photos["astronaut"].save(tmp_path / "a.png")
    r = CliRunner().invoke(app, ["run", str(copy), "--image", str(tmp_path / "a.png"), "--prompt", "hi"])
    assert r.exit_code == 2
    assert "embed.onnx.data" in r.output and "sha256" in r.output


def test_gqa_base_builds_and_matches(tiny_gqa_base, tmp_path, photos):
    """num_key_value_heads < num_attention_heads: KV cache I/O has the kv head count."""
    from transformers import AutoProcessor

    import vlexport
    from vlexport.backends.torch_reference import reference_generate
    from vlexport.build import build
    from vlexport.fixture import make_lora
    from vlexport.adapters import load_adapter
    from vlexport.backends.torch_reference import build_reference

    lora = make_lora(tiny_gqa_base, tmp_path / "lora", seed=5)
    manifest = build(tiny_gqa_base, [lora], tmp_path / "b", verify=False)
    assert manifest["parts"]["decoder"]["inputs"][3]["shape"][1] == 2
    bundle = vlexport.load(tmp_path / "b")
    ref = build_reference(tiny_gqa_base, [load_adapter(lora)])
    processor = AutoProcessor.from_pretrained(str(tiny_gqa_base))
    for name in ("astronaut", "chelsea"):
        expected = reference_generate(ref, processor, photos[name], RAW_PROMPTS[1], 32)
        assert bundle.generate(photos[name], raw_prompt=RAW_PROMPTS[1], max_new_tokens=32).token_ids == expected


def test_runtime_does_not_import_torch(full_bundle, tmp_path, photos):
    """The runtime is what C++-adjacent and edge users ship: ONNX Runtime, tokenizers, numpy, Pillow, jinja2."""
    import subprocess
    import sys

    photos["astronaut"].save(tmp_path / "a.png")
    code = (
        "import sys, vlexport; b = vlexport.load(sys.argv[1]); "
        "r = b.generate(sys.argv[2], prompt='hi', max_new_tokens=4); "
        "bad = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
        "assert not bad, bad; print(len(r.token_ids))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(full_bundle), str(tmp_path / "a.png")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "4"

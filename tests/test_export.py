"""The three-part ONNX contract, exercised directly on ONNX Runtime."""

import numpy as np
import pytest
import torch

from vlexport.errors import ParityError
from vlexport.export.onnx import check_part, export_part, part_specs
from vlexport.model import facts_from_config, load_llava


@pytest.fixture(scope="module")
def exported(tiny_base, tmp_path_factory):
    import json

    model = load_llava(tiny_base)
    facts = facts_from_config(json.loads((tiny_base / "config.json").read_text()))
    specs = {s.name: s for s in part_specs(model, facts)}
    out = tmp_path_factory.mktemp("parts")
    paths = {name: export_part(spec, out / f"{name}.onnx") for name, spec in specs.items()}
    return model, facts, specs, paths


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_embed_places_features_in_order_and_accepts_empty(exported):
    model, facts, specs, paths = exported
    sess = _session(paths["embed"])
    H = facts.hidden_size
    ids = np.array([[5, facts.image_token_id, 7, facts.image_token_id, facts.image_token_id]], dtype=np.int64)
    feats = np.arange(3 * H, dtype=np.float32).reshape(3, H)
    out = sess.run(None, {"input_ids": ids, "image_features": feats})[0]
    assert np.array_equal(out[0, 1], feats[0]) and np.array_equal(out[0, 3], feats[1]) and np.array_equal(out[0, 4], feats[2])
    table = model.model.language_model.embed_tokens.weight.detach().numpy()
    assert np.allclose(out[0, 0], table[5]) and np.allclose(out[0, 2], table[7])
    empty = sess.run(None, {"input_ids": np.array([[9]], dtype=np.int64), "image_features": np.zeros((0, H), np.float32)})[0]
    assert np.allclose(empty[0, 0], table[9])


def test_decoder_prefill_then_decode_equals_one_pass(exported):
    """KV-cache path: prefill 6 tokens (past 0) then 3 single steps == one-pass prefills of the same prefixes."""
    model, facts, specs, paths = exported
    sess = _session(paths["decoder"])
    L, kv, hd, H = facts.num_layers, facts.num_kv_heads, facts.head_dim, facts.hidden_size
    x = np.random.default_rng(0).standard_normal((1, 9, H)).astype(np.float32)
    empty = {f"past_key_values.{i}.{k}": np.zeros((1, kv, 0, hd), np.float32) for i in range(L) for k in ("key", "value")}
    full = sess.run(["logits"], {"inputs_embeds": x, "attention_mask": np.ones((1, 9), np.int64),
                                 "position_ids": np.arange(9)[None], **empty})[0]
    names = ["logits"] + [f"present.{i}.{k}" for i in range(L) for k in ("key", "value")]
    out = sess.run(names, {"inputs_embeds": x[:, :6], "attention_mask": np.ones((1, 6), np.int64),
                           "position_ids": np.arange(6)[None], **empty})
    steps = [out[0][0, -1]]
    for t in range(6, 9):
        past = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], out[1:])}
        out = sess.run(names, {"inputs_embeds": x[:, t : t + 1], "attention_mask": np.ones((1, t + 1), np.int64),
                               "position_ids": np.array([[t]]), **past})
        steps.append(out[0][0, -1])
    assert full.shape == (1, 1, facts.vocab_size)  # last position only
    assert np.abs(steps[-1] - full[0, -1]).max() < 1e-5
    assert out[1].shape == (1, kv, 9, hd)
    # Each step's logits equal a one-pass prefill of the same prefix.
    for t, step in zip(range(6, 10), steps):
        prefix = sess.run(["logits"], {"inputs_embeds": x[:, :t], "attention_mask": np.ones((1, t), np.int64),
                                       "position_ids": np.arange(t)[None], **empty})[0]
        assert np.abs(step - prefix[0, -1]).max() < 1e-5


def test_export_check_names_the_broken_output(exported, tmp_path):
    model, facts, specs, paths = exported
    spec = specs["vision"]
    with torch.no_grad():
        spec.module.projector.linear_2.weight.mul_(1.01)
    try:
        with pytest.raises(ParityError, match="part 'vision' output 'image_features'"):
            check_part(spec, paths["vision"], rel_tol=1e-4)
    finally:
        with torch.no_grad():
            spec.module.projector.linear_2.weight.div_(1.01)
    assert check_part(spec, paths["vision"], rel_tol=1e-4)["max_rel_error"] < 1e-5

"""The runtime's one KV loop (Bundle.prefill / Bundle.step / KvState), on both decoder forms.

A batch of rows of different lengths and tasks must give each row exactly the logits that row gives alone: on the
ORT-native form (rows of one shared buffer, right-padded) and on the portable form (left-padded concat caches, as
TensorRT runs it; here a jetson-orin bundle's ONNX parts on ONNX Runtime). The one-row reference is the plain
decoder graph fed the whole sequence at once (no cache), so the loop is not checked against itself.
"""

import numpy as np
import pytest

from vlexport.runtime import Bundle


@pytest.fixture(scope="module")
def bank_dirs(tiny_base, tmp_path_factory):
    """One bank (BitFit merged; an AdapterHub prefix task, positions from 0, and a PEFT prefix task, from P) per
    decoder form: cpu (ORT-native) and jetson-orin (portable)."""
    from test_tasks import make_prefix

    from vlexport.build import build
    from vlexport.fixture import make_adapterhub_prefix, make_bitfit

    tmp = tmp_path_factory.mktemp("kvloop")
    bitfit = make_bitfit(tiny_base, tmp / "bitfit.safetensors", seed=41)
    hub = make_adapterhub_prefix(tiny_base, tmp / "hub", prefix_length=5, flat=True, seed=42)
    peft = make_prefix(tiny_base, tmp / "peft", seed=43, tokens=3, projection=False)
    specs = [str(bitfit), f"hub={hub}", f"peft={peft}"]
    out = {}
    for target in ("cpu", "jetson-orin"):
        out[target] = tmp / target
        build(tiny_base, specs, out[target], target=target, verify=False)
    return out


def _whole_sequence_logits(bundle: Bundle, ids: list[int], task) -> np.ndarray:
    """Each position's next-token logits from one decoder run per prefix of the sequence (prompt + new tokens
    fed at once from the task's prefix pack, no decode steps): [len(ids), V] for the last len(ids) - n positions."""
    pack, n_prefix, offset = bundle.prefix(task)
    past = bundle.empty_past() if pack is None else {k: v[None] for k, v in pack.items()}
    runner = bundle.runner("decoder", task)
    embeds = bundle.embed(np.array([ids], np.int64), None, task)
    out = runner.infer({"inputs_embeds": embeds, "attention_mask": np.ones((1, n_prefix + len(ids)), np.int64),
                        "position_ids": offset + np.arange(len(ids), dtype=np.int64)[None], **past,
                        **bundle.slot_feed("decoder", task)})
    return out["logits"][0, -1]


@pytest.mark.parametrize("target,form", [("cpu", "ort-native"), ("jetson-orin", "portable")])
def test_a_batch_of_rows_gives_each_row_its_own_logits(bank_dirs, target, form):
    bundle = Bundle(bank_dirs[target])
    assert bundle.decoder_form() == form
    rng = np.random.default_rng(0)
    rows = [(list(rng.integers(3, 200, size=n)), task) for n, task in ((7, None), (12, "hub"), (4, "peft"))]
    assert len({bundle.decoder_group(t) for _, t in rows}) == 1  # prefix tasks share the base's decode steps
    state = None
    for ids, task in rows:
        state = bundle.prefill(ids, None, task, into=state, rows=3, capacity=8)  # capacity grows past 8 (native)
    assert state.tasks == [None, "hub", "peft"]
    seqs = [list(ids) for ids, _ in rows]
    got = [[state.logits[i]] for i in range(3)]
    for step in range(5):
        tokens = [int(np.argmax(got[i][-1])) for i in range(3)]
        logits = bundle.step(state, tokens)
        for i in range(3):
            seqs[i].append(tokens[i])
            got[i].append(logits[i])
        if step == 2:  # the middle row leaves: the others keep their caches and positions
            state.keep([0, 2])
            rows, seqs, got = [rows[0], rows[2]], [seqs[0], seqs[2]], [got[0], got[2]]
            break
    for step in range(3):
        tokens = [int(np.argmax(g[-1])) for g in got]
        logits = bundle.step(state, tokens)
        for i in range(len(got)):
            seqs[i].append(tokens[i])
            got[i].append(logits[i])
    base = bundle.prefix(None)[1]
    for (ids, task), seq, g in zip(rows, seqs, got):
        n = len(ids)
        for k, logits in enumerate(g):
            want = _whole_sequence_logits(bundle, seq[: n + k], task)
            np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(),
                                       err_msg=f"{form} row task={task} step {k}")
    assert base == 0
    # The prefix tasks do change the logits (else the check above could not tell positions or packs apart).
    ids = rows[0][0]
    assert np.abs(_whole_sequence_logits(bundle, ids, "hub") - _whole_sequence_logits(bundle, ids, None)).max() > 1e-2


def test_teacher_forcing_and_generate_use_the_same_loop(bank_dirs, photos):
    bundle = Bundle(bank_dirs["cpu"])
    text = bundle.chat_prompt("What is this?")
    gen = bundle.generate(photos["astronaut"], raw_prompt=text, max_new_tokens=6, task="hub")
    features = bundle.image_features(bundle.pixel_values(photos["astronaut"]), "hub")
    logits = bundle.teacher_forced_logits(gen.prompt_ids, features, gen.token_ids, "hub")
    assert logits.argmax(-1).tolist() == gen.token_ids


def test_rewind_takes_a_step_back(bank_dirs):
    for target in bank_dirs:
        bundle = Bundle(bank_dirs[target])
        state = bundle.prefill(list(range(3, 40)), None, "peft", capacity=64)
        first = bundle.step(state, [5]).copy()
        state.rewind(1)
        again = bundle.step(state, [5])
        np.testing.assert_array_equal(first, again)
        assert int(state.lengths[0]) == 3 + 37 + 1

"""The ORT-native decoder form (export/ort_native.py) and its shared KV buffer (backends/ort_kv.py).

The reference is the torch DecoderPart on the same merged weights (the module the portable graph is exported from),
run with an explicit cache: every logit and every cached key/value is compared, through prefill and decode steps,
with rows of different lengths, prefix packs in both position conventions, bottleneck slots and LoRA slots. The slot
math is also checked without DecoderPart's slot code: a fed LoRA equals its weights merged into the base, and a
mixed batch (one adapter per row) equals each row run alone."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from vlexport import lora_slots, slots  # noqa: E402
from vlexport.backends.ort_kv import SharedKvBuffer  # noqa: E402
from vlexport.errors import ParityError, VlexportError  # noqa: E402
from vlexport.export import ort_native  # noqa: E402
from vlexport.export.onnx import add_slot_defaults  # noqa: E402
from vlexport.export.parts import DecoderPart, decoder_io_names  # noqa: E402

TOL = 1e-4  # relative to max(1, max|torch|), as the export check's export_rel_tol for fp32


@pytest.fixture(scope="module")
def gqa_model(tiny_gqa_base):
    """tiny-gqa (4 query heads over 2 KV heads), with a non-zero bias on q_proj and down_proj as BitFit leaves."""
    from vlexport.model import EXPORT_ATTENTION, load_llava

    model = load_llava(tiny_gqa_base, dtype="float32", attention=EXPORT_ATTENTION["float32"])
    g = torch.Generator().manual_seed(5)
    for layer in model.model.language_model.layers:
        for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
            lin.bias = torch.nn.Parameter(0.05 * torch.randn(lin.out_features, generator=g))
    return model


def _geometry(model):
    cfg = model.config.text_config
    return cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size


@pytest.fixture(scope="module")
def native(gqa_model, tmp_path_factory):
    path = ort_native.write_native_decoder(gqa_model, tmp_path_factory.mktemp("native") / "decoder.onnx")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), path


@pytest.fixture(scope="module")
def native_slots(gqa_model, tmp_path_factory):
    L, _, _, H = _geometry(gqa_model)
    path = ort_native.write_native_decoder(gqa_model, tmp_path_factory.mktemp("native_slots") / "decoder.onnx", True)
    add_slot_defaults(path, slots.empty_feed("decoder", L, H))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def lora_geometry(gqa_model):
    """LoRA slots on every linear the native decoder has (q, k, v, o, gate, up, down, lm_head), DoRA scales on
    v_proj and lm_head."""
    L = gqa_model.config.text_config.num_hidden_layers
    layer = gqa_model.model.language_model.layers[0]
    geometry = {}
    for group in ort_native.NATIVE_LORA_GROUPS:
        linear = gqa_model.lm_head if group == "lm_head" else layer.get_submodule(group[len("layers.") :])
        geometry[group] = {"layers": 1 if group == "lm_head" else L, "in": linear.in_features,
                           "out": linear.out_features, "scale": group in ("layers.self_attn.v_proj", "lm_head")}
    return geometry


@pytest.fixture(scope="module")
def native_adapters(gqa_model, lora_geometry, tmp_path_factory):
    """The native decoder with bottleneck slots and LoRA slots on every linear, "no adapter" as their defaults."""
    L, _, _, H = _geometry(gqa_model)
    path = ort_native.write_native_decoder(gqa_model, tmp_path_factory.mktemp("native_adapters") / "decoder.onnx",
                                           True, lora_geometry)
    add_slot_defaults(path, {**slots.empty_feed("decoder", L, H),
                             **lora_slots.empty_feed({"decoder": lora_geometry}, "decoder")})
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), path


def _lora_feed(geometry, rank, seed):
    """One row's LoRA feed in graph input order (rank 0: the empty feed, unit scales)."""
    geo = {"decoder": geometry}
    feed = (lora_slots.sample_feed(geo, "decoder", rank, np.random.default_rng(seed)) if rank else
            lora_slots.empty_feed(geo, "decoder"))
    return {name: feed[name] for name in lora_slots.part_input_names(geo, "decoder")}


def _bottleneck_feed(model, width, seed, mix=(1.0, 1.0, 1.0), act=0):
    L, _, _, H = _geometry(model)
    return slots.sample_feed("decoder", L, H, width, np.random.default_rng(seed), mix=mix, act=act)


def _stack_rows(feeds):
    """One mixed-batch feed from per-row feeds (N = 1 each): LoRA and bottleneck widths zero-padded."""
    names = list(feeds[0])
    width = {n: lora_slots.rank_axis(n) if "_lora." in n else slots.width_axis(n) for n in names}
    row = {n: 1 if "_lora." in n else slots.ROW_AXIS for n in names}
    return lora_slots.stack_rows(feeds, width, row)


class TorchRows:
    """The reference: DecoderPart per row with its own growing cache (no padding anywhere)."""

    def __init__(self, model, slot=(), lora=None, bottleneck=None):
        self.part = DecoderPart(model, slots=bool(slot) if bottleneck is None else bottleneck, lora=lora)
        self.L, self.kv, self.hd, _ = _geometry(model)
        self.slot = slot
        self.past = {}

    def run(self, row, embeds, positions, prefix=None):
        if row not in self.past:
            self.past[row] = prefix or [torch.zeros(1, self.kv, 0, self.hd)] * (2 * self.L)
        n = self.past[row][0].shape[2] + embeds.shape[1]
        with torch.no_grad():
            out = self.part(torch.as_tensor(embeds), torch.ones(1, n, dtype=torch.long), torch.as_tensor(positions),
                            *self.past[row], *self.slot)
        self.past[row] = list(out[1:])
        return out[0].numpy()

    def assert_cache(self, buf, row):
        cache = buf.row_cache(row)
        for j, name in enumerate(cache):
            np.testing.assert_allclose(cache[name], self.past[row][j][0].numpy(), atol=TOL, rtol=0, err_msg=name)


def _embeds(g, rows, n, hidden):
    return torch.randn(rows, n, hidden, generator=g).numpy()


def test_rows_of_different_lengths_prefill_then_decode_in_place(gqa_model, native):
    session, path = native
    L, kv, hd, H = _geometry(gqa_model)
    ref = TorchRows(gqa_model)
    buf = SharedKvBuffer(session, L, kv, hd, rows=3, capacity=32)
    pointers = [v.data_ptr() for v in buf.values]
    g = torch.Generator().manual_seed(0)
    for row, n in enumerate((7, 2, 12)):
        x = _embeds(g, 1, n, H)
        logits = buf.prefill(row, x, np.arange(n)[None], {})
        np.testing.assert_allclose(logits, ref.run(row, x, np.arange(n)[None]), atol=TOL, rtol=0)
    for _ in range(4):
        x, positions = _embeds(g, 3, 1, H), buf.lengths[:, None].copy()
        logits = buf.step(x, positions, {})
        for row in range(3):
            np.testing.assert_allclose(logits[row], ref.run(row, x[row : row + 1], positions[row : row + 1])[0],
                                       atol=TOL, rtol=0)
    assert buf.lengths.tolist() == [11, 6, 16]
    # The keys/values were written into the preallocated arrays themselves: nothing was copied into a new present.
    for row in range(3):
        ref.assert_cache(buf, row)
    assert [v.data_ptr() for v in buf.values] == pointers == [a.ctypes.data for a in buf.arrays]
    import onnx

    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert "Concat" not in ops and {"GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization"} <= ops


def test_inactive_rows_keep_their_cache(gqa_model, native):
    session, _ = native
    L, kv, hd, H = _geometry(gqa_model)
    ref = TorchRows(gqa_model)
    buf = SharedKvBuffer(session, L, kv, hd, rows=2, capacity=6)
    g = torch.Generator().manual_seed(1)
    for row, n in enumerate((6, 3)):  # row 0 is full
        x = _embeds(g, 1, n, H)
        ref.run(row, x, np.arange(n)[None])
        buf.prefill(row, x, np.arange(n)[None], {})
    x, positions = _embeds(g, 2, 1, H), buf.lengths[:, None].copy()
    logits = buf.step(x, positions, {}, active=np.array([False, True]))
    np.testing.assert_allclose(logits[1], ref.run(1, x[1:], positions[1:])[0], atol=TOL, rtol=0)
    assert buf.lengths.tolist() == [6, 4]
    ref.assert_cache(buf, 0)
    ref.assert_cache(buf, 1)
    with pytest.raises(VlexportError, match="capacity"):
        buf.step(x, positions, {})  # row 0 has no room for an active token


@pytest.mark.parametrize("first", ["zero", "after_prefix"], ids=["adapterhub_positions", "peft_positions"])
def test_prefix_pack_prefills_the_buffer(gqa_model, native, first):
    session, _ = native
    L, kv, hd, H = _geometry(gqa_model)
    g = torch.Generator().manual_seed(2)
    P, n = 5, 4
    pack = [torch.randn(1, kv, P, hd, generator=g) for _ in range(2 * L)]
    names = [f"past_key_values.{i}.{k}" for i in range(L) for k in ("key", "value")]
    ref = TorchRows(gqa_model)
    buf = SharedKvBuffer(session, L, kv, hd, rows=2, capacity=20)
    buf.fill_prefix(1, {name: t[0].numpy() for name, t in zip(names, pack)})
    assert buf.lengths.tolist() == [0, P]
    start = 0 if first == "zero" else P
    x = _embeds(g, 1, n, H)
    positions = start + np.arange(n)[None]
    np.testing.assert_allclose(buf.prefill(1, x, positions, {}), ref.run(1, x, positions, prefix=list(pack)),
                               atol=TOL, rtol=0)
    x0 = _embeds(g, 1, 3, H)
    buf.prefill(0, x0, np.arange(3)[None], {})
    ref.run(0, x0, np.arange(3)[None])
    x, positions = _embeds(g, 2, 1, H), np.array([[3], [start + n]])
    logits = buf.step(x, positions, {})
    for row in range(2):
        np.testing.assert_allclose(logits[row], ref.run(row, x[row : row + 1], positions[row : row + 1])[0],
                                   atol=TOL, rtol=0)
        ref.assert_cache(buf, row)


def test_bottleneck_slots_are_fed_per_call(gqa_model, native, native_slots):
    """A Houlsby-mixed GELU slot fed through extra_feed equals DecoderPart's slot; the defaults equal the slot-free
    graph; and the fed adapter changes the logits (so the comparison could fail)."""
    L, kv, hd, H = _geometry(gqa_model)
    g = torch.Generator().manual_seed(3)
    feed = _bottleneck_feed(gqa_model, 6, 3, mix=(0.0, 1.0, 3.0), act=2)
    ref = TorchRows(gqa_model, tuple(torch.from_numpy(v) for v in feed.values()))
    buf = SharedKvBuffer(native_slots, L, kv, hd, rows=2, capacity=16)
    plain = SharedKvBuffer(native[0], L, kv, hd, rows=2, capacity=16)
    empty = SharedKvBuffer(native_slots, L, kv, hd, rows=2, capacity=16)
    for row, n in enumerate((5, 3)):
        x = _embeds(g, 1, n, H)
        got = buf.prefill(row, x, np.arange(n)[None], feed)
        np.testing.assert_allclose(got, ref.run(row, x, np.arange(n)[None]), atol=TOL, rtol=0)
        base = plain.prefill(row, x, np.arange(n)[None], {})
        np.testing.assert_allclose(empty.prefill(row, x, np.arange(n)[None], {}), base, atol=TOL, rtol=0)
        assert np.abs(got - base).max() > 1e-2
    x, positions = _embeds(g, 2, 1, H), buf.lengths[:, None].copy()
    logits = buf.step(x, positions, feed)
    for row in range(2):
        np.testing.assert_allclose(logits[row], ref.run(row, x[row : row + 1], positions[row : row + 1])[0],
                                   atol=TOL, rtol=0)
        ref.assert_cache(buf, row)


def test_export_check_passes_and_names_a_broken_output(gqa_model, native, tmp_path):
    import onnx
    from onnx import numpy_helper

    _, path = native
    module = DecoderPart(gqa_model)
    check = ort_native.check_native_decoder(module, path, TOL)
    assert check["form"] == "ort-native" and check["outputs_checked"] == 1 + 2 * module.num_layers
    assert check["max_rel_error"] < TOL
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name == "language_model.layers.1.self_attn.k_proj.weight":  # present.1.key is the first to differ
            w = numpy_helper.to_array(init).copy()
            w[:, 3] += 0.5
            init.CopyFrom(numpy_helper.from_array(w, init.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken), save_as_external_data=True, location="broken.onnx.data")
    with pytest.raises(ParityError, match=r"part 'decoder' \(ort-native form\) output '(logits|present\.1\.key)'"):
        ort_native.check_native_decoder(module, broken, TOL)


def _both(gqa_model, geometry, lora=None, bottleneck=None):
    """A feed for native_adapters: the given LoRA and bottleneck feeds, the empty one (N = 1) for a kind not given."""
    L, _, _, H = _geometry(gqa_model)
    return {**(bottleneck or slots.empty_feed("decoder", L, H)), **(lora or _lora_feed(geometry, 0, 0))}


def test_lora_slots_are_fed_per_call(gqa_model, lora_geometry, native, native_adapters):
    """LoRA on q, k, v, o, gate, up, down and lm_head (DoRA scales on v_proj and lm_head), fed through the shared KV
    buffer, equals DecoderPart's LoRA slots; the inputs follow the portable graph's order; the defaults (nothing
    fed) are the slot-free graph; and the fed LoRA changes the logits (so the comparison could fail)."""
    import onnx

    L, kv, hd, H = _geometry(gqa_model)
    session, path = native_adapters
    graph = onnx.load(str(path), load_external_data=False).graph
    assert [i.name for i in graph.input] == decoder_io_names(L, True, lora_geometry)[0]
    feed = _both(gqa_model, lora_geometry, lora=_lora_feed(lora_geometry, 8, 7))
    ref = TorchRows(gqa_model, tuple(torch.from_numpy(v) for v in feed.values()), lora=lora_geometry, bottleneck=True)
    buf = SharedKvBuffer(session, L, kv, hd, rows=2, capacity=16)
    plain = SharedKvBuffer(native[0], L, kv, hd, rows=2, capacity=16)
    empty = SharedKvBuffer(session, L, kv, hd, rows=2, capacity=16)
    g = torch.Generator().manual_seed(6)
    for row, n in enumerate((5, 3)):
        x = _embeds(g, 1, n, H)
        got = buf.prefill(row, x, np.arange(n)[None], feed)
        np.testing.assert_allclose(got, ref.run(row, x, np.arange(n)[None]), atol=TOL, rtol=0)
        base = plain.prefill(row, x, np.arange(n)[None], {})
        np.testing.assert_allclose(empty.prefill(row, x, np.arange(n)[None], {}), base, atol=TOL, rtol=0)
        assert np.abs(got - base).max() > 1e-2
    for _ in range(2):
        x, positions = _embeds(g, 2, 1, H), buf.lengths[:, None].copy()
        logits = buf.step(x, positions, feed)
        for row in range(2):
            np.testing.assert_allclose(logits[row], ref.run(row, x[row : row + 1], positions[row : row + 1])[0],
                                       atol=TOL, rtol=0)
    for row in range(2):
        ref.assert_cache(buf, row)


def test_export_check_covers_slots_and_names_a_swapped_lora_layer(gqa_model, lora_geometry, native_adapters,
                                                                  tmp_path):
    """check_native_decoder with bottleneck and LoRA slots (empty, one adapter for the batch, one per row) passes;
    layers 0 and 1 of down_proj's b swapped in the graph make it fail, naming the part and the adapters fed."""
    import onnx

    _, path = native_adapters
    module = DecoderPart(gqa_model, slots=True, lora=lora_geometry)
    check = ort_native.check_native_decoder(module, path, TOL, True, lora=lora_geometry)
    assert check["cases"] == 6 and check["max_rel_error"] < TOL
    cases = ort_native.check_cases(module.num_layers, gqa_model.config.text_config.hidden_size, True, lora_geometry)
    rows = {c["adapters"]["decoder_lora.lm_head.a"].shape[1] for c in cases}
    assert rows == {1, 3} and {c["adapters"]["decoder_adapter.mix"].shape[2] for c in cases} == {1, 3}
    assert {c["adapters"]["decoder_lora.lm_head.a"].shape[3] for c in cases} >= {0, 4, 8}
    model = onnx.load(str(path))
    squeeze = {n.name: n for n in model.graph.node if n.name.startswith("decoder_lora.layers.mlp.down_proj.b/Squeeze")}
    first, second = (squeeze[f"decoder_lora.layers.mlp.down_proj.b/Squeeze_{i}"] for i in (0, 1))
    first.input[0], second.input[0] = second.input[0], first.input[0]
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken), save_as_external_data=True, location="broken.onnx.data")
    with pytest.raises(ParityError, match=r"part 'decoder' \(ort-native form\) output '.*' differs .*LoRA ranks"):
        ort_native.check_native_decoder(module, broken, TOL, True, lora=lora_geometry)
    with pytest.raises(ValueError, match="LoRA groups"):
        ort_native.check_native_decoder(DecoderPart(gqa_model, slots=True), path, TOL, True, lora=lora_geometry)


def _run(session, case, adapters, L, kv, hd, H, seed):
    """One ORT run of a check case with the given adapter feed: {output name: array}."""
    _, feed = ort_native.case_inputs(case, L, kv, hd, H, seed)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {**feed, **adapters})))


def test_fed_lora_equals_its_weights_merged(gqa_model, lora_geometry, native_adapters, tmp_path):
    """Not DecoderPart's slot code: one LoRA fed for the whole batch (N = 1, DoRA scales included) gives what the
    slot-free native graph gives on a copy of the model with W <- scale * (W + (a b)^T) merged in torch."""
    import copy

    L, kv, hd, H = _geometry(gqa_model)
    session, _ = native_adapters
    lora = _lora_feed(lora_geometry, 8, 11)
    merged = copy.deepcopy(gqa_model)
    layers = merged.model.language_model.layers
    with torch.no_grad():
        for group, g in lora_geometry.items():
            for i in range(g["layers"]):
                linear = merged.lm_head if group == "lm_head" else layers[i].get_submodule(group[len("layers.") :])
                a, b = (torch.from_numpy(lora[f"decoder_lora.{group}.{f}"][i, 0]) for f in ("a", "b"))
                linear.weight += (a @ b).T
                if g["scale"]:
                    linear.weight *= torch.from_numpy(lora[f"decoder_lora.{group}.scale"][i, 0])[:, None]
    path = ort_native.write_native_decoder(merged, tmp_path / "merged.onnx")
    want_session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    cases = ort_native.check_cases(L, H, False)
    for k in (0, 2, 4, 5):  # prefill, prefix (PEFT positions), 3-row decode of different lengths, 2-row prompt
        got = _run(session, cases[k], _both(gqa_model, lora_geometry, lora=lora), L, kv, hd, H, k)
        want = _run(want_session, cases[k], {}, L, kv, hd, H, k)
        base = _run(session, cases[k], _both(gqa_model, lora_geometry), L, kv, hd, H, k)
        for name, w in want.items():
            np.testing.assert_allclose(got[name], w, atol=TOL * max(1.0, np.abs(w).max()), rtol=0, err_msg=name)
        assert np.abs(got["logits"] - base["logits"]).max() > 1e-2


@pytest.mark.parametrize("kind", ["lora", "bottleneck", "both"])
def test_mixed_batch_rows_equal_each_row_alone(gqa_model, lora_geometry, native_adapters, kind):
    """Not DecoderPart's slot code: a decode batch whose rows each feed their own adapter (N = B; widths and ranks
    zero-padded, one row with none) gives every row what it gets alone with its adapter (N = 1), logits and cache;
    and a 2-row prompt likewise."""
    L, kv, hd, H = _geometry(gqa_model)
    session, _ = native_adapters
    lora_rows = [_lora_feed(lora_geometry, r, 20 + i) for i, r in enumerate((8, 0, 3))]
    bottleneck_rows = [_bottleneck_feed(gqa_model, 4, 30, (1.0, 1.0, 2.0), 1), _bottleneck_feed(gqa_model, 0, 31),
                       _bottleneck_feed(gqa_model, 6, 32, (0.0, 1.0, 3.0), 2)]
    prefix = {"lora": "decoder_lora.", "bottleneck": "decoder_adapter.", "both": "decoder_"}[kind]

    def row_feed(r):
        """Row r's own adapters (N = 1); the kind not under test is the one empty feed."""
        return _both(gqa_model, lora_geometry, lora=lora_rows[r] if kind != "bottleneck" else None,
                     bottleneck=bottleneck_rows[r] if kind != "lora" else None)

    def mixed(rows):
        """The rows' adapters of the kind under test stacked (N = len(rows)); the other kind's empty feed (N = 1)."""
        feeds = [row_feed(r) for r in rows]
        return {**feeds[0], **_stack_rows([{k: v for k, v in f.items() if k.startswith(prefix)} for f in feeds])}

    g = torch.Generator().manual_seed(8)
    batch = SharedKvBuffer(session, L, kv, hd, rows=3, capacity=16)
    alone = [SharedKvBuffer(session, L, kv, hd, rows=1, capacity=16) for _ in range(3)]
    base = SharedKvBuffer(session, L, kv, hd, rows=1, capacity=16)
    feeds = [row_feed(r) for r in range(3)]
    for row, n in enumerate((6, 2, 4)):
        x = _embeds(g, 1, n, H)
        batch.prefill(row, x, np.arange(n)[None], feeds[row])
        alone[row].prefill(0, x, np.arange(n)[None], feeds[row])
        if row == 0:
            base.prefill(0, x, np.arange(n)[None], _both(gqa_model, lora_geometry))
    feed = mixed(range(3))
    assert {v.shape[1 if "_lora." in k else 2] for k, v in feed.items() if k.startswith(prefix)} == {3}
    for _ in range(3):
        x, positions = _embeds(g, 3, 1, H), batch.lengths[:, None].copy()
        logits = batch.step(x, positions, feed)
        for row in range(3):
            want = alone[row].step(x[row : row + 1], positions[row : row + 1], feeds[row])
            np.testing.assert_allclose(logits[row], want[0], atol=TOL, rtol=0, err_msg=f"row {row}")
        plain = base.step(x[:1], positions[:1], _both(gqa_model, lora_geometry))
        assert np.abs(logits[0] - plain[0]).max() > 1e-2  # row 0's adapter is live
    for row in range(3):
        for name, want in alone[row].row_cache(0).items():
            np.testing.assert_allclose(batch.row_cache(row)[name], want, atol=TOL, rtol=0, err_msg=name)
    # A 2-row prompt (GroupQueryAttention's several new tokens for batch > 1 start from an empty cache).
    case = ort_native.check_cases(L, H, False)[5]
    _, plain_feed = ort_native.case_inputs(case, L, kv, hd, H, seed=9)
    names = [o.name for o in session.get_outputs()]
    together = session.run(names, {**plain_feed, **mixed(range(2))})
    for row in range(2):
        one = {k: v[row : row + 1] for k, v in plain_feed.items()}
        for name, want, got in zip(names, session.run(names, {**one, **feeds[row]}), together):
            np.testing.assert_allclose(got[row : row + 1], want, atol=TOL, rtol=0, err_msg=f"row {row} {name}")


def test_precision_lowering_keeps_lora_products_float(gqa_model, lora_geometry, native_adapters, tmp_path):
    """precision/ sees only the base products on a graph with LoRA slots: weight_matmuls finds one per torch Linear
    (none of the LoRA products, whose B is a fed input), and after dynamic INT8 and INT4 (MatMulNBits) lowering the
    LoRA products are still float MatMuls that a fed adapter moves the logits through (QLoRA); FP16 runs it too."""
    import onnx

    from vlexport.precision.fp16 import to_fp16
    from vlexport.precision.int4 import Int4Options, quantize_int4
    from vlexport.precision.int8 import quantize, weight_matmuls

    L, kv, hd, H = _geometry(gqa_model)
    session, path = native_adapters
    graph = onnx.load(str(path), load_external_data=False).graph
    products = weight_matmuls(onnx.load(str(path), load_external_data=False))
    lora_nodes = {n.name for n in graph.node if n.op_type == "MatMul" and "/lora_" in n.name}
    assert len(products) == 7 * L + 1 and not {p.node for p in products} & lora_nodes
    assert len(lora_nodes) == 2 * (7 * L + 1)
    assert "language_model.layers.1.self_attn.v_proj" in {p.module for p in products}
    lowered = {"int8": tmp_path / "int8.onnx", "int4": tmp_path / "int4.onnx", "fp16": tmp_path / "fp16.onnx"}
    quantize(path, lowered["int8"], "dynamic", [p.node for p in products])
    quantize_int4(path, lowered["int4"], "matmulnbits", Int4Options(), [p.node for p in products], [], 32)
    to_fp16(path, lowered["fp16"])
    case = ort_native.check_cases(L, H, False)[0]
    lora, empty = (_both(gqa_model, lora_geometry, lora=_lora_feed(lora_geometry, r, 12)) for r in (8, 0))
    want = _run(session, case, lora, L, kv, hd, H, 0)["logits"]
    want_delta = want - _run(session, case, empty, L, kv, hd, H, 0)["logits"]
    for name, file in lowered.items():
        ops = {n.name: n.op_type for n in onnx.load(str(file), load_external_data=False).graph.node}
        matmuls = {n for n, op in ops.items() if op == "MatMul"}
        base = {n for n in matmuls if n.endswith("/MatMul")}  # the products' names (the bottleneck's are unnamed)
        assert lora_nodes <= matmuls and len(base) == (len(products) if name == "fp16" else 0), name
        low = ort.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        got = _run(low, case, lora, L, kv, hd, H, 0)["logits"]
        delta = got - _run(low, case, empty, L, kv, hd, H, 0)["logits"]
        cosine = float((delta * want_delta).sum() / np.linalg.norm(delta) / np.linalg.norm(want_delta))
        assert cosine > 0.9, name


@pytest.mark.slow  # about a minute; every cpu build in the default suite goes through the native form
def test_cpu_build_ships_the_native_decoder_and_records_each_form(tiny_base, tmp_path):
    """A bank with a task of its own merged LoRA (--lora-mode merged; swappable LoRA is one base graph with LoRA
    slots, test_lora_slots.py): the base decoder and the task's decoder are both ORT-native (and checked against
    torch at build time), the other parts portable; the task's decoder holds its merged weights."""
    import onnx
    from onnx import numpy_helper

    from vlexport.build import build
    from vlexport.fixture import make_lora

    lora = make_lora(tiny_base, tmp_path / "lora", seed=21)
    out = tmp_path / "bundle"
    m = build(tiny_base, [f"t={lora}"], out, target="cpu", verify=False, lora_mode="merged")
    assert {name: p["form"] for name, p in m["parts"].items()} == {"vision": "portable", "embed": "portable",
                                                                  "decoder": "ort-native"}
    check = m["parts"]["decoder"]["export_check"]
    assert check["form"] == "ort-native" and check["max_rel_error"] < TOL and "portable" in check
    assert m["tasks"]["t"]["forms"] == {"decoder": "ort-native"}
    weights = []
    for rel in (m["parts"]["decoder"]["file"], m["tasks"]["t"]["parts"]["decoder"]):
        graph = onnx.load(str(out / rel)).graph
        assert "GroupQueryAttention" in {n.op_type for n in graph.node}
        weights.append(next(numpy_helper.to_array(i) for i in graph.initializer
                            if i.name == "language_model.layers.0.self_attn.q_proj.weight"))
    assert np.abs(weights[0] - weights[1]).max() > 1e-3  # the task's LoRA is in its own decoder only


def test_precision_lowering_keeps_products_per_module_and_the_shared_buffer(gqa_model, native, tmp_path):
    """precision/ on the native graph: one product per torch Linear under its module name; dynamic INT8 and FP16 run
    through SharedKvBuffer; FP16 leaves present.* as GroupQueryAttention's own outputs (no fp16 round trip, no copy)."""
    import onnx

    from vlexport.precision.fp16 import to_fp16
    from vlexport.precision.int8 import quantize, weight_matmuls

    session, path = native
    L, kv, hd, H = _geometry(gqa_model)
    products = weight_matmuls(onnx.load(str(path), load_external_data=False))
    assert len(products) == 7 * L + 1 and "language_model.layers.1.mlp.down_proj" in {p.module for p in products}
    lowered = {"int8": tmp_path / "int8.onnx", "fp16": tmp_path / "fp16.onnx"}
    quantize(path, lowered["int8"], "dynamic", [p.node for p in products])
    to_fp16(path, lowered["fp16"])
    graph = onnx.load(str(lowered["fp16"]), load_external_data=False).graph
    producer = {out: n.op_type for n in graph.node for out in n.output}
    assert all(producer[o.name] == "GroupQueryAttention" for o in graph.output if o.name.startswith("present."))
    g = torch.Generator().manual_seed(4)
    x, x1 = _embeds(g, 1, 6, H), _embeds(g, 1, 1, H)
    want = SharedKvBuffer(session, L, kv, hd, rows=1, capacity=8)
    want.prefill(0, x, np.arange(6)[None], {})
    want = want.step(x1, np.array([[6]]), {})
    for name, file in lowered.items():
        buf = SharedKvBuffer(ort.InferenceSession(str(file), providers=["CPUExecutionProvider"]), L, kv, hd, 1, 8)
        buf.prefill(0, x, np.arange(6)[None], {})
        got = buf.step(x1, np.array([[6]]), {})
        cosine = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
        assert cosine > 0.99 and buf.lengths.tolist() == [7], name

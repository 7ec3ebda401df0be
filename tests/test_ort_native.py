"""The ORT-native decoder form (export/ort_native.py) and its shared KV buffer (backends/ort_kv.py).

The reference is the torch DecoderPart on the same merged weights (the module the portable graph is exported from),
run with an explicit cache: every logit and every cached key/value is compared, through prefill and decode steps,
with rows of different lengths, prefix packs in both position conventions, and bottleneck slots."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from vlexport.backends.ort_kv import SharedKvBuffer  # noqa: E402
from vlexport.errors import ParityError, VlexportError  # noqa: E402
from vlexport.export import ort_native  # noqa: E402
from vlexport.export.onnx import add_slot_defaults  # noqa: E402
from vlexport.export.parts import DecoderPart  # noqa: E402
from vlexport.slots import input_names  # noqa: E402

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
    add_slot_defaults(path, "decoder", L, H)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


class TorchRows:
    """The reference: DecoderPart per row with its own growing cache (no padding anywhere)."""

    def __init__(self, model, slot=()):
        self.part = DecoderPart(model, slots=bool(slot))
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
    slot = ort_native._slot_tensors(L, H, 6, (0.0, 1.0, 3.0), 2, g)
    feed = {name: t.numpy() for name, t in zip(input_names("decoder"), slot)}
    ref = TorchRows(gqa_model, slot)
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


@pytest.mark.slow  # about a minute; every cpu build in the default suite goes through the native form
def test_cpu_build_ships_the_native_decoder_and_records_each_form(tiny_base, tmp_path):
    """A bank with a task of its own merged LoRA: the base decoder and the task's decoder are both ORT-native (and
    checked against torch at build time), the other parts portable; the task's decoder holds its merged weights."""
    import onnx
    from onnx import numpy_helper

    from vlexport.build import build
    from vlexport.fixture import make_lora

    lora = make_lora(tiny_base, tmp_path / "lora", seed=21)
    out = tmp_path / "bundle"
    m = build(tiny_base, [f"t={lora}"], out, target="cpu", verify=False)
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

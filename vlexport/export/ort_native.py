"""The decoder in ONNX Runtime's native form, built directly from the (merged) torch model's weights with onnx-ir.

The portable opset-18 graph (export/onnx.py) serves TensorRT. ONNX Runtime on CPU runs much faster on its contrib
ops (../shared/notes/onnxruntime-cpu.md), which TensorRT cannot import, so ONNX Runtime targets get this form:
  SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization (RMSNorm and the residual add in one op),
  one plain MatMul per torch Linear, named after it (precision/ lowers and keeps them per module, as today),
  com.microsoft RotaryEmbedding fed position_ids (a prefix task's positions are not buffer indices),
  com.microsoft GroupQueryAttention over past/present, which appends in place when both are bound to one buffer.

Same I/O names as the portable graph. Semantics are GroupQueryAttention's: rows are RIGHT-padded, row b holds
len_b = sum(attention_mask[b]) tokens at buffer positions 0..len_b-1, its S new tokens are the last S of them, and
logits are those of each row's last new position. With an ordinary past [B,kv,P,hd] the graph returns present =
past + new, [B,kv,max(P,T),hd]; with past and present bound to one OrtValue (backends/ort_kv.py) nothing is copied.

Adapter slots, in the portable graph's input order after the cache: bottleneck slots (slots.py) at the residual adds,
then LoRA slots (lora_slots.py) on the linears the geometry names, two more MatMuls beside the base product. Each
stacked input is split once per run; its row axis (1, or one adapter per batch row) broadcasts in the products.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import lora_slots, slots as bottleneck
from ..errors import ParityError
from ..slots import ACTIVATIONS, FIELDS
from ..slots import input_names as slot_input_names

FORM = "ort-native"
MS = "com.microsoft"


def unsupported_reason(model, fp16_products: bool = False) -> str | None:
    """Why this model cannot take the native form (then the portable graph ships), or None. fp16_products: the
    decoder's products are quantized to INT4 from the weights alone (build_native_decoder's fp16_products), which
    lets a model loaded in fp16 take the native form."""
    import torch

    cfg = model.config.text_config
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} (the native form builds SiLU MLPs)"
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") == "dynamic":
        return "dynamic RoPE scaling (its frequencies depend on the sequence length)"
    if model.lm_head.weight.dtype not in (torch.float32, *((torch.float16,) if fp16_products else ())):
        return ("the model was exported in fp16 to save memory (the native form is built from fp32 weights, or from "
                "fp16 weights for a decoder quantized to INT4 without calibration)")
    return None


class _Builder:
    """A thin layer over onnx_ir.tape.Tape: named weights, and the few fused ops used here."""

    def __init__(self):
        import onnx_ir as ir
        from onnx_ir import tape

        self.ir, self.tape = ir, tape.Tape()

    def weight(self, name: str, array: np.ndarray):
        return self.tape.initializer(self.ir.tensor(np.ascontiguousarray(array), name=name), name=name)

    def product_weight(self, name: str, weight, dtype: str):
        """A torch Linear weight [out, in] as the MatMul's B [in, out] in `dtype`, transposed only when it is written
        (ir.save streams one tensor at a time), so the graph never holds a second copy of the model's weights."""
        import torch

        torch_dtype = {"float32": torch.float32, "float16": torch.float16}[dtype]
        out, inp = weight.shape

        def transposed():
            return self.ir.tensor(weight.detach().to(torch_dtype).T.contiguous().numpy(), name=name)

        lazy = self.ir.LazyTensor(transposed, dtype=self.ir.DataType.from_numpy(np.dtype(dtype)),
                                  shape=self.ir.Shape([inp, out]), name=name)
        return self.tape.initializer(lazy, name=name)

    def const(self, name: str, array):
        return self.weight(name, np.asarray(array))

    # Every value gets its element type: onnx's shape inference cannot see through contrib ops, and the quantizers
    # (onnxruntime.quantization) need the type of each MatMul's output.
    def op(self, op_type, inputs, name=None, domain="", dtype=None, **attrs):
        out = self.tape.op(op_type, inputs, attrs or None, domain=domain, name=name)
        out.type = self.ir.TensorType(dtype or self.ir.DataType.FLOAT)
        return out

    def ops(self, op_type, inputs, n, name=None, domain="", **attrs):
        outs = self.tape.op_multi_out(op_type, inputs, attrs or None, num_outputs=n, domain=domain, name=name)
        for out in outs:
            out.type = self.ir.TensorType(self.ir.DataType.FLOAT)
        return outs


# Model metadata of a native graph whose products hold fp16 weights (fp16_products): precision.int4 quantizes them
# from fp32 (the graph computes in fp32), and the graph does not run before it has.
FP16_PRODUCTS = "vlexport.fp16_products"


def build_native_decoder(model, slots: bool = False, lora: dict | None = None, num_layers: int | None = None,
                         fp16_products: bool = False):
    """The decoder (+ lm_head, last position only) as an onnx_ir Model in the native form. slots: bottleneck slot
    inputs (slots.py); lora: the decoder's LoRA slot geometry (lora_slots.py), whose inputs follow them.
    num_layers: the first N layers only (the export check of a decoder too large to run whole).
    fp16_products: each product's weight is written in fp16, as a 7B loaded in fp16 holds it (an fp32 copy would
    not fit), for precision.int4 to quantize; everything else is fp32, so the quantized graph computes in fp32."""
    import onnx_ir as ir
    import torch

    cfg = model.config.text_config
    lm = model.model.language_model
    L, H = num_layers or cfg.num_hidden_layers, cfg.hidden_size
    n_heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = getattr(cfg, "head_dim", None) or H // n_heads
    eps = float(cfg.rms_norm_eps)
    V = model.lm_head.weight.shape[0]
    b = _Builder()
    f32, i64 = ir.DataType.FLOAT, ir.DataType.INT64

    def value(name, dtype, shape):
        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))

    embeds = value("inputs_embeds", f32, ["batch", "sequence", H])
    mask = value("attention_mask", i64, ["batch", "total_sequence"])
    positions = value("position_ids", i64, ["batch", "sequence"])
    past = [value(f"past_key_values.{i}.{k}", f32, ["batch", kv, "past_sequence", hd])
            for i in range(L) for k in ("key", "value")]
    inputs = [embeds, mask, positions, *past]

    # GroupQueryAttention's lengths, once for all layers: seqlens_k = len_b - 1, total_sequence_length = T.
    i32 = ir.DataType.INT32
    lengths = b.op("ReduceSum", [mask, b.const("axis1", np.array([1], np.int64))], dtype=i64, keepdims=0)
    seqlens_k = b.op("Cast", [b.op("Sub", [lengths, b.const("one_i64", np.array(1, np.int64))], dtype=i64)],
                     dtype=i32, to=i32)
    total = b.op("Cast", [b.op("Gather", [b.op("Shape", [mask], dtype=i64), b.const("index1", np.array(1, np.int64))],
                               dtype=i64)], dtype=i32, to=i32)

    # RoPE tables from the model's own rotary module (any static scaling), the first half as RotaryEmbedding wants.
    with torch.no_grad():
        table_pos = torch.arange(cfg.max_position_embeddings).unsqueeze(0)
        cos, sin = lm.rotary_emb(torch.zeros(1, dtype=torch.float32), position_ids=table_pos)
    cos_cache = b.weight("rotary.cos_cache", cos[0, :, : hd // 2].float().numpy())
    sin_cache = b.weight("rotary.sin_cache", sin[0, :, : hd // 2].float().numpy())

    site = _slot_sites(b, L, H, inputs) if slots else None
    lora_site = _lora_sites(b, model, lora, inputs) if lora else None

    def linear(x, module, name):
        """x @ W (+ bias), one product per torch module: precision/ quantizes and keeps products by module name.
        With a LoRA slot on the module, as parts.LoraSlotLinear: x' = x * in_scale, then
        ((x' @ W + (x' @ a) @ b) * scale + bias) * out_scale (in_scale, scale, out_scale where the group has them)."""
        bias = None if module.bias is None else module.bias.detach().float().numpy()  # BitFit may have given one
        fed = lora_site(name) if lora_site else None
        a_i, b_i, scale_i, in_i, out_i = fed if fed is not None else (None,) * 5
        if in_i is not None:
            x = b.op("Mul", [x, in_i], name=f"{name}/lora_in_scale")
        # The torch exporter's name-scope record, which precision.int8.weight_matmuls reads the module name from.
        scopes = {"pkg.torch.onnx.name_scopes": repr(["", name, "matmul"])}
        w = b.product_weight(f"{name}.weight", module.weight, "float16" if fp16_products else "float32")
        y = b.tape.op("MatMul", [x, w], name=f"{name}/MatMul", metadata_props=scopes)
        y.type = ir.TensorType(f32)
        if fed is not None:
            # Neither product has an initializer as B, so precision/ (int8.weight_matmuls, the MatMulNBits
            # quantizer) sees only the base product: the adapter stays float over a quantized base (QLoRA).
            delta = b.op("MatMul", [b.op("MatMul", [x, a_i], name=f"{name}/lora_a"), b_i], name=f"{name}/lora_b")
            y = b.op("Add", [y, delta], name=f"{name}/lora_add")
            if scale_i is not None:
                y = b.op("Mul", [y, scale_i], name=f"{name}/lora_scale")
        y = b.op("Add", [y, b.weight(f"{name}.bias", bias)], name=f"{name}/Add") if bias is not None else y
        return b.op("Mul", [y, out_i], name=f"{name}/lora_out_scale") if out_i is not None else y

    def norm_weight(module, name):
        return b.weight(name, module.weight.detach().float().numpy())

    def skip_norm(x, residual, weight, name):
        """(RMSNorm(x + residual), x + residual) in one op."""
        out = b.ops("SkipSimplifiedLayerNormalization", [x, residual, weight], 4, name=name, domain=MS, epsilon=eps)
        return out[0], out[3]

    def simple_norm(x, weight, name):
        return b.op("SimplifiedLayerNormalization", [x, weight], name=name, axis=-1, epsilon=eps, stash_type=1)

    layers = lm.layers[:L]
    present = []
    residual = embeds
    normed = simple_norm(embeds, norm_weight(layers[0].input_layernorm, "layers.0.input_layernorm.weight"),
                         "layers.0.input_layernorm")
    for i, layer in enumerate(layers):
        p = f"layers.{i}"
        m = f"language_model.layers.{i}"
        attn = layer.self_attn
        q, k, v = (linear(normed, getattr(attn, n), f"{m}.self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj"))
        q = b.op("RotaryEmbedding", [q, positions, cos_cache, sin_cache], name=f"{p}.q_rotary", domain=MS)
        k = b.op("RotaryEmbedding", [k, positions, cos_cache, sin_cache], name=f"{p}.k_rotary", domain=MS)
        out, pk, pv = b.ops("GroupQueryAttention", [q, k, v, past[2 * i], past[2 * i + 1], seqlens_k, total], 3,
                            name=f"{p}.self_attn.gqa", domain=MS, num_heads=n_heads, kv_num_heads=kv,
                            scale=float(attn.scaling))
        pk.name, pv.name = f"present.{i}.key", f"present.{i}.value"
        pk.shape = pv.shape = ir.Shape(["batch", kv, "present_sequence", hd])
        pk.type = pv.type = ir.TensorType(f32)
        present += [pk, pv]
        h = linear(out, attn.o_proj, f"{m}.self_attn.o_proj")
        post = norm_weight(layer.post_attention_layernorm, f"{p}.post_attention_layernorm.weight")
        if site is None:
            normed, residual = skip_norm(h, residual, post, f"{p}.post_attention_layernorm")
        else:
            residual = site(residual, h, i, 0)
            normed = simple_norm(residual, post, f"{p}.post_attention_layernorm")
        mlp = layer.mlp
        gate, up = linear(normed, mlp.gate_proj, f"{m}.mlp.gate_proj"), linear(normed, mlp.up_proj, f"{m}.mlp.up_proj")
        act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up])
        h = linear(act, mlp.down_proj, f"{m}.mlp.down_proj")
        if i + 1 == L:
            break
        nxt = norm_weight(layers[i + 1].input_layernorm, f"layers.{i + 1}.input_layernorm.weight")
        if site is None:
            normed, residual = skip_norm(h, residual, nxt, f"layers.{i + 1}.input_layernorm")
        else:
            residual = site(residual, h, i, 1)
            normed = simple_norm(residual, nxt, f"layers.{i + 1}.input_layernorm")

    # Only the last position goes through the final norm and lm_head (rows end on their last new token).
    starts, ends = b.const("last.start", np.array([-1], np.int64)), b.const("last.end", np.array([2**62], np.int64))
    axes = b.const("last.axes", np.array([1], np.int64))

    def last(x):
        return b.op("Slice", [x, starts, ends, axes])

    final = norm_weight(lm.norm, "norm.weight")
    if site is None:
        normed, _ = skip_norm(last(h), last(residual), final, "norm")
    else:
        normed = simple_norm(site(last(residual), last(h), L - 1, 1), final, "norm")
    logits = linear(normed, model.lm_head, "lm_head")
    logits.name, logits.shape, logits.type = "logits", ir.Shape(["batch", 1, V]), ir.TensorType(f32)

    graph = ir.Graph(inputs, [logits, *present], nodes=b.tape.nodes, initializers=b.tape.initializers,
                     opset_imports={"": 18, MS: 1}, name="decoder_ort_native")
    meta = {"vlexport.form": FORM, **({FP16_PRODUCTS: "1"} if fp16_products else {})}
    return ir.Model(graph, ir_version=10, producer_name="vlexport", metadata_props=meta)


def _slot_sites(b: _Builder, L: int, H: int, inputs: list):
    """Declare the decoder's bottleneck slot inputs, split them once into per-(layer, site) pieces, and return
    site(x, h, layer, site) = x + h + s * up(act(down(a*x + b*h))), as export/parts.py's bottleneck_slot.

    Each field [L, 2, N, ...] is transposed to [N, ..., L, 2, k] and split on its last axis into the 2L sites'
    pieces [N, m, k], which broadcast against x [B, S, H] (N = 1 or B) with no Squeeze: the weights come out as
    [N, H, r] / [N, r, H] for MatMul, the biases as [N, 1, r] / [N, 1, H], each mix and activation weight [N, 1, 1]."""
    import onnx_ir as ir

    names = dict(zip(FIELDS, slot_input_names("decoder")))
    W, N = "decoder_adapter_width", "decoder_adapter_rows"
    shapes = {"down_weight": [L, 2, N, W, H], "down_bias": [L, 2, N, W], "up_weight": [L, 2, N, H, W],
              "up_bias": [L, 2, N, H], "mix": [L, 2, N, 3], "activation": [L, 2, N, len(ACTIVATIONS)]}
    fed = {}
    for field in FIELDS:
        fed[field] = ir.Value(name=names[field], type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shapes[field]))
        inputs.append(fed[field])
    n = 2 * L

    def pieces(field, perm, shape, count):
        x = b.op("Transpose", [fed[field]], name=f"decoder_adapter.{field}/Transpose", perm=perm)
        # Reshape's 0 keeps N; the width may be 0, which -1 resolves to (the other dimensions are not 0).
        x = b.op("Reshape", [x, b.const(f"decoder_adapter.{field}.shape", np.array(shape, np.int64))])
        return b.ops("Split", [x], count, name=f"decoder_adapter.{field}/Split", axis=2, num_outputs=count)

    down_w = pieces("down_weight", [2, 4, 0, 1, 3], [0, H, -1], n)  # [N, H, r]: z @ down_w
    down_b = pieces("down_bias", [2, 0, 1, 3], [0, 1, -1], n)  # [N, 1, r]
    up_w = pieces("up_weight", [2, 4, 0, 1, 3], [0, -1, n * H], n)  # [N, r, H]
    up_b = pieces("up_bias", [2, 0, 1, 3], [0, 1, -1], n)  # [N, 1, H]
    mix = pieces("mix", [2, 0, 1, 3], [0, 1, -1], 3 * n)  # (a, b, s) of site j at 3j..3j+2, each [N, 1, 1]
    act = pieces("activation", [2, 0, 1, 3], [0, 1, -1], len(ACTIVATIONS) * n)

    def site(x, h, layer, s):
        j = 2 * layer + s
        a_, b_, scale = mix[3 * j : 3 * j + 3]
        z = b.op("Add", [b.op("Mul", [x, a_]), b.op("Mul", [h, b_])])
        u = b.op("Add", [b.op("MatMul", [z, down_w[j]]), down_b[j]])
        relu, silu, gelu, tanh = act[len(ACTIVATIONS) * j : len(ACTIVATIONS) * (j + 1)]
        y = b.op("Add", [b.op("Add", [b.op("Mul", [b.op("Relu", [u]), relu]),
                                      b.op("Mul", [b.op("Mul", [u, b.op("Sigmoid", [u])]), silu])]),
                         b.op("Add", [b.op("Mul", [b.op("Gelu", [u], domain=MS), gelu]),
                                      b.op("Mul", [b.op("Tanh", [u]), tanh])])])
        y = b.op("Add", [b.op("MatMul", [y, up_w[j]]), up_b[j]])
        return b.op("Add", [b.op("Add", [x, h]), b.op("Mul", [y, scale])])

    return site


# The linears the native graph builds, as lora_slots groups (a decoder LoRA slot can sit on any of them).
NATIVE_LORA_GROUPS = (*(f"layers.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
                      *(f"layers.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")), "lm_head")


def _lora_sites(b: _Builder, model, geometry: dict, inputs: list):
    """Declare the decoder's LoRA slot inputs (lora_slots.py) in graph order, split each once into its layers'
    pieces, and return fed(name) = (a [N, in, r], b [N, r, out], scale [N, 1, out], in_scale [N, 1, in],
    out_scale [N, 1, out]) for the linear of that module name (None for a field the group lacks), or None where no
    slot sits on it.

    a, b: Split on axis 0 into the group's L layers, then Squeezed (an alias); the scales are Unsqueezed to
    [L, N, 1, width] first, so that they broadcast over the sequence."""
    import onnx_ir as ir

    lm = model.model.language_model
    unknown = sorted(set(geometry) - set(NATIVE_LORA_GROUPS))
    if unknown:
        raise ValueError(f"LoRA slot group(s) {', '.join(unknown)} are not linears of the native decoder "
                         f"({', '.join(NATIVE_LORA_GROUPS)})")
    R, N = "decoder_lora_rank", "decoder_lora_rows"
    f32 = ir.TensorType(ir.DataType.FLOAT)
    declared = {}
    for name in lora_slots.part_input_names({"decoder": geometry}, "decoder"):
        group, field = name[len("decoder_lora.") :].rsplit(".", 1)
        g = geometry[group]
        module = model.lm_head if group == "lm_head" else lm.layers[0].get_submodule(group[len("layers.") :])
        if (g["in"], g["out"]) != (module.in_features, module.out_features):
            raise ValueError(f"LoRA slot group {group}: geometry says in {g['in']}, out {g['out']} but the "
                             f"model's linear is {module.in_features} -> {module.out_features}")
        shape = {"a": [g["layers"], N, g["in"], R], "b": [g["layers"], N, R, g["out"]],
                 "scale": [g["layers"], N, g["out"]], "in_scale": [g["layers"], N, g["in"]],
                 "out_scale": [g["layers"], N, g["out"]]}[field]
        declared[name] = ir.Value(name=name, type=f32, shape=ir.Shape(shape))
        inputs.append(declared[name])
    axis0 = b.const("decoder_lora.axis0", np.array([0], np.int64))
    axis2 = b.const("decoder_lora.axis2", np.array([2], np.int64))

    def layers_of(name, layers):
        x = declared[name]
        if name.endswith("scale"):  # scale, in_scale, out_scale
            x = b.op("Unsqueeze", [x, axis2], name=f"{name}/Unsqueeze")
        parts = [x] if layers == 1 else b.ops("Split", [x], layers, name=f"{name}/Split", axis=0, num_outputs=layers)
        return [b.op("Squeeze", [piece, axis0], name=f"{name}/Squeeze_{i}") for i, piece in enumerate(parts)]

    split = {}
    for group, g in geometry.items():
        fields = [layers_of(f"decoder_lora.{group}.{f}", g["layers"]) if f not in lora_slots.OPTIONAL or g.get(f)
                  else [None] * g["layers"] for f in lora_slots.FIELDS]
        split[group] = list(zip(*fields))

    def fed(module_name: str):
        where = lora_slots.locate(module_name if module_name == "lm_head" else f"model.{module_name}")
        if where is None or where[1] not in split or where[2] >= len(split[where[1]]):
            return None  # as parts.with_lora_slots: a slot only on layers its group stacks
        return split[where[1]][where[2]]

    return fed


def write_native_decoder(model, path: Path, slots: bool = False, lora: dict | None = None,
                         num_layers: int | None = None, fp16_products: bool = False) -> Path:
    """Write the native decoder to path (+ path.data), replacing what is there (the portable graph). slots, lora,
    num_layers, fp16_products as build_native_decoder; the slot inputs get no defaults here
    (export/onnx.add_slot_defaults gives them)."""
    import onnx_ir as ir

    from ..files import remove_part

    built = build_native_decoder(model, slots, lora, num_layers=num_layers, fp16_products=fp16_products)
    remove_part(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A 7B's products are transposed as they are written: keep few of them in flight at once.
    ir.save(built, str(path), external_data=path.name + ".data", max_in_flight_bytes=256 << 20)
    return path


# Per check case (in check_cases' order): the bottleneck rows (width, mix, activation), one entry = one row shared
# by the batch (N = 1), several = one per row (N = B, widths zero-padded to the largest), and the LoRA ranks alike.
_BOTTLENECK_ROWS = ([(3, (0.0, 1.0, 2.0), 1)], [(0, None, None)], [(5, (1.0, 0.0, 4.0), 2)], [(4, (1.0, 1.0, 1.0), 3)],
                    [(3, (1.0, 1.0, 1.0), 0), (0, None, None), (5, (0.0, 1.0, 3.0), 2)], [(4, (1.0, 1.0, 2.0), 1)])
_LORA_ROWS = ([8], [0], [4], [8], [8, 0, 3], [8])


def check_cases(num_layers: int, hidden: int, slots: bool, lora: dict | None = None, seed: int = 0) -> list[dict]:
    """Inputs for the export check, in the native convention. Each case: batch, new tokens S, past length P (the
    past array's width), each row's valid past length, the first new position of each row, and `adapters`: the slot
    feed (bottleneck inputs, then the LoRA inputs of geometry `lora`), in graph input order.

    Prefill of one row (with and without a prefix, both position conventions), batch-1 decode, a multi-row decode
    whose rows hold different lengths (right-padded past), and a 2-row prompt; GroupQueryAttention takes S > 1 with a
    past for batch 1 only, which is how backends/ort_kv.py prefills. The slots run empty (width/rank 0), one adapter
    for the batch (N = 1, also over 2 rows), and on the 3-row decode one per row, of different widths and ranks
    (one row with none), with DoRA scales wherever the geometry has them."""
    rng = np.random.default_rng(seed)
    cases = [dict(batch=1, new=9, past=0, past_lens=[0], first=[0]),
             dict(batch=1, new=5, past=4, past_lens=[4], first=[0]),  # AdapterHub prefix: real tokens from 0
             dict(batch=1, new=5, past=4, past_lens=[4], first=[4]),  # PEFT prefix: real tokens from P
             dict(batch=1, new=1, past=12, past_lens=[12], first=[12]),
             dict(batch=3, new=1, past=7, past_lens=[7, 5, 3], first=[7, 5, 3]),
             dict(batch=2, new=6, past=0, past_lens=[0, 0], first=[0, 0])]
    geometry = {"decoder": lora} if lora else None
    for case, bottleneck_rows, lora_rows in zip(cases, _BOTTLENECK_ROWS, _LORA_ROWS):
        feed = {}
        if slots:
            rows = [bottleneck.sample_feed("decoder", num_layers, hidden, width, rng, mix=mix or (1.0, 1.0, 1.0),
                                           act=act or 0) for width, mix, act in bottleneck_rows]
            feed.update(_stack(rows, bottleneck.width_axis, bottleneck.ROW_AXIS))
        if geometry:
            rows = [lora_slots.sample_feed(geometry, "decoder", rank, rng) if rank else
                    lora_slots.empty_feed(geometry, "decoder") for rank in lora_rows]
            stacked = _stack(rows, lora_slots.rank_axis, 1)
            feed.update({name: stacked[name] for name in lora_slots.part_input_names(geometry, "decoder")})
        case["adapters"] = feed
        case["note"] = ", ".join(
            ([f"bottleneck widths {[w for w, _, _ in bottleneck_rows]}"] if slots else [])
            + ([f"LoRA ranks {lora_rows}"] if geometry else []))
    return cases


def _stack(rows: list[dict], width_axis, row_axis: int) -> dict:
    names = list(rows[0])
    return lora_slots.stack_rows(rows, {n: width_axis(n) for n in names}, {n: row_axis for n in names})


def case_inputs(case: dict, num_layers: int, kv: int, head_dim: int, hidden: int, seed: int = 0):
    """(torch DecoderPart args, native ORT feed) for one check case. The portable convention sees each row's
    valid past then its new tokens, with the unused past positions masked out; the native one sees a ones-first
    mask of each row's length. Both get the same adapter tensors."""
    import torch

    g = torch.Generator().manual_seed(seed)
    b, s, p = case["batch"], case["new"], case["past"]
    embeds = torch.randn(b, s, hidden, generator=g)
    past = [torch.randn(b, kv, p, head_dim, generator=g) for _ in range(2 * num_layers)]
    portable_mask = torch.zeros(b, p + s, dtype=torch.long)
    native_mask = torch.zeros(b, p + s, dtype=torch.long)
    positions = torch.zeros(b, s, dtype=torch.long)
    for r, (n, first) in enumerate(zip(case["past_lens"], case["first"])):
        portable_mask[r, :n], portable_mask[r, p:] = 1, 1
        native_mask[r, : n + s] = 1
        positions[r] = first + torch.arange(s)
    adapters = case.get("adapters", {})
    args = (embeds, portable_mask, positions, *past, *(torch.from_numpy(v) for v in adapters.values()))
    feed = {"inputs_embeds": embeds.numpy(), "attention_mask": native_mask.numpy(), "position_ids": positions.numpy()}
    for i in range(num_layers):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = past[2 * i].numpy(), past[2 * i + 1].numpy()
    feed.update(adapters)
    return args, feed


def portable_present_rows(present: np.ndarray, case: dict) -> list[np.ndarray]:
    """Each row's valid keys/values [kv, len, hd] from a portable present (past positions, then the new ones)."""
    p = case["past"]
    return [np.concatenate([present[r, :, :n], present[r, :, p:]], axis=1) for r, n in enumerate(case["past_lens"])]


def check_native_decoder(module, onnx_path: Path, rel_tol: float, slots: bool = False, label: str = "decoder",
                         lora: dict | None = None) -> dict:
    """ONNX Runtime on the native graph against the torch DecoderPart on check_cases(); raise ParityError naming the
    part, its form and the output when they differ by more than rel_tol (relative to max(1, max|torch|)).
    slots/lora: the graph's slot inputs, which `module` must take too (DecoderPart(model, slots, lora))."""
    import onnxruntime as ort
    import torch

    if (bool(getattr(module, "slots", False)), getattr(module, "lora", None) or {}) != (slots, lora or {}):
        raise ValueError(f"check_native_decoder: the torch module takes slots={getattr(module, 'slots', False)}, "
                         f"LoRA groups {sorted(getattr(module, 'lora', None) or {})}; the graph was asked with "
                         f"slots={slots}, LoRA groups {sorted(lora or {})}")

    cfg = module.text_config
    L, kv, H = module.num_layers, cfg.num_key_value_heads, cfg.hidden_size
    hd = getattr(cfg, "head_dim", None) or H // cfg.num_attention_heads
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    worst: dict[str, float] = {}
    for k, case in enumerate(check_cases(L, H, slots, lora)):
        args, feed = case_inputs(case, L, kv, hd, H, seed=k)
        with torch.no_grad():
            expected = dict(zip(names, (t.numpy() for t in module(*args))))
        got = dict(zip(names, session.run(names, feed)))
        shape = f"batch {case['batch']}, {case['new']} new token(s), past {case['past_lens']}"
        shape += f", {case['note']}" if case["note"] else ""
        for name in names:
            want, have = expected[name], got[name]
            if name.startswith("present."):
                have = [have[r, :, : n + case["new"]] for r, n in enumerate(case["past_lens"])]
                want = portable_present_rows(want, case)
            else:
                want, have = [want], [have]
            for w, h in zip(want, have):
                if w.shape != h.shape:
                    raise ParityError(f"export check failed: part '{label}' ({FORM} form) output '{name}' has shape "
                                      f"{h.shape} in ONNX Runtime but {w.shape} in torch ({shape})")
                err = float(np.abs(w - h).max()) / max(1.0, float(np.abs(w).max())) if w.size else 0.0
                worst[name] = max(worst.get(name, 0.0), err)
                if not err <= rel_tol:
                    raise ParityError(
                        f"export check failed: part '{label}' ({FORM} form) output '{name}' differs from torch by "
                        f"{err:.3g} (relative to its scale; allowed {rel_tol:g}) for {shape}")
    return {"form": FORM, "outputs_checked": len(worst), "cases": k + 1,
            "max_rel_error": max(worst.values()) if worst else 0.0}


CHECK_LAYERS = 2  # check_native_first_layers' default: the second layer's input norm joins the two


def check_native_first_layers(model, module, scratch: Path, rel_tol: float, slots: bool = False,
                              label: str = "decoder", lora: dict | None = None, layers: int = CHECK_LAYERS) -> dict:
    """The export check of a native decoder built with fp16_products, which does not run before its INT4 lowering:
    the same builder writes the first `layers` layers in fp32 (their final norm and lm_head included) to scratch, and
    that graph is checked against the torch module's first layers (DecoderPart.first_layers)."""
    from ..files import remove_part

    path = scratch / "decoder.first_layers.onnx"
    write_native_decoder(model, path, slots, lora, num_layers=layers)
    try:
        check = check_native_decoder(module.first_layers(layers), path, rel_tol, slots, label, lora=lora)
    finally:
        remove_part(path)
    return {**check, "first_layers": layers}


def drop_fp32_output_casts(model) -> int:
    """Rewire graph outputs that onnxruntime's float16 converter (keep_io_types) routes through Casts from an op it
    kept in FP32 (GroupQueryAttention's present, cast to fp16 and back): those Casts round the cache to fp16 and copy
    all of it every step into a second buffer, so past and present would no longer be one buffer. Works on an onnx
    ModelProto in place; returns how many outputs were rewired."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    rewired = 0
    for output in graph.output:
        chain, node = [], producer.get(output.name)
        while node is not None and node.op_type == "Cast":
            chain.append(node)
            node = producer.get(node.input[0])
        if node is None or node.op_type != "GroupQueryAttention" or not chain:
            continue
        if any(consumers.get(c.output[0], 0) > 1 for c in chain[1:]):
            continue  # an intermediate cast feeds something else too
        source = chain[-1].input[0]
        if consumers.get(source, 0) > 1:
            continue
        node.output[list(node.output).index(source)] = output.name
        for cast in chain:
            graph.node.remove(cast)
        for v in [v for v in graph.value_info if v.name in {source, *(c.output[0] for c in chain)}]:
            graph.value_info.remove(v)
        rewired += 1
    return rewired

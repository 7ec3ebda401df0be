"""One explicit nn.Module per exported part. Together they compute what LlavaForConditionalGeneration computes.

The I/O contract (shared by vlexport's runtime, onnxruntime-genai and TensorRT):
  vision:  pixel_values [N,3,S,S] -> image_features [N*T, H]      (feature layer, CLS drop and projector inside)
  embed:   input_ids [B,S], image_features [T,H] -> inputs_embeds  (features written in order at image tokens)
  decoder: inputs_embeds, attention_mask [B,P+S], position_ids [B,S], past_key_values.{i}.key|value [B,kv,P,hd]
           -> logits [B,1,V] (last position only), present.{i}.key|value [B,kv,P+S,hd]
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..slots import input_names as slot_input_names


def bottleneck_slot(x, h, layer: int, site: int, slot):
    """x + h + s * up(act(down(a*x + b*h))): the sub-block's residual add with a bottleneck adapter in it.

    (a, b, s) = slot mix: SeqBn (Pfeiffer) feeds x+h (1, 1, s); Houlsby feeds h (0, 1, s); ParBn feeds the block
    input x (1, 0, s). The activation is a fed one-hot over slots.ACTIVATIONS, so one graph serves every adapter; at
    width 0 the adapter contributes its up bias, which "no adapter" packs set to zero. Each field has a row axis
    (slots.py): 1 row broadcast over the batch, or one per row.
    """
    down_w, down_b, up_w, up_b, mix, act = (t[layer, site] for t in slot)  # [N, ...]

    def per_row(v):  # [N] -> [N, 1, 1], against x [B, S, d]
        return v[:, None, None]

    z = per_row(mix[:, 0]) * x + per_row(mix[:, 1]) * h
    u = torch.matmul(z, down_w.transpose(-1, -2)) + down_b[:, None, :]
    a = (per_row(act[:, 0]) * torch.relu(u) + per_row(act[:, 1]) * nn.functional.silu(u)
         + per_row(act[:, 2]) * nn.functional.gelu(u) + per_row(act[:, 3]) * torch.tanh(u))
    y = torch.matmul(a, up_w.transpose(-1, -2)) + up_b[:, None, :]
    return x + h + per_row(mix[:, 2]) * y


class LoraFeed:
    """The LoRA slot tensors of one forward call, {group: (a, b, scale, in_scale, out_scale)} (None for an optional
    field the group lacks), set by the part's forward and read
    by its LoraSlotLinear modules (so that they stay ordinary modules called by transformers' own layer code)."""

    def __init__(self):
        self.tensors: dict = {}


class LoraSlotLinear(nn.Module):
    """A linear with a LoRA slot: with x' = x * in_scale, y = ((x' W^T + (x' a) b) * scale + bias) * out_scale, from
    its group's fed tensors at this layer (lora_slots.py; IA3's two vectors are in_scale and out_scale). It holds
    the linear's own weight and bias, so parameter and scope names are the linear's: precision/ keeps and quantizes
    products by those names."""

    def __init__(self, linear: nn.Linear, feed: LoraFeed, group: str, layer: int):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.feed, self.group, self.layer = feed, group, layer

    def forward(self, x):
        a, b, scale, in_scale, out_scale = self.feed.tensors[self.group]
        if in_scale is not None:
            x = x * in_scale[self.layer][:, None, :]
        y = nn.functional.linear(x, self.weight) + torch.matmul(torch.matmul(x, a[self.layer]), b[self.layer])
        if scale is not None:
            y = y * scale[self.layer][:, None, :]
        y = y if self.bias is None else y + self.bias
        return y if out_scale is None else y * out_scale[self.layer][:, None, :]


def with_lora_slots(root: nn.Module, prefix: str, geometry: dict, feed: LoraFeed) -> nn.Module:
    """`root` with every linear a LoRA slot group serves replaced by a LoraSlotLinear, as a copy along the changed
    paths only (the weights stay shared; the model the build holds is left as it is). `prefix` is root's module name
    in the LLaVA model ("model.language_model", ...); geometry is lora_slots' {group: spec} of one part."""
    from ..lora_slots import locate

    for name, module in list(root.named_modules()):
        full = f"{prefix}.{name}" if prefix and name else (prefix or name)
        where = locate(full) if isinstance(module, nn.Linear) else None
        if where is None or where[1] not in geometry or where[2] >= geometry[where[1]]["layers"]:
            continue
        slot = LoraSlotLinear(module, feed, where[1], where[2])
        if not name:  # root is itself the linear (lm_head)
            return slot
        root = _replaced(root, name.split("."), slot)
    return root


def _replaced(module: nn.Module, path: list[str], new: nn.Module) -> nn.Module:
    if not path:
        return new
    out = copy.copy(module)
    out._modules = dict(module._modules)
    out._modules[path[0]] = _replaced(module._modules[path[0]], path[1:], new)
    return out


def set_lora_feed(feed: LoraFeed, geometry: dict, part: str, tensors: tuple) -> None:
    """Bind the part's LoRA inputs (in lora_slots.part_input_names order) to their groups."""
    from ..lora_slots import FIELDS, part_input_names

    named = dict(zip(part_input_names({part: geometry}, part), tensors))
    feed.tensors = {g: tuple(named.get(f"{part}_lora.{g}.{f}") for f in FIELDS) for g in geometry}


def feature_indices(feature_layer, num_layers: int) -> list[int]:
    """hidden_states indices (0 = embeddings output) for LLaVA's vision_feature_layer."""
    layers = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
    return [k if k >= 0 else num_layers + 1 + k for k in layers]


class VisionPart(nn.Module):
    """CLIP up to the deepest feature layer LLaVA reads (later layers never run), then the projector.

    With slots=True each encoder layer's two residual adds take a bottleneck adapter slot (inputs
    vision_adapter.*); `lora` (lora_slots geometry of this part) gives the linears it names LoRA slots
    (inputs vision_lora.*), after the bottleneck inputs."""

    def __init__(self, model, slots: bool = False, lora: dict | None = None):
        super().__init__()
        self.slots = slots
        self.lora = lora or {}
        self.lora_feed = LoraFeed()
        cfg = model.config
        tower = model.model.vision_tower
        self.embeddings = tower.embeddings
        self.pre_layrnorm = tower.pre_layrnorm
        self.indices = feature_indices(cfg.vision_feature_layer, len(tower.encoder.layers))
        layers = nn.ModuleList(tower.encoder.layers[: max(self.indices)])
        self.layers = with_lora_slots(layers, "model.vision_tower.encoder.layers", self.lora, self.lora_feed)
        self.drop_cls = cfg.vision_feature_select_strategy == "default"
        self.projector = with_lora_slots(model.model.multi_modal_projector, "model.multi_modal_projector", self.lora,
                                         self.lora_feed)

    def forward(self, pixel_values: torch.Tensor, *inputs) -> torch.Tensor:
        dtype = self.embeddings.patch_embedding.weight.dtype
        n_slot = len(slot_input_names("vision")) if self.slots else 0
        slot = tuple(t.to(dtype) for t in inputs[:n_slot])
        set_lora_feed(self.lora_feed, self.lora, "vision", tuple(t.to(dtype) for t in inputs[n_slot:]))
        hidden = self.pre_layrnorm(self.embeddings(pixel_values.to(dtype)))
        states = [hidden]
        for i, layer in enumerate(self.layers):
            # CLIPEncoderLayer's own steps, spelled out so that adapter slots can sit at its residual adds.
            h, _ = layer.self_attn(hidden_states=layer.layer_norm1(hidden), attention_mask=None)
            hidden = bottleneck_slot(hidden, h, i, 0, slot) if self.slots else hidden + h
            h = layer.mlp(layer.layer_norm2(hidden))
            hidden = bottleneck_slot(hidden, h, i, 1, slot) if self.slots else hidden + h
            states.append(hidden)
        features = torch.cat([states[i] for i in self.indices], dim=-1)
        if self.drop_cls:
            features = features[:, 1:]
        projected = self.projector(features)
        return projected.reshape(-1, projected.shape[-1]).float()


class AnyResVisionPart(VisionPart):
    """LLaVA-NeXT's vision part: VisionPart on the tiles [N,3,S,S] (the global view, then the grid; N depends on the
    image), then the packing as a gather: pack_index / pack_weight [T,4] (vlexport.anyres.pack_plan, computed by the
    runtime from the image size alone) pick rows of [tile features; image_newline], so that the unpadding and the
    newline per row need no data-dependent shapes. The tower stays static-shaped per tile (TensorRT: a profile over
    N and T), and image_newline, a trained parameter, stays in the graph with the weights.
    -> image_features [T, H], exactly what LlavaNextModel.pack_image_features gives the language model."""

    def __init__(self, model, slots: bool = False, lora: dict | None = None):
        super().__init__(model, slots, lora)
        self.image_newline = model.model.image_newline

    def forward(self, pixel_values, pack_index, pack_weight, *inputs):
        features = super().forward(pixel_values, *inputs)
        table = torch.cat([features, self.image_newline.float()[None]], dim=0)
        return (table[pack_index] * pack_weight.float()[..., None]).sum(dim=1)


def vision_part(model, slots: bool = False, lora: dict | None = None) -> VisionPart:
    """The vision part for the base's family (LLaVA-1.5, or LLaVA-NeXT with its packing)."""
    if getattr(model.model, "image_newline", None) is not None:
        return AnyResVisionPart(model, slots, lora)
    return VisionPart(model, slots, lora)


class EmbedPart(nn.Module):
    """Token embeddings with image features written, in order, into the image-token positions (HF masked_scatter).

    An empty image_features (T=0, every decode step) is valid: it gathers from one appended zero row that only
    non-image positions ever select.
    """

    def __init__(self, model):
        super().__init__()
        self.embed_tokens = model.model.language_model.embed_tokens
        self.image_token_id = int(model.config.image_token_id)

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        is_image = input_ids == self.image_token_id
        # The image token id may lie outside the text vocabulary in some checkpoints; never look it up.
        # An fp16 table is cast right after the lookup: any fp16 op after it that ONNX Runtime's CPU provider lacks
        # would make it cast the whole table to fp32 at load (2x its bytes resident), and the image features stay
        # fp32 as they come.
        embeds = self.embed_tokens(torch.where(is_image, torch.zeros_like(input_ids), input_ids)).float()
        flat = is_image.reshape(-1)
        n_features = image_features.shape[0]
        order = torch.cumsum(flat.to(torch.int64), dim=0) - 1
        index = torch.where(flat, order, torch.full_like(order, n_features)).clamp(max=n_features)
        padded = torch.cat([image_features.float(), embeds.new_zeros(1, embeds.shape[-1])], dim=0)
        gathered = padded[index].reshape(embeds.shape)
        return torch.where(is_image.unsqueeze(-1), gathered, embeds)


class DecoderPart(nn.Module):
    """The Llama decoder and lm_head on embeddings, with the KV cache as explicit per-layer inputs and outputs.

    Only the last position's logits are computed (so batches are left-padded: every row ends on a real token).
    The additive 4-D mask (causal over past+new positions, and the 2-D padding mask) is built here, so the graph
    needs no cache object and one graph serves prefill (past length 0) and decode. Bottleneck slot inputs
    (slots=True), then LoRA slot inputs (`lora`: lora_slots geometry of this part), follow the cache.
    """

    def __init__(self, model, slots: bool = False, lora: dict | None = None):
        super().__init__()
        self.lora = lora or {}
        self.lora_feed = LoraFeed()
        self.language_model = with_lora_slots(model.model.language_model, "model.language_model", self.lora,
                                              self.lora_feed)
        self.lm_head = with_lora_slots(model.lm_head, "lm_head", self.lora, self.lora_feed)
        self.text_config = model.config.text_config
        self.num_layers = self.text_config.num_hidden_layers
        self.slots = slots

    def first_layers(self, n: int) -> "DecoderPart":
        """The same modules run through their first n layers only (export checks of decoders too large to hold
        twice); its present.{0..n-1} outputs are the full decoder's."""
        part = copy.copy(self)
        part.num_layers = n
        return part

    def forward(self, inputs_embeds, attention_mask, position_ids, *inputs):
        from transformers import DynamicCache

        # A model loaded in fp16 (a 7B on a small machine) computes in fp16 behind the same fp32 I/O contract.
        dtype = self.lm_head.weight.dtype
        inputs_embeds = inputs_embeds.to(dtype)
        past_key_values = [t.to(dtype) for t in inputs[: 2 * self.num_layers]]
        n_slot = len(slot_input_names("decoder")) if self.slots else 0
        slot = tuple(t.to(dtype) for t in inputs[2 * self.num_layers : 2 * self.num_layers + n_slot])
        set_lora_feed(self.lora_feed, self.lora, "decoder",
                      tuple(t.to(dtype) for t in inputs[2 * self.num_layers + n_slot :]))
        cache = DynamicCache(config=self.text_config)
        for i in range(self.num_layers):
            cache.update(past_key_values[2 * i], past_key_values[2 * i + 1], i)
        new, total = inputs_embeds.shape[1], attention_mask.shape[1]
        query_pos = torch.arange(new, device=inputs_embeds.device).unsqueeze(1) + (total - new)
        key_pos = torch.arange(total, device=inputs_embeds.device).unsqueeze(0)
        allowed = (key_pos <= query_pos).unsqueeze(0).unsqueeze(0) & attention_mask.bool()[:, None, None, :]
        mask = torch.where(allowed, 0.0, torch.finfo(inputs_embeds.dtype).min).to(inputs_embeds.dtype)
        lm = self.language_model
        hidden = inputs_embeds
        rope = lm.rotary_emb(hidden, position_ids=position_ids)
        for i, layer in enumerate(lm.layers[: self.num_layers]):
            # LlamaDecoderLayer's own steps, spelled out so that adapter slots can sit at its residual adds.
            h, _ = layer.self_attn(hidden_states=layer.input_layernorm(hidden), attention_mask=mask,
                                   position_ids=position_ids, cache=cache, use_cache=True, position_embeddings=rope)
            hidden = bottleneck_slot(hidden, h, i, 0, slot) if self.slots else hidden + h
            h = layer.mlp(layer.post_attention_layernorm(hidden))
            hidden = bottleneck_slot(hidden, h, i, 1, slot) if self.slots else hidden + h
        # Generation needs only the last position's logits. Projecting every prompt position onto the vocabulary
        # would cost a prefill of 768 tokens with a 32k vocabulary about 38 GFLOP for nothing.
        logits = self.lm_head(lm.norm(hidden[:, -1:])).float()
        present = []
        for layer in cache.layers[: self.num_layers]:
            present += [layer.keys.float(), layer.values.float()]
        return (logits, *present)


def decoder_io_names(num_layers: int, slots: bool = False, lora: dict | None = None) -> tuple[list[str], list[str]]:
    from ..lora_slots import part_input_names

    inputs = ["inputs_embeds", "attention_mask", "position_ids"]
    outputs = ["logits"]
    for i in range(num_layers):
        inputs += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
        outputs += [f"present.{i}.key", f"present.{i}.value"]
    inputs += slot_input_names("decoder") if slots else []
    return inputs + part_input_names({"decoder": lora or {}}, "decoder"), outputs

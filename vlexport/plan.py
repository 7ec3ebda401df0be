"""Memory planner: will this model fit the target? Works from config.json alone (no weights needed).

Counts, per part and precision: weights (exactly, from the architecture; INT4 with its block scales and zero points,
lm_head at its own precision), times what the backend holds per weight byte (the target's measured [memory]
factors: ONNX Runtime CPU holds FP16 weights about 2.5 times), the KV cache at the target's max context and batch,
peak activations (the last position's logits, attention scores and MLP intermediates, or the vision tower, whichever
is larger), adapter packs, and the runtime's fixed overhead; compares the total with the target's usable memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import VlexportError
from .model import facts_from_config
from .target import Target

BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
GIB = 1024**3


def parameter_counts(config: dict) -> dict[str, int]:
    """Parameters of each exported part (vision counts only the CLIP layers LLaVA reads)."""
    from .export.parts import feature_indices

    facts = facts_from_config(config)
    v = config["vision_config"]
    hv, iv, nv = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    patch, size = v.get("patch_size", 14), v.get("image_size", 224)
    n_pos = (size // patch) ** 2 + 1
    layers_run = max(feature_indices(facts.vision_feature_layer, nv))
    n_feature_layers = len(facts.vision_feature_layer) if isinstance(facts.vision_feature_layer, list) else 1
    per_vision_layer = 4 * (hv * hv + hv) + 4 * hv + (hv * iv + iv) + (iv * hv + hv)
    vision = 3 * patch * patch * hv + hv + n_pos * hv + 2 * hv + layers_run * per_vision_layer
    ht = facts.hidden_size
    t = config["text_config"]
    it = t["intermediate_size"]
    projector = (hv * n_feature_layers * ht + ht) + (ht * ht + ht)
    kv_dim = facts.num_kv_heads * facts.head_dim
    q_dim = facts.num_heads * facts.head_dim
    bias = 1 if t.get("attention_bias") else 0
    per_layer = (ht * q_dim + q_dim * bias) + 2 * (ht * kv_dim + kv_dim * bias) + (q_dim * ht) + 3 * ht * it + 2 * ht
    decoder = facts.num_layers * per_layer + ht + facts.vocab_size * ht  # + final norm + lm_head
    embed = facts.vocab_size * ht
    newline = ht if facts.anyres is not None else 0  # LLaVA-NeXT's image_newline, in the vision part's graph
    return {"vision": vision + projector + newline, "embed": embed, "decoder": decoder}


@dataclass
class MemoryPlan:
    target: str
    precision: dict
    weights_gib: dict
    kv_cache_gib: float
    activations_gib: float
    adapters_gib: float
    overhead_gib: float
    usable_gib: float | None
    context: int
    batch: int
    notes: list = field(default_factory=list)

    @property
    def total_gib(self) -> float:
        return sum(self.weights_gib.values()) + self.kv_cache_gib + self.activations_gib + self.adapters_gib + self.overhead_gib

    @property
    def fits(self) -> bool:
        return self.usable_gib is None or self.total_gib <= self.usable_gib

    def to_dict(self) -> dict:
        return {
            "target": self.target, "precision": self.precision,
            "weights_gib": {k: round(v, 4) for k, v in self.weights_gib.items()},
            "kv_cache_gib": round(self.kv_cache_gib, 4), "activations_gib": round(self.activations_gib, 4),
            "adapters_gib": round(self.adapters_gib, 4), "overhead_gib": round(self.overhead_gib, 4),
            "total_gib": round(self.total_gib, 4), "usable_gib": self.usable_gib, "fits": self.fits,
            "context": self.context, "batch": self.batch, "notes": self.notes,
        }


def int4_bytes_per_weight(block: int, symmetric: bool, scale_bytes: float) -> float:
    """INT4 weight-only: half a byte per weight, plus one scale (and a 4-bit zero point) per block."""
    return 0.5 + scale_bytes / block + (0.0 if symmetric else 0.5 / block)


def weight_bytes(config: dict, target: Target, precision: dict, int4=None) -> dict[str, float]:
    """Bytes of each part's weights as the backend holds them (the target's [memory] factor applied)."""
    from .precision.int4 import int4_options

    counts = parameter_counts(config)
    out = {part: counts[part] * BYTES[precision[part]] for part in counts}
    if precision["decoder"] == "int4":
        opts = int4 or int4_options(target.int4)
        tensorrt = target.backend == "tensorrt"
        # ONNX Runtime keeps the FP32 graph's scales (4 bytes); TensorRT builds FP16 engines (2-byte scales).
        per = int4_bytes_per_weight(opts.block_for(target.backend), opts.symmetric, 2.0 if tensorrt else 4.0)
        lm_head = facts_from_config(config).vocab_size * facts_from_config(config).hidden_size
        head = {"int4": per, "int8": 2.0 if tensorrt else 1.0 + 4.0 / 32}[opts.lm_head]  # TensorRT: an INT8 lm_head stays FP16
        out["decoder"] = (counts["decoder"] - lm_head) * per + lm_head * head
    return {part: b * target.resident_factor(precision[part]) for part, b in out.items()}


def plan_memory(config: dict, target: Target, precision: dict | None = None, context: int | None = None,
                adapter_bytes: int = 0, int4=None) -> MemoryPlan:
    precision = precision or target.precision
    facts = facts_from_config(config)
    weights = {part: b / GIB for part, b in weight_bytes(config, target, precision, int4).items()}
    batch = target.shapes["batch"][2]
    context = context or target.shapes["context"]
    prompt = min(target.shapes["prompt_tokens"][2], context)
    act_bytes = 2.0 if precision["decoder"] != "fp32" else 4.0  # KV and activations stay FP16 under INT8 weights
    kv = 2 * facts.num_layers * facts.num_kv_heads * facts.head_dim * context * batch * act_bytes / GIB
    it = config["text_config"]["intermediate_size"]
    # Prefill peak: fp32 logits of the last position (the decoder outputs no others), one layer's attention scores,
    # MLP intermediates.
    prefill = batch * (facts.vocab_size * 4 + facts.num_heads * prompt * prompt * act_bytes
                       + 4 * prompt * max(it, facts.hidden_size) * act_bytes)
    v = config["vision_config"]
    images = batch * target.shapes["images"][2]
    if facts.anyres is not None:  # LLaVA-NeXT: the tower runs on every tile of an image, the worst case planned
        images *= facts.anyres.max_tiles()
    n_tok = (v.get("image_size", 224) // v.get("patch_size", 14)) ** 2 + 1
    vision_peak = images * (v.get("num_attention_heads", 16) * n_tok * n_tok + 4 * n_tok * v["intermediate_size"]) * (
        4.0 if precision["vision"] == "fp32" else 2.0)
    plan = MemoryPlan(
        target=target.name, precision=dict(precision), weights_gib=weights, kv_cache_gib=kv,
        activations_gib=max(prefill, vision_peak) / GIB, adapters_gib=adapter_bytes / GIB,
        overhead_gib=target.runtime_overhead_gb, usable_gib=target.usable_memory_gb, context=context, batch=batch,
    )
    plan.notes.append("weights counted exactly from the architecture; activations are an upper estimate")
    if facts.anyres is not None:
        worst, size = facts.anyres.max_image_tokens()
        plan.notes.append(f"LLaVA-NeXT any-resolution: up to {facts.anyres.max_tiles()} tiles per image in the vision "
                          f"tower, up to {worst} image tokens per image (e.g. {size[1]} x {size[0]} px); prompts of "
                          f"shapes.prompt_tokens must hold them")
    factors = {p: target.resident_factor(p) for p in set(precision.values()) if target.resident_factor(p) != 1.0}
    if factors:
        plan.notes.append("weights include what the backend holds per weight byte, measured for this target: "
                          + ", ".join(f"{p} {f:g}x" for p, f in sorted(factors.items())))
    return plan


def alternatives(config: dict, target: Target) -> list[str]:
    """Settings under which the model would fit, most faithful first."""
    options = []
    contexts = sorted({target.shapes["context"], 4096, 2048, 1024, 512}, reverse=True)
    for label, prec in (
        ("fp16 everywhere", {"vision": "fp16", "embed": "fp16", "decoder": "fp16"}),
        ("int8 decoder and embed, fp16 vision", {"vision": "fp16", "embed": "int8", "decoder": "int8"}),
        ("int4 weight-only decoder, fp16 vision and embed", {"vision": "fp16", "embed": "fp16", "decoder": "int4"}),
    ):
        for ctx in contexts:
            if ctx > target.shapes["context"] or ctx < target.shapes["prompt_tokens"][0]:
                continue
            p = plan_memory(config, target, prec, context=ctx)
            if p.fits:
                options.append(f"{label} at context {ctx}: {p.total_gib:.1f} GiB")
                break
    return options


def check_fits(plan: MemoryPlan, config: dict, target: Target) -> None:
    if plan.fits:
        return
    w = ", ".join(f"{k} {v:.2f}" for k, v in plan.weights_gib.items())
    would = alternatives(config, target)
    raise VlexportError(
        f"the model does not fit target '{target.name}' ({target.device}): it needs {plan.total_gib:.1f} GiB "
        f"(weights {w}; KV cache {plan.kv_cache_gib:.2f} at context {plan.context}, batch {plan.batch}; activations "
        f"{plan.activations_gib:.2f}; runtime {plan.overhead_gib:.2f}) but {plan.usable_gib:.1f} GiB is usable. "
        + (f"It would fit with: {'; '.join(would)}." if would else
           "No precision or context vlexport can plan makes it fit: choose a device with more memory or a smaller model.")
    )

"""Seeded random LLaVA checkpoints in the normal Hugging Face layout, built with transformers' own classes."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .errors import VlexportError

# llava-hf's template for LLaVA-1.5 ("USER: <image>\n... ASSISTANT:").
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ item['text'] + ' ' }}{% endgeneration %}"
    "{% else %}{{ item['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"


@dataclass(frozen=True)
class Preset:
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_kv_heads: int
    text_intermediate: int
    vocab_size: int  # model vocab, a multiple of 64 like llava-hf's 32064
    dtype: str = "float32"


PRESETS = {
    "tiny": Preset(32, 3, 2, 64, 56, 14, 64, 2, 4, 4, 128, 1024),
    "tiny-gqa": Preset(32, 3, 2, 64, 56, 14, 64, 2, 4, 2, 128, 1024),
    # ViT-B/14 at 224 and a 12-layer, 768-wide Llama: LLaVA-1.5's ratios at about 1/50 of its size.
    "small": Preset(768, 12, 12, 3072, 224, 14, 768, 12, 12, 12, 2048, 32064),
    "small-gqa": Preset(768, 12, 12, 3072, 224, 14, 768, 12, 12, 4, 2048, 32064),
    # llava-hf/llava-1.5-7b-hf's public dimensions: CLIP ViT-L/14 at 336, Llama-2-7B, random fp16 weights written
    # tensor by tensor (write_random_checkpoint), so the fixture never holds the model in memory.
    "7b-shaped": Preset(1024, 24, 16, 4096, 336, 14, 4096, 32, 32, 32, 11008, 32064, dtype="float16"),
}
STREAMED = {"7b-shaped"}

_SYLLABLES = [
    c + v
    for c in ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st", "th", "ch"]
    for v in ["a", "e", "i", "o", "u", "ou", "ea", "ai"]
]
_WORDS = (
    "a photo of the image shows what is in this picture describe cat dog person man woman astronaut "
    "rocket coffee cup table sky space suit flag red blue green white black color colour how many "
    "where is there are on with and of to in it this that answer question briefly detail one two three"
).split()


def _corpus(seed: int, n_lines: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = []
        for _ in range(rng.randint(6, 20)):
            if rng.random() < 0.5:
                words.append(rng.choice(_WORDS))
            else:
                words.append("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
        line = " ".join(words)
        lines.append(line.capitalize() + rng.choice([".", "?", "!", ","]) + (" 12" if rng.random() < 0.1 else ""))
    return lines


def build_tokenizer(vocab_size: int, seed: int):
    """A byte-level BPE tokenizer (as Llama/LLaVA checkpoints carry) with exactly `vocab_size` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    n_trained = vocab_size - 2  # <image> and <pad> are added after training, as in llava-hf
    trainer = trainers.BpeTrainer(
        vocab_size=n_trained,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed, 4000 if vocab_size <= 4096 else 200_000), trainer=trainer)
    if tok.get_vocab_size() != n_trained:
        raise RuntimeError(f"fixture tokenizer trained to {tok.get_vocab_size()} ids, wanted {n_trained}")
    tok.add_special_tokens([IMAGE_TOKEN, PAD_TOKEN])
    return tok


def make_llava(out_dir: str | Path, preset: str = "tiny", seed: int = 0, outliers: bool = False,
               weight_scale: float = 1.0) -> Path:
    """Write a complete llava-hf style directory: config, safetensors, tokenizer, processor, chat template.

    outliers=True injects the activation outliers real models have (see inject_outliers).
    weight_scale multiplies every seeded weight matrix (both towers, the projector, embeddings; not norms, biases
    or the fitted lm_head): attention scores grow with its square and the MLPs' outputs with its square too, so the
    model is worse conditioned and PyTorch FP32's rounding becomes measurable against float64 (the parity
    oracle's test base). Measured on tiny (seed 0, a DoRA/rsLoRA LoRA and a BitFit dump): PyTorch FP32 is off float64
    by 4e-7 of the logit scale at 1 and at 3, 3e-5 at 20, up to 1e-3 over verify's six cases at 30; the effect is
    not monotone (at 100 attention saturates: 1e-5), so tests use 30."""
    import math

    import torch
    from transformers import LlavaForConditionalGeneration, PreTrainedTokenizerFast

    if preset not in PRESETS:
        raise VlexportError(f"unknown fixture preset '{preset}': choose one of {', '.join(PRESETS)}")
    if not (isinstance(weight_scale, (int, float)) and math.isfinite(weight_scale) and weight_scale > 0):
        raise VlexportError(f"--weight-scale {weight_scale!r}: use a finite number > 0 (1 keeps the normal init)")
    if weight_scale != 1.0 and preset in STREAMED:
        raise VlexportError(f"--weight-scale needs the model in memory; preset '{preset}' is streamed to disk tensor by tensor")
    if outliers and preset in STREAMED:
        raise VlexportError(f"--outliers needs the model in memory; preset '{preset}' is streamed to disk tensor by tensor")
    p = PRESETS[preset]
    out = Path(out_dir)

    raw_tok = build_tokenizer(p.vocab_size, seed)
    # Llama prepends <s>; byte-level BPE has no post-processor for it, so add one explicitly.
    from tokenizers import processors

    bos_id = raw_tok.token_to_id("<s>")
    raw_tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw_tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        clean_up_tokenization_spaces=False,
    )
    config = llava_config(p, image_token_id=raw_tok.token_to_id(IMAGE_TOKEN), bos=raw_tok.token_to_id("<s>"),
                          eos=raw_tok.token_to_id("</s>"), pad=raw_tok.token_to_id(PAD_TOKEN))
    if preset in STREAMED:
        write_random_checkpoint(config, out, seed)
        _save_processor(out, p, tokenizer)
        return out
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        # HF init leaves biases and norms at 0/1; give every parameter seeded, non-trivial values so that
        # a dropped bias or norm weight shows up in parity.
        g = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + 0.05 * torch.randn(param.shape, generator=g))
            elif weight_scale != 1.0 and not name.startswith("lm_head"):
                param.mul_(weight_scale)
        # GPT-2's scaled init for the projections that write into the residual stream (1/sqrt(2 * layers)): without
        # it a deep random decoder is chaotic, and any rounding (FP16, INT8) moves its logits far more than it moves
        # a trained model's, so no precision gate could be judged on it.
        lm = model.model.language_model
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.mul_((2 * len(lm.layers)) ** -0.5)
            layer.mlp.down_proj.weight.mul_((2 * len(lm.layers)) ** -0.5)
        _fit_output_layer(model, raw_tok, seed)
        if outliers:
            inject_outliers(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    _save_processor(out, p, tokenizer)
    return out


def _save_processor(out: Path, p: Preset, tokenizer) -> None:
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": p.image_size},
        crop_size={"height": p.image_size, "width": p.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=p.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)


# llava-hf checkpoints keep LLaVA's original key layout; transformers 5 maps it to its modules when loading.
_CHECKPOINT_PREFIXES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                        ("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."))


def write_random_checkpoint(config, out_dir: str | Path, seed: int = 0, shard_bytes: int = 2 * 1024**3) -> Path:
    """Seeded random weights for `config` in its dtype, written shard by shard (safetensors + index, llava-hf keys).

    The model is built on the meta device for its parameter names and shapes only, so memory stays at one shard
    whatever the model's size. Values follow the small fixtures: normal(0, initializer_range) matrices with GPT-2's
    scaled init on o_proj/down_proj, and norms and biases near 1 and 0."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, str(config.dtype).replace("torch.", "")) if config.dtype else torch.float32
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    std = config.text_config.initializer_range
    residual_scale = (2 * config.text_config.num_hidden_layers) ** -0.5
    g = torch.Generator().manual_seed(seed)
    # Shards are planned from the shapes first (file names carry their count), then filled and written one by one.
    plan: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, tensor in model.state_dict().items():
        nbytes = tensor.numel() * dtype.itemsize
        if plan[-1] and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append((name, tuple(tensor.shape)))
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(plan):
        file = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        shard = {}
        for name, shape in names:
            if name.endswith("bias") or "norm" in name:
                value = (1.0 if name.endswith("weight") else 0.0) + 0.05 * torch.randn(shape, generator=g)
            else:
                value = torch.randn(shape, generator=g).mul_(std)
                if name.endswith(("o_proj.weight", "down_proj.weight")) and "language_model" in name:
                    value.mul_(residual_scale)
            key = next((old + name[len(new):] for new, old in _CHECKPOINT_PREFIXES if name.startswith(new)), name)
            shard[key] = value.to(dtype)
            weight_map[key] = file
            total += shard[key].nbytes
        save_file(shard, str(out / file), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config.save_pretrained(out)
    return out


LOGIT_STD = 4.0
OUTPUT_FIT_TOKENS = 8192


def _fit_output_layer(model, raw_tok, seed: int) -> None:
    """Give lm_head a trained model's confidence: rows are the centred mean final hidden state before each next token.

    Random init spreads next-token probability almost uniformly (top-1 probability near 1/vocab), so top-1 agreement
    under any rounding is a coin toss and no FP16 or INT8 gate could be judged. Class means over fixture text make a
    nearest-centroid read-out, a bigram-like language model: mean top-1 probability about 0.6 on text, with ties as
    rare as in a trained LLM. Logits are scaled to a std of LOGIT_STD."""
    import torch

    lm = model.model.language_model
    ids: list[int] = []
    for line in _corpus(seed + 99, 4000):
        ids += raw_tok.encode(line).ids
        if len(ids) >= OUTPUT_FIT_TOKENS:
            break
    ids_t = torch.tensor(ids[:OUTPUT_FIT_TOKENS - OUTPUT_FIT_TOKENS % 256]).view(-1, 256)
    hidden = torch.cat([lm(input_ids=ids_t[i:i + 8]).last_hidden_state.flatten(0, 1) for i in range(0, len(ids_t), 8)])
    targets = torch.cat([torch.cat([row[1:], row[-1:]]) for row in ids_t])
    hidden = hidden - hidden.mean(0)
    vocab, dim = model.lm_head.weight.shape
    rows = torch.zeros(vocab, dim).index_add_(0, targets, hidden)
    rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-6)
    g = torch.Generator().manual_seed(seed + 7)
    model.lm_head.weight.copy_(rows + 0.3 * torch.randn(vocab, dim, generator=g) / dim**0.5)
    std = model(input_ids=ids_t[:1]).logits.std()
    model.lm_head.weight.mul_(LOGIT_STD / std)


# Outlier magnitudes of real LLMs: a few hidden channels 20-100x the rest (Dettmers et al. 2022, "LLM.int8()"), and
# single MLP channels far larger still in a few layers (Sun et al. 2024, "Massive activations").
HIDDEN_OUTLIER_FACTORS = (20.0, 40.0, 60.0, 80.0)
MLP_OUTLIER_FACTOR = 1000.0


def inject_outliers(model, seed: int = 0) -> dict:
    """Give a random-weight LLaVA the activation outliers of a trained one, without changing what it computes.

    Hidden-channel outliers: a norm's weight grows by f on a few channels and the columns of the linears it feeds
    shrink by f (LLM.int8()'s systematic outlier dimensions: the same channels in every layer, in both towers).
    MLP outliers: in two decoder layers, one row of up_proj grows by 1000 and the matching column of down_proj shrinks
    by 1000, so the down projection's input carries one huge channel that no norm precedes. In exact arithmetic the
    model is unchanged; only the ranges its matrix products see differ, which is what breaks naive INT8.
    """
    import torch

    g = torch.Generator().manual_seed(seed + 1000)
    lm, tower = model.model.language_model, model.model.vision_tower
    factors = torch.tensor(HIDDEN_OUTLIER_FACTORS)

    def scale(norm, linears, channels):
        norm.weight[channels] *= factors[: len(channels)]
        if getattr(norm, "bias", None) is not None:
            norm.bias[channels] *= factors[: len(channels)]
        for lin in linears:
            lin.weight[:, channels] /= factors[: len(channels)]

    text_channels = torch.randperm(lm.config.hidden_size, generator=g)[: len(factors)]
    for layer in lm.layers:
        scale(layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], text_channels)
        scale(layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj], text_channels)
    scale(lm.norm, [model.lm_head], text_channels)
    mlp_layers = sorted({1 % len(lm.layers), len(lm.layers) - 1})
    mlp_channels = []
    for i in mlp_layers:
        j = int(torch.randint(lm.config.intermediate_size, (1,), generator=g))
        lm.layers[i].mlp.up_proj.weight[j, :] *= MLP_OUTLIER_FACTOR
        lm.layers[i].mlp.down_proj.weight[:, j] /= MLP_OUTLIER_FACTOR
        mlp_channels.append(j)
    vision_channels = torch.randperm(tower.config.hidden_size, generator=g)[: len(factors)]
    for layer in tower.encoder.layers:
        scale(layer.layer_norm1, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj], vision_channels)
        scale(layer.layer_norm2, [layer.mlp.fc1], vision_channels)
    return {"text_channels": text_channels.tolist(), "mlp_layers": mlp_layers, "mlp_channels": mlp_channels,
            "vision_channels": vision_channels.tolist()}


def llava_config(p: Preset, image_token_id: int, bos: int = 1, eos: int = 2, pad: int | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=p.vision_hidden,
        intermediate_size=p.vision_intermediate,
        num_hidden_layers=p.vision_layers,
        num_attention_heads=p.vision_heads,
        image_size=p.image_size,
        patch_size=p.patch_size,
        projection_dim=p.text_hidden,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    text = LlamaConfig(
        hidden_size=p.text_hidden,
        intermediate_size=p.text_intermediate,
        num_hidden_layers=p.text_layers,
        num_attention_heads=p.text_heads,
        num_key_value_heads=p.text_kv_heads,
        vocab_size=p.vocab_size,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    n_patches = (p.image_size // p.patch_size) ** 2
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=n_patches,
        tie_word_embeddings=False,
        dtype=p.dtype,
    )


def write_llava_config(out_dir: str | Path, preset: str) -> Path:
    """config.json alone: enough for `vlexport plan`, no weights."""
    if preset not in PRESETS:
        raise VlexportError(f"unknown fixture preset '{preset}': choose one of {', '.join(PRESETS)}")
    p = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # llava-hf numbers its image token after the 32000 Llama tokens.
    image_token = 32000 if p.vocab_size > 32000 else p.vocab_size - 2
    llava_config(p, image_token_id=image_token, pad=image_token + 1).save_pretrained(out)
    return out


LORA_TARGETS = (
    r".*(language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|down_proj)"
    r"|vision_tower.*\.(q_proj|v_proj|fc1)|multi_modal_projector\.linear_[12])"
)


def _randomize(peft_model, seed: int, scale: float = 0.1) -> None:
    """PEFT initialises B (and BEFT biases) to zero, an identity adapter; trained adapters are not."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                base = 1.0 if "magnitude" in name else 0.0
                p.copy_(base * p + scale * torch.randn(p.shape, generator=g) * (p.abs().mean() if base else 1.0))


def make_lora(base_dir: str | Path, out_dir: str | Path, seed: int = 1, scale: float = 0.1, **options) -> Path:
    """A PEFT LoRA adapter trained-looking (non-zero B) over the vision tower, projector and language model.

    A and B are N(0, scale^2). The default 0.1 makes the update larger than the weights it changes, so that a
    dropped or misplaced LoRA cannot hide in a parity test; 0.02 gives a trained LoRA's size (the update about a
    tenth of the weights), which is what precision measurements need."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    config = dict(r=8, lora_alpha=16, target_modules=LORA_TARGETS)
    config.update(options)
    model = LlavaForConditionalGeneration.from_pretrained(str(base_dir))
    peft_model = get_peft_model(model, LoraConfig(**config))
    _randomize(peft_model, seed, scale)
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


def make_bitfit(base_dir: str | Path, out_file: str | Path, seed: int = 2) -> Path:
    """A BitFit dump: trained (absolute) biases of CLIP, the projector, plus biases on Llama linears that have none."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(base_dir))
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        if name.endswith(".bias") and ("vision_tower" in name or "multi_modal_projector" in name):
            state[name] = p.detach() + 0.05 * torch.randn(p.shape, generator=g)
    for name, mod in model.named_modules():
        if name.endswith(("self_attn.o_proj", "mlp.down_proj")) and "language_model" in name:
            state[name + ".bias"] = 0.05 * torch.randn(mod.weight.shape[0], generator=g)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_file))
    return Path(out_file)


# AdapterHub (`adapters` 1.3.0) preset configurations as its save_adapter writes them (defaults of SeqBnConfig,
# DoubleSeqBnConfig and ParBnConfig); tests/data/adapterhub holds files the library wrote itself.
_ADAPTERHUB_PRESETS = {
    "seqbn": {"mh_adapter": False, "output_adapter": True, "reduction_factor": 16, "non_linearity": "relu",
              "original_ln_before": True, "original_ln_after": True, "residual_before_ln": True, "is_parallel": False,
              "scaling": 1.0},
    "double_seqbn": {"mh_adapter": True, "output_adapter": True, "reduction_factor": 16, "non_linearity": "swish",
                     "original_ln_before": False, "original_ln_after": True, "residual_before_ln": True,
                     "is_parallel": False, "scaling": 1.0},
    "parbn": {"mh_adapter": False, "output_adapter": True, "reduction_factor": 2, "non_linearity": "relu",
              "original_ln_before": False, "original_ln_after": True, "residual_before_ln": True, "is_parallel": True,
              "scaling": 4.0},
}


def make_adapterhub_bottleneck(base_dir: str | Path, out_dir: str | Path, tower: str, preset: str = "seqbn",
                               seed: int = 3, scale: float = 0.3) -> Path:
    """A bottleneck adapter for one tower of a LLaVA base, in the files AdapterHub's save_adapter writes
    (adapter_config.json + pytorch_adapter.bin with its key names), with trained-looking (non-zero) weights.
    AdapterHub saves one adapter per tower: tower is "vision" (CLIPVisionModel) or "language" (LlamaForCausalLM)."""
    import json

    import torch

    config = json.loads((Path(base_dir) / "config.json").read_text())
    sub = config["vision_config"] if tower == "vision" else config["text_config"]
    hidden, layers = sub["hidden_size"], sub["num_hidden_layers"]
    cfg = {"architecture": "bottleneck", "ln_after": False, "ln_before": False, "use_gating": False,
           "leave_out": [], "phm_layer": False, "init_weights": "bert", "dropout": 0.0,
           "adapter_residual_before_ln": False, **_ADAPTERHUB_PRESETS[preset]}
    name = f"{tower}_{preset}"
    prefix = "vision_model.encoder.layers" if tower == "vision" else "model.layers"
    width = max(1, hidden // cfg["reduction_factor"])
    g = torch.Generator().manual_seed(seed)
    state = {}
    sites = (["attention"] if cfg["mh_adapter"] else []) + (["output"] if cfg["output_adapter"] else [])
    for layer in range(layers):
        for site in sites:
            key = f"{prefix}.{layer}.{site}_adapters.adapters.{name}"
            state[f"{key}.adapter_down.0.weight"] = scale * torch.randn(width, hidden, generator=g)
            state[f"{key}.adapter_down.0.bias"] = scale * torch.randn(width, generator=g)
            state[f"{key}.adapter_up.weight"] = scale * torch.randn(hidden, width, generator=g)
            state[f"{key}.adapter_up.bias"] = scale * torch.randn(hidden, generator=g)
    return _save_adapterhub(out_dir, state, name, cfg, hidden, vision=tower == "vision")


def _save_adapterhub(out_dir: str | Path, state: dict, name: str, cfg: dict, hidden: int, vision: bool) -> Path:
    """The two files AdapterHub's save_adapter writes: adapter_config.json (its metadata) and pytorch_adapter.bin."""
    import json

    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"config": cfg, "hidden_size": hidden, "model_class": "CLIPVisionModel" if vision else "LlamaForCausalLM",
            "model_name": "", "model_type": "clip_vision_model" if vision else "llama", "name": name,
            "version": "adapters.1.3.0"}
    (out / "adapter_config.json").write_text(json.dumps(meta, indent=2))
    torch.save(state, out / "pytorch_adapter.bin")
    return out


def make_adapterhub_prefix(base_dir: str | Path, out_dir: str | Path, prefix_length: int = 4, flat: bool = False,
                           seed: int = 5, scale: float = 1.0) -> Path:
    """A prefix-tuning adapter for a LLaVA base's language model in the files AdapterHub's save_adapter writes
    (the pool's keys model.prefix_tuning.prefix_tunings.NAME.self_prefix.*; MLP or flat), non-trivial values."""
    import json

    import torch

    text = json.loads((Path(base_dir) / "config.json").read_text())["text_config"]
    hidden, layers = text["hidden_size"], text["num_hidden_layers"]
    kv, head_dim = text.get("num_key_value_heads") or text["num_attention_heads"], hidden // text["num_attention_heads"]
    n = layers * 2 * kv * head_dim
    name = "llava_prefix"
    key = f"model.prefix_tuning.prefix_tunings.{name}.self_prefix"
    g = torch.Generator().manual_seed(seed)
    if flat:
        state = {f"{key}.control_trans": scale * torch.randn(prefix_length * n, generator=g)}
    else:
        bottleneck = 32
        state = {f"{key}.wte.weight": torch.randn(prefix_length, hidden, generator=g),
                 f"{key}.control_trans.0.weight": 0.3 * torch.randn(bottleneck, hidden, generator=g),
                 f"{key}.control_trans.0.bias": 0.3 * torch.randn(bottleneck, generator=g),
                 f"{key}.control_trans.2.weight": scale * torch.randn(n, bottleneck, generator=g),
                 f"{key}.control_trans.2.bias": scale * torch.randn(n, generator=g)}
    cfg = {"architecture": "prefix_tuning", "bottleneck_size": 32, "cross_prefix": True, "dropout": 0.0,
           "encoder_prefix": True, "flat": flat, "leave_out": [], "non_linearity": "tanh",
           "prefix_length": prefix_length, "shared_gating": True, "use_gating": False}
    return _save_adapterhub(out_dir, state, name, cfg, hidden, vision=False)


# PEFT's other mergeable methods: per type, the options that fit the tiny presets' widths (32 in CLIP, 64 in Llama)
# and give every targeted layer a non-trivial adapter. IA3 scales the input of the feed-forward layers listed.
PEFT_METHOD_OPTIONS = {
    "ADALORA": {"init_r": 6, "target_r": 4, "total_step": 10},
    "VERA": {"r": 8},
    "IA3": {"feedforward_modules": r".*(down_proj|fc1|linear_2)"},
    "LOHA": {"r": 4, "alpha": 6},
    "LOKR": {"r": 4, "alpha": 6},
    "OFT": {"r": 0, "oft_block_size": 8},
    "BOFT": {"boft_block_size": 4},
    "FOURIERFT": {"n_frequency": 50},
    "C3A": {"block_size": 16},
    "HRA": {"r": 4},
    "RANDLORA": {"r": 8},
    "MISS": {"r": 4},
    "SHIRA": {"r": 4},
    "VBLORA": {"num_vectors": 16, "vector_length": 8},
    "ROAD": {"group_size": 16},
    "DELORA": {"r": 4},
    "GLORA": {"r": 4},
    "GRALORA": {"r": 8},
    "HIRA": {"r": 4},
    "PVERA": {"r": 8},
    "WAVEFT": {"n_frequency": 50},
    "TINYLORA": {},
}


def make_peft_adapter(base_dir: str | Path, out_dir: str | Path, peft_type: str, seed: int = 1, scale: float = 0.1,
                      **options) -> Path:
    """An adapter of any PEFT type in PEFT_METHOD_OPTIONS, made with PEFT itself over the vision tower, projector
    and language model (LORA_TARGETS), with trained-looking values: every trainable tensor moves by N(0, scale^2)
    from PEFT's init (which is an identity for most methods: zero deltas, unit IA3 scales, identity rotations).
    AdaLoRA gets a final rank allocation (rank_pattern) that drops ranks unevenly, as its RankAllocator does."""
    import torch
    from peft import get_peft_model
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from transformers import LlavaForConditionalGeneration

    kw = {"target_modules": LORA_TARGETS, **PEFT_METHOD_OPTIONS.get(peft_type, {}), **options}
    model = LlavaForConditionalGeneration.from_pretrained(str(base_dir))
    peft_model = get_peft_model(model, PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](**kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g))
    if peft_type == "ADALORA":
        config = peft_model.peft_config["default"]
        pattern = {}
        for i, (name, p) in enumerate(n for n in peft_model.base_model.model.named_parameters() if "lora_E.default" in n[0]):
            keep = [j % 3 != 1 or i % 2 == 0 for j in range(p.shape[0])]  # some modules keep all ranks, others 2/3
            pattern[name] = keep
            with torch.no_grad():
                p.mul_(torch.tensor(keep, dtype=p.dtype).view(-1, 1))  # what the allocator's mask does to lora_E
        config.rank_pattern = pattern
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)

"""Seeded random LLaVA-NeXT (1.6) and LLaVA-OneVision checkpoints in the normal Hugging Face layout.

Built with transformers' own classes (LlavaNextForConditionalGeneration with CLIP + Llama, as
llava-v1.6-vicuna-7b-hf; LlavaOnevisionForConditionalGeneration with SigLIP + Qwen2, as llava-onevision-qwen2-*-hf),
the tokenizer and weight recipe of vlexport.fixture (seeded norms and biases, GPT-2 scaled residual projections, an
output layer fitted to fixture text), and the processor's image_grid_pinpoints scaled from llava-hf's to the preset's
tile size, so that the same aspect ratios pick the same grids as on the real models.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import VlexportError
from .fixture import CHAT_TEMPLATE, IMAGE_TOKEN, PAD_TOKEN, Preset, _fit_output_layer, build_tokenizer

VIDEO_TOKEN = "<video>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"

# llava-hf's llava-onevision-qwen2 template (ChatML; images first in each turn, then text on new lines).
ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# llava-hf's grids in tiles: LLaVA-NeXT's 1x2, 2x1, 2x2, 3x1, 1x3 of 336 px; OneVision's 1..6 x 1..6 of 384 px.
NEXT_GRIDS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))
ONEVISION_GRIDS = tuple((i, j) for i in range(1, 7) for j in range(1, 7))


# Presets use fixture.Preset's fields; image_size is the tile side (SigLIP's 384 / 14 leaves a remainder, and so
# does OneVision tiny's 60 / 14).
NEXT_PRESETS = {
    "tiny": Preset(32, 3, 2, 64, 56, 14, 64, 2, 4, 4, 128, 1024),
    # ViT-B/14 at 224 and a 12-layer Llama, as vlexport.fixture's small LLaVA-1.5.
    "small": Preset(768, 12, 12, 3072, 224, 14, 768, 12, 12, 12, 2048, 32064),
}
ONEVISION_PRESETS = {
    "tiny": Preset(32, 3, 2, 64, 60, 14, 64, 2, 4, 2, 128, 1024),
    # SigLIP-B/14-ish at 224 and a 12-layer Qwen2 with GQA (Qwen2-0.5B's 14 heads / 2 KV heads ratio, rounded).
    "small": Preset(768, 12, 12, 3072, 224, 14, 768, 12, 12, 4, 2048, 32064),
}


def _preset(presets: dict, preset: str, family: str) -> Preset:
    if preset not in presets:
        raise VlexportError(f"unknown {family} fixture preset '{preset}': choose one of {', '.join(presets)}")
    return presets[preset]


def pinpoints(grids, tile: int) -> list[list[int]]:
    return [[rows * tile, cols * tile] for rows, cols in grids]


def _seed_weights(model, seed: int) -> None:
    """vlexport.fixture's recipe: seeded norms and biases (HF leaves them at 1/0, so a dropped one would not show in
    parity) and GPT-2's 1/sqrt(2 * layers) on the projections that write into the residual stream."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                param.copy_(base + 0.05 * torch.randn(param.shape, generator=g))
        lm = model.model.language_model
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.mul_((2 * len(lm.layers)) ** -0.5)
            layer.mlp.down_proj.weight.mul_((2 * len(lm.layers)) ** -0.5)


def _tokenizer(vocab_size: int, seed: int, extra: list[str], bos: bool, **special):
    """vlexport.fixture's byte-level BPE, `extra` special tokens after <image> and <pad>, exactly vocab_size ids."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    raw = build_tokenizer(vocab_size - len(extra), seed)
    raw.add_special_tokens(extra)
    if raw.get_vocab_size() != vocab_size:
        raise RuntimeError(f"fixture tokenizer has {raw.get_vocab_size()} ids, wanted {vocab_size}")
    if bos:  # Llama prepends <s>; Qwen2 has no BOS
        bos_id = raw.token_to_id("<s>")
        raw.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", bos_id)])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", pad_token=PAD_TOKEN,
                                  clean_up_tokenization_spaces=False, **special)
    return raw, tok


def next_config(p: Preset, image_token_id: int, bos: int, eos: int, pad: int):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(hidden_size=p.vision_hidden, intermediate_size=p.vision_intermediate,
                              num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads,
                              image_size=p.image_size, patch_size=p.patch_size, projection_dim=p.text_hidden,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5)
    text = LlamaConfig(hidden_size=p.text_hidden, intermediate_size=p.text_intermediate,
                       num_hidden_layers=p.text_layers, num_attention_heads=p.text_heads,
                       num_key_value_heads=p.text_kv_heads, vocab_size=p.vocab_size, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
                       tie_word_embeddings=False)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                           projector_hidden_act="gelu", vision_feature_select_strategy="default",
                           vision_feature_layer=-2, image_grid_pinpoints=pinpoints(NEXT_GRIDS, p.image_size),
                           image_seq_length=(p.image_size // p.patch_size) ** 2, tie_word_embeddings=False)


def onevision_config(p: Preset, image_token_id: int, video_token_id: int, eos: int, pad: int):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=p.vision_hidden, intermediate_size=p.vision_intermediate,
                                num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads,
                                image_size=p.image_size, patch_size=p.patch_size, vision_use_head=False,
                                layer_norm_eps=1e-6)
    text = Qwen2Config(hidden_size=p.text_hidden, intermediate_size=p.text_intermediate,
                       num_hidden_layers=p.text_layers, num_attention_heads=p.text_heads,
                       num_key_value_heads=p.text_kv_heads, vocab_size=p.vocab_size, max_position_embeddings=4096,
                       rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=eos, pad_token_id=pad,
                       tie_word_embeddings=False)
    return LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=image_token_id,
                                video_token_index=video_token_id, projector_hidden_act="gelu",
                                vision_feature_select_strategy="full", vision_feature_layer=-1,
                                vision_aspect_ratio="anyres_max_9",
                                image_grid_pinpoints=pinpoints(ONEVISION_GRIDS, p.image_size),
                                tie_word_embeddings=False)


def make_llava_next(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """A complete llava-hf style LLaVA-NeXT directory: config, safetensors, tokenizer, processor, chat template."""
    import torch
    from transformers import LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, LlavaNextProcessor

    p = _preset(NEXT_PRESETS, preset, "llava-next")
    out = Path(out_dir)
    raw, tok = _tokenizer(p.vocab_size, seed, [], bos=True, bos_token="<s>", eos_token="</s>",
                          extra_special_tokens={"image_token": IMAGE_TOKEN})
    config = next_config(p, raw.token_to_id(IMAGE_TOKEN), raw.token_to_id("<s>"), raw.token_to_id("</s>"),
                         raw.token_to_id(PAD_TOKEN))
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    _seed_weights(model, seed)
    with torch.no_grad():
        _fit_output_layer(model, raw, seed)
    model.save_pretrained(out, safe_serialization=True)
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": p.image_size}, crop_size={"height": p.image_size, "width": p.image_size},
        image_grid_pinpoints=pinpoints(NEXT_GRIDS, p.image_size))
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=p.patch_size,
                       vision_feature_select_strategy="default", num_additional_image_tokens=1,
                       chat_template=CHAT_TEMPLATE).save_pretrained(out)
    return out


def make_llava_onevision(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """A complete llava-hf style LLaVA-OneVision directory (SigLIP + Qwen2, anyres_max_9): config, safetensors,
    tokenizer, image processor, processor settings, chat template (no video processor: images only)."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil

    p = _preset(ONEVISION_PRESETS, preset, "llava-onevision")
    out = Path(out_dir)
    raw, tok = _tokenizer(p.vocab_size, seed, [VIDEO_TOKEN, IM_START, IM_END], bos=False, eos_token=IM_END,
                          extra_special_tokens={"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN})
    config = onevision_config(p, raw.token_to_id(IMAGE_TOKEN), raw.token_to_id(VIDEO_TOKEN),
                              raw.token_to_id(IM_END), raw.token_to_id(PAD_TOKEN))
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    _seed_weights(model, seed)
    with torch.no_grad():
        _fit_output_layer(model, raw, seed)
    model.save_pretrained(out, safe_serialization=True)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": p.image_size, "width": p.image_size}, image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5], image_grid_pinpoints=pinpoints(ONEVISION_GRIDS, p.image_size))
    # LlavaOnevisionProcessor cannot be built without torchvision (its video processor needs it), so its files are
    # written as llava-hf's repos have them: preprocessor_config.json, processor_config.json, tokenizer, template.
    image_processor.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "chat_template.jinja").write_text(ONEVISION_CHAT_TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({
        "image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN, "num_image_tokens": (p.image_size // p.patch_size) ** 2,
        "processor_class": "LlavaOnevisionProcessor", "vision_aspect_ratio": "anyres_max_9",
        "vision_feature_select_strategy": "full"}, indent=2) + "\n")
    return out


def load_family_model(base_dir: str | Path):
    """The fixture directory's own transformers class (LlavaNext / LlavaOnevision ForConditionalGeneration)."""
    from .model import model_class

    return model_class(json.loads((Path(base_dir) / "config.json").read_text())).from_pretrained(str(base_dir))


def make_family_lora(base_dir: str | Path, out_dir: str | Path, seed: int = 1, scale: float = 0.1, **options) -> Path:
    """vlexport.fixture.make_lora on a LLaVA-NeXT / OneVision base: PEFT over the vision tower, projector and
    language model (the module names are LLaVA-1.5's: model.vision_tower, model.multi_modal_projector,
    model.language_model), trained-looking values."""
    from peft import LoraConfig, get_peft_model

    from .fixture import LORA_TARGETS, _randomize

    config = dict(r=8, lora_alpha=16, target_modules=LORA_TARGETS)
    config.update(options)
    peft_model = get_peft_model(load_family_model(base_dir), LoraConfig(**config))
    _randomize(peft_model, seed, scale)
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


def make_family_bitfit(base_dir: str | Path, out_file: str | Path, seed: int = 2) -> Path:
    """vlexport.fixture.make_bitfit on a LLaVA-NeXT / OneVision base: trained biases of the vision tower and
    projector (SigLIP's too), the language model's own biases where it has them (Qwen2's q/k/v), and new biases on
    the o_proj / down_proj linears that have none."""
    import torch
    from safetensors.torch import save_file

    model = load_family_model(base_dir)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.named_parameters():
        if name.endswith(".bias") and ("vision_tower" in name or "multi_modal_projector" in name
                                       or ("language_model" in name and "self_attn" in name)):
            state[name] = p.detach() + 0.05 * torch.randn(p.shape, generator=g)
    for name, mod in model.named_modules():
        if name.endswith(("self_attn.o_proj", "mlp.down_proj")) and "language_model" in name:
            state[name + ".bias"] = 0.05 * torch.randn(mod.weight.shape[0], generator=g)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_file))
    return Path(out_file)


def adapter_maker(base_dir: str | Path, kind: str):
    """`vlexport fixture lora|bitfit BASE`: vlexport.fixture's maker for a LLaVA-1.5 base, this module's for a
    LLaVA-NeXT / OneVision one (their transformers class)."""
    from . import fixture

    cfg = Path(base_dir) / "config.json"
    family = json.loads(cfg.read_text()).get("model_type") if cfg.is_file() else "llava"
    if family in ("llava_next", "llava_onevision"):
        return {"lora": make_family_lora, "bitfit": make_family_bitfit}[kind]
    return {"lora": fixture.make_lora, "bitfit": fixture.make_bitfit}[kind]

"""Loading a llava-hf style base directory, and the facts about it the exporter and runtime need."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import VlexportError
from .files import read_json, sha256_file

PARTS = ("vision", "embed", "decoder")


@dataclass(frozen=True)
class LlavaFacts:
    """Shapes and ids read from config.json alone (no weights)."""

    image_token_id: int
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    image_size: int
    patch_size: int
    vision_feature_layer: int | list
    vision_feature_select_strategy: str
    num_image_tokens: int
    eos_token_id: int | list | None
    bos_token_id: int | None
    pad_token_id: int | None
    max_position_embeddings: int
    model_type: str = "llava"
    # LLaVA-NeXT's any-resolution geometry (vlexport.anyres.AnyResGeometry); None for LLaVA-1.5. Then
    # num_image_tokens is one tile's features, and an image's count depends on its size (AnyResGeometry).
    anyres: object = None


def check_base_dir(base: Path) -> dict:
    """Return config.json of a LLaVA directory with weights, or raise a clear error naming what is wrong."""
    config = check_config_dir(base)
    weights = sorted(Path(base).glob("*.safetensors"))
    if not weights:
        raise VlexportError(f"--base '{base}' has no *.safetensors weights; convert .bin checkpoints with safetensors first")
    index = Path(base) / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(read_json(index)["weight_map"].values()))
        except (KeyError, AttributeError, TypeError):
            raise VlexportError(f"--base '{index}' has no weight_map; download or save the model again") from None
        missing = [f for f in shards if not (Path(base) / f).is_file()]
        if missing:
            raise VlexportError(f"--base '{base}': weight file(s) {', '.join(missing)} listed in {index.name} are "
                                "missing; download the model again (all shards)")
    for f in weights:
        check_safetensors_file(f)
    return config


# A safetensors header larger than this is not a weights file (real ones are a few MB even for 70B models).
_MAX_HEADER_BYTES = 100_000_000


def check_safetensors_file(path: Path) -> None:
    """Refuse a truncated or corrupt weights file from its header alone (no tensor is read): the header must parse
    and the file must hold every byte the header's tensors point at."""
    import json

    path = Path(path)
    fix = "it is truncated or corrupt (an interrupted download or copy?): download or save the model again"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > _MAX_HEADER_BYTES or 8 + n > size:
                raise VlexportError(f"--base weights file '{path}' ({size:,} bytes) has no valid safetensors header; {fix}")
            header = json.loads(fh.read(n))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    except OSError as e:
        raise VlexportError(f"--base weights file '{path}' cannot be read ({e.strerror or e}); check its permissions") from None
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError, IndexError):
        raise VlexportError(f"--base weights file '{path}' has a corrupt safetensors header; {fix}") from None
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise VlexportError(f"--base weights file '{path}' is {size:,} bytes but its header needs {need:,}; {fix}")


def check_config_dir(base: Path) -> dict:
    """config.json of a LLaVA directory (weights not needed)."""
    base = Path(base)
    if not base.is_dir():
        raise VlexportError(f"--base '{base}' is not a directory; pass a Hugging Face LLaVA directory (config.json + safetensors)")
    cfg_path = base / "config.json"
    if not cfg_path.exists():
        raise VlexportError(f"--base '{base}' has no config.json; pass a Hugging Face LLaVA directory")
    config = read_json(cfg_path)
    if config.get("model_type") == "llava_onevision":
        raise VlexportError(
            f"--base '{base}' is a LLaVA-OneVision model (model_type 'llava_onevision'): vlexport preprocesses and "
            "makes fixtures of it (vlexport fixture llava-onevision) but does not export it yet; use a 'llava' "
            "(1.5) or 'llava_next' (1.6) base"
        )
    if config.get("model_type") not in MODEL_TYPES:
        raise VlexportError(
            f"--base '{base}' is a '{config.get('model_type')}' model, not LLaVA (config.json model_type must be "
            f"one of {', '.join(repr(t) for t in MODEL_TYPES)}); vlexport exports llava-hf style checkpoints"
        )
    return config


# model_type -> (transformers config class, model class): LLaVA-1.5 and LLaVA-NeXT (1.6, any-resolution).
MODEL_TYPES = {
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration"),
    "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration"),
}


def model_class(config: dict):
    """The transformers class that loads a base of this config.json (dict)."""
    import transformers

    return getattr(transformers, MODEL_TYPES.get(config.get("model_type"), MODEL_TYPES["llava"])[1])


def facts_from_config(config: dict) -> LlavaFacts:
    import transformers

    model_type = config.get("model_type", "llava")
    config_class = getattr(transformers, MODEL_TYPES.get(model_type, MODEL_TYPES["llava"])[0])
    cfg = config_class(**{k: v for k, v in config.items() if k not in ("transformers_version", "architectures")})
    text, vision = cfg.text_config, cfg.vision_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    n_patches = (vision.image_size // vision.patch_size) ** 2
    n_image_tokens = n_patches + (0 if cfg.vision_feature_select_strategy == "default" else 1)
    return LlavaFacts(
        image_token_id=cfg.image_token_id,
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        num_layers=text.num_hidden_layers,
        num_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads,
        head_dim=head_dim,
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        num_image_tokens=n_image_tokens,
        eos_token_id=text.eos_token_id,
        bos_token_id=text.bos_token_id,
        pad_token_id=text.pad_token_id,
        max_position_embeddings=text.max_position_embeddings,
        model_type=model_type,
        anyres=_anyres_geometry(config) if model_type == "llava_next" else None,
    )


def _anyres_geometry(config: dict):
    from .anyres import AnyResGeometry

    return AnyResGeometry.from_config(config)


# transformers' attention implementation to export with, by dtype. "eager" exports as MatMul/Softmax/MatMul with
# the scale applied to the scores, which ONNX Runtime fuses with the K transpose; the SDPA decomposition scales all
# of K every step. On the small fixture, decode at context 300 is about 10% faster, at 1000 about 15%
# (bench/results/2026-11-25-xeon-2core/README.md). fp16 keeps SDPA: eager adds the mask in fp16, where the mask's
# minimum plus a score overflows to -inf on fully masked (left-padding) rows, and ONNX Runtime and torch then
# disagree there (the 7B-shaped export check caught it).
EXPORT_ATTENTION = {"float32": "eager", "float16": "sdpa"}


def load_llava(base: Path, num_text_layers: int | None = None, dtype: str = "float32", attention: str = "sdpa"):
    """The base model in fp32 (or `dtype`), eval mode, with transformers' `attention` implementation (SDPA, what
    users run, unless the exporter asks for EXPORT_ATTENTION).

    num_text_layers loads only the first decoder layers (few-layer parity on machines too small for the model).
    """
    import torch
    from safetensors import SafetensorError
    from transformers import AutoConfig

    model_cls = model_class(check_base_dir(base))
    try:
        config = AutoConfig.from_pretrained(str(base))
        if num_text_layers is not None:
            config.text_config.num_hidden_layers = num_text_layers
        model = model_cls.from_pretrained(
            str(base), config=config, dtype=getattr(torch, dtype), attn_implementation=attention
        )
    except (OSError, ValueError, RuntimeError, SafetensorError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VlexportError(f"--base '{base}' could not be loaded as LLaVA ({first}); if a weights file is damaged, "
                            "download or save the model again") from None
    return model.eval()


def fingerprint(base: Path) -> str:
    """sha256 over config.json and every weight file, so any changed tensor changes it."""

    base = Path(base)
    h = hashlib.sha256((base / "config.json").read_bytes())
    for f in sorted(base.glob("*.safetensors")):
        h.update(f.name.encode() + sha256_file(f).encode())
    return h.hexdigest()

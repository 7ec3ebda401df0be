"""Map the key layouts adapters are saved in onto the parameter names of transformers 5's LLaVA.

Layouts seen in the wild (../shared/notes/adapter-formats.md):
  transformers < 4.52    language_model.model.layers..., vision_tower.vision_model..., language_model.lm_head
  transformers 4.52-4.57 model.language_model..., model.vision_tower.vision_model...
  transformers 5.x       model.language_model..., model.vision_tower.encoder..., lm_head
  original LLaVA repo    model.layers..., model.mm_projector.{0,2}, model.vision_tower.vision_tower.vision_model...
"""

from __future__ import annotations

PEFT_PREFIX = "base_model.model."

# Ordered: the first matching prefix wins.
_PREFIX_RULES: list[tuple[str, str]] = [
    # transformers < 4.52
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    # transformers 4.52-4.57
    ("model.vision_tower.vision_model.", "model.vision_tower."),
    # original LLaVA repo
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.layers.", "model.language_model.layers."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.norm.", "model.language_model.norm."),
]


def normalize_key(key: str) -> str:
    """A saved key in any known layout -> the transformers 5 name (without PEFT's wrapper prefix)."""
    if key.startswith(PEFT_PREFIX):
        key = key[len(PEFT_PREFIX) :]
    for old, new in _PREFIX_RULES:
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def part_of(name: str) -> str:
    """Which exported part a parameter or module lives in."""
    if name.startswith("model.vision_tower.") or name.startswith("model.multi_modal_projector."):
        return "vision"
    if name.startswith("model.language_model.embed_tokens"):
        return "embed"
    return "decoder"


def text_layer_index(name: str) -> int | None:
    """N for a name inside model.language_model.layers.N, else None."""
    prefix = "model.language_model.layers."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix) :].split(".", 1)[0])


def keeps_text_layer(name: str, num_layers: int) -> bool:
    index = text_layer_index(name)
    return index is None or index < num_layers

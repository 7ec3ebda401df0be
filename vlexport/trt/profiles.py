"""Optimization profiles (min/opt/max per input) for each part, from the target's shape ranges.

The decoder gets two profiles, as TensorRT Edge-LLM builds them: context (prefill: many tokens, empty cache) and
generation (one token, cache up to the context length). Shapes use the symbolic dimension names of the exported
parts; a dimension with another name is an error, so a changed export cannot silently fall outside the profiles.
"""

from __future__ import annotations

from ..errors import VlexportError

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]  # input name -> (min, opt, max)


def dimension_ranges(part: str, phase: str, shapes: dict, num_image_tokens: int) -> dict[str, tuple[int, int, int]]:
    """Symbolic dimension name -> (min, opt, max) for one part and phase ('context' or 'generation')."""
    # Bottleneck slot width and LoRA slot rank: 0 (no adapter) up to the widest the profile allows (target
    # shapes.adapter_width, shapes.lora_rank), tuned for a typical one. Slot rows are the batch (lora_slots.py).
    max_width = int(shapes.get("adapter_width", 256))
    max_rank = int(shapes.get("lora_rank", 64))
    width = {f"{part}_adapter_width": (0, min(64, max_width), max_width),
             f"{part}_lora_rank": (0, min(16, max_rank), max_rank)}
    return {**width, **_ranges(part, phase, shapes, num_image_tokens)}


def _ranges(part: str, phase: str, shapes: dict, num_image_tokens: int) -> dict[str, tuple[int, int, int]]:
    batch = tuple(shapes["batch"])
    images = tuple(b * i for b, i in zip(shapes["batch"], shapes["images"]))
    prompt = tuple(shapes["prompt_tokens"])
    context = shapes["context"]
    if part == "vision":
        return {"num_images": images}
    if phase == "context":
        feats = (0, images[1] * num_image_tokens, images[2] * num_image_tokens)
        return {"batch": batch, "sequence": prompt, "num_image_features": feats,
                "past_sequence": (0, 0, 0), "total_sequence": prompt}
    opt_past = min(context - 1, prompt[1] + 64)
    return {"batch": batch, "sequence": (1, 1, 1), "num_image_features": (0, 0, 0),
            "past_sequence": (1, opt_past, context - 1), "total_sequence": (2, opt_past + 1, context)}


def part_profiles(part: str, inputs: list[dict], shapes: dict, num_image_tokens: int) -> list[Profile]:
    """Profiles for one part, given its manifest inputs ({'name','dtype','shape'} with symbolic dims)."""
    phases = ["context"] if part == "vision" else ["context", "generation"]
    profiles = []
    for phase in phases:
        dims = dimension_ranges(part, phase, shapes, num_image_tokens)
        profile: Profile = {}
        for spec in inputs:
            mins, opts, maxs = [], [], []
            for d in spec["shape"]:
                if isinstance(d, str):
                    if d not in dims:
                        raise VlexportError(
                            f"part '{part}' input '{spec['name']}' has a dimension '{d}' that no optimization profile "
                            "covers; re-export the bundle with this vlexport version"
                        )
                    lo, mid, hi = dims[d]
                else:
                    lo = mid = hi = int(d)
                mins.append(lo), opts.append(mid), maxs.append(hi)
            profile[spec["name"]] = (tuple(mins), tuple(opts), tuple(maxs))
        profiles.append(profile)
    return profiles


def bundle_profiles(manifest: dict, shapes: dict) -> dict[str, list[Profile]]:
    n_tokens = manifest["model"]["num_image_tokens"]
    return {name: part_profiles(name, part["inputs"], shapes, n_tokens) for name, part in manifest["parts"].items()}

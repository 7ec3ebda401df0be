"""LoRA slots: the graph inputs through which a task's LoRA is fed at run time, over one base graph (no torch here).

A part (vision: tower + projector; decoder: layers + lm_head) has one group per linear some task's LoRA targets, named
after the module with its layer index dropped ("layers.self_attn.q_proj", "lm_head", "projector.linear_1"). A
group stacks its layers (1 for lm_head and the projector) and feeds, per group:
  a [L, N, in, r]    = lora_A^T
  b [L, N, r, out]   = (scaling * lora_B)^T  (scaling, rsLoRA and rank/alpha patterns folded in at build)
  scale [L, N, out]  = DoRA's m / ||W + s B A|| per output (only in groups some task trains with DoRA; 1 elsewhere)
  in_scale [L, N, in]   = IA3's feedforward vector, on the linear's input (only in groups some task's IA3 puts one)
  out_scale [L, N, out] = IA3's vector on the linear's output, bias included, as PEFT scales base_layer(x)
and the graph computes, with x' = x * in_scale, y = ((x' W^T + (x' a) b) * scale + bias) * out_scale ("no adapter":
rank 0, every scale 1). PEFT's VeRA (a = A^T diag(lambda_d), b = B^T diag(lambda_b)) and AdaLoRA after its final
rank allocation (a = (diag(E) A)^T, b = (scaling / ranknum * B)^T) feed a and b as a LoRA does
(adapters/peft_methods.py). The rank r is a dynamic dimension (0 = no adapter), one per part: every group of a feed
has the same r (one_rank), and a task whose ranks differ across layers or modules is zero-padded to its largest,
which adds exactly nothing. N is the batch's row count (row i uses its own adapter: mixed batches); the ORT-native
decoder also takes N = 1 (every row the same), broadcast by MatMul, where the portable graphs exported by torch need
the rows repeated (export/onnx.py).
"""

from __future__ import annotations

import re

import numpy as np

from . import slots

FIELDS = ("a", "b", "scale", "in_scale", "out_scale")
# Fields a group has only where some task needs them; the group's geometry flag of the same name says so.
OPTIONAL = ("scale", "in_scale", "out_scale")

# transformers 5 module name -> (part, group, layer index): the linears a LoRA slot can sit on.
_PATTERNS = (
    (re.compile(r"^model\.language_model\.layers\.(\d+)\.(.+)$"), "decoder", "layers.{}"),
    (re.compile(r"^lm_head$"), "decoder", "lm_head"),
    (re.compile(r"^model\.vision_tower\.encoder\.layers\.(\d+)\.(.+)$"), "vision", "layers.{}"),
    (re.compile(r"^model\.multi_modal_projector\.(.+)$"), "vision", "projector.{}"),
)


def locate(module: str) -> tuple[str, str, int] | None:
    """(part, group, layer) of a transformers 5 module name a slot can serve, or None."""
    for pattern, part, group in _PATTERNS:
        m = pattern.match(module)
        if not m:
            continue
        if group == "lm_head":
            return part, group, 0
        if group.startswith("projector"):
            return part, group.format(m.group(1)), 0
        return part, group.format(m.group(2)), int(m.group(1))
    return None


def input_names(part: str, group: str, spec) -> list[str]:
    """The group's inputs; spec is its geometry (the OPTIONAL flags; a manifest written before in_scale/out_scale
    lacks them: absent = False), or a bool, DoRA's scale alone."""
    flags = {"scale": spec} if isinstance(spec, bool) else spec
    return [f"{part}_lora.{group}.{f}" for f in FIELDS if f not in OPTIONAL or flags.get(f)]


def part_input_names(geometry: dict, part: str) -> list[str]:
    """Every LoRA input of a part, in graph order (groups sorted by name)."""
    groups = geometry.get(part) or {}
    return [n for g in sorted(groups) for n in input_names(part, g, groups[g])]


def _scale_dims(g: dict) -> dict[str, int]:
    """{optional field: its width} for the optional fields the group has."""
    return {f: g["in"] if f == "in_scale" else g["out"] for f in OPTIONAL if g.get(f)}


def empty_feed(geometry: dict, part: str) -> dict[str, np.ndarray]:
    """The feed meaning "no LoRA": rank 0, unit scale, one row shared by the batch."""
    feed = {}
    for group, g in (geometry.get(part) or {}).items():
        layers, dim_in, dim_out = g["layers"], g["in"], g["out"]
        feed[f"{part}_lora.{group}.a"] = np.zeros((layers, 1, dim_in, 0), np.float32)
        feed[f"{part}_lora.{group}.b"] = np.zeros((layers, 1, 0, dim_out), np.float32)
        for f, width in _scale_dims(g).items():
            feed[f"{part}_lora.{group}.{f}"] = np.ones((layers, 1, width), np.float32)
    return feed


def no_adapter_feed(bottleneck: dict, lora: dict, part: str) -> dict[str, np.ndarray]:
    """Every slot input of a part (bottleneck geometry per slots.py, then LoRA groups) meaning "no adapter", one
    row; {} for a part without slots. The manifest's "slots" and "lora_slots" are these geometries."""
    feed = {}
    if part in (bottleneck or {}):
        feed.update(slots.empty_feed(part, bottleneck[part]["layers"], bottleneck[part]["dim"]))
    return {**feed, **empty_feed(lora or {}, part)}


def repeat_rows(feed: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """A one-row slot feed repeated for `rows` batch rows (the portable graphs take one row per batch row)."""
    if rows == 1:
        return feed
    _, row_axes = slot_axes(feed)
    return {k: np.repeat(v, rows, axis=row_axes[k]) if v.shape[row_axes[k]] == 1 else v for k, v in feed.items()}


def rank_axis(name: str) -> int | None:
    """The axis of an input that is the adapter's width (LoRA rank, bottleneck width), padded when rows stack."""
    if name.endswith(".a"):
        return 3
    if name.endswith(".b"):
        return 2
    return None


def one_rank(feed: dict) -> dict:
    """The feed with every LoRA group at the same rank, the largest among them (zero-padded: exact). A part's
    groups share one symbolic rank dimension, which ONNX Runtime's memory planner takes as one size; packs keep
    each group at its own rank, so the padding exists only at run time."""
    ranks = [v.shape[rank_axis(k)] for k, v in feed.items() if "_lora." in k and rank_axis(k) is not None]
    if not ranks or min(ranks) == max(ranks):
        return feed
    width = max(ranks)
    return {k: _pad_axis(v, rank_axis(k), width) if "_lora." in k and rank_axis(k) is not None else v
            for k, v in feed.items()}


def slot_axes(feed: dict) -> tuple[dict, dict]:
    """(width axis or None, row axis) of each slot input of a feed, bottleneck (slots.py) and LoRA alike."""
    widths = {k: rank_axis(k) if "_lora." in k else slots.width_axis(k) for k in feed}
    return widths, {k: 1 if "_lora." in k else slots.ROW_AXIS for k in feed}


def stack_rows(feeds: list[dict[str, np.ndarray]], rank_axes: dict[str, int | None], row_axes: dict[str, int]
               ) -> dict[str, np.ndarray]:
    """One feed for a mixed batch: row i of the result is feeds[i] (each with one row), widths zero-padded to the
    largest so that padding contributes exactly nothing. rank_axes/row_axes: per input name, the width axis (or
    None) and the row axis."""
    if len(feeds) == 1:
        return feeds[0]
    out = {}
    for name in feeds[0]:
        arrays = [f[name] for f in feeds]
        axis = rank_axes.get(name)
        if axis is not None:
            width = max(a.shape[axis] for a in arrays)
            arrays = [_pad_axis(a, axis, width) for a in arrays]
        out[name] = np.ascontiguousarray(np.concatenate(arrays, axis=row_axes[name]))
    return out


def _pad_axis(a: np.ndarray, axis: int, width: int) -> np.ndarray:
    n = width - a.shape[axis]
    if n == 0:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, n)
    return np.pad(a, pad)


def sample_feed(geometry: dict, part: str, rank: int, rng: np.random.Generator, rows: int = 1
                ) -> dict[str, np.ndarray]:
    """Random LoRA slot weights (export checks): `rows` rows of rank `rank`, scales near 1."""
    feed = {}
    for group, g in (geometry.get(part) or {}).items():
        layers, dim_in, dim_out = g["layers"], g["in"], g["out"]
        feed[f"{part}_lora.{group}.a"] = (0.1 * rng.standard_normal((layers, rows, dim_in, rank))).astype(np.float32)
        feed[f"{part}_lora.{group}.b"] = (0.1 * rng.standard_normal((layers, rows, rank, dim_out))).astype(np.float32)
        for f, width in _scale_dims(g).items():
            feed[f"{part}_lora.{group}.{f}"] = (1 + 0.1 * rng.standard_normal((layers, rows, width))).astype(np.float32)
    return feed

"""Export each part with torch.onnx.export(dynamo=True), then check ONNX Runtime against torch at once.

The dynamo exporter is measured faster on ONNX Runtime than the TorchScript one (../shared/notes/onnxruntime-cpu.md).
Sample shapes for export and for the check differ on purpose, so a dimension that was wrongly specialised fails here.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ParityError
from ..model import LlavaFacts
from .. import lora_slots, slots
from ..anyres import pack_plan
from .parts import DecoderPart, EmbedPart, decoder_io_names, slot_input_names, vision_part

OPSET = 18  # TensorRT 10.3 imports opsets up to 20; 18 keeps attention and norms decomposed into plain ops.


@dataclass
class PartSpec:
    name: str
    module: object
    input_names: list[str]
    output_names: list[str]
    export_args: tuple
    dynamic_shapes: tuple
    check_args: list[tuple]  # further input sets to compare ORT against torch on


def part_specs(model, facts: LlavaFacts, slot_parts: frozenset = frozenset(), lora: dict | None = None
               ) -> list[PartSpec]:
    """slot_parts ('vision', 'decoder') get bottleneck adapter slot inputs; `lora` (lora_slots geometry per part)
    LoRA slot inputs after them."""
    import torch
    from torch.export import Dim

    g = torch.Generator().manual_seed(0)

    rng = np.random.default_rng(0)

    def adapter_args(part, layers, dim, rows, variant, bottleneck, lora_geometry):
        """Slot tensors for one call, one row per batch row (the portable graphs' row axis is the batch: see
        adapter_dims): bottleneck fields (if the part has them), then LoRA inputs. Variants: 0 = per-row widths
        and ranks, 1 = no adapter, 2 = other mixes and activations."""
        feeds = []
        if bottleneck:
            if variant == 0:
                per_row = [slots.sample_feed(part, layers, dim, 3 + r % 2, rng, mix=(0.0, 1.0, 2.0), act=1)
                           for r in range(rows)]
            elif variant == 1:
                per_row = [slots.empty_feed(part, layers, dim)] * rows
            else:
                per_row = [slots.sample_feed(part, layers, dim, 5, rng, mix=(1.0, 0.0, 4.0), act=2)] * rows
            feeds.append(lora_slots.stack_rows(per_row, *lora_slots.slot_axes(per_row[0])))
        if lora_geometry:
            geometry = {part: lora_geometry}
            if variant == 0:
                per_row = [lora_slots.sample_feed(geometry, part, 4 + 2 * (r % 2), rng) for r in range(rows)]
            elif variant == 1:
                per_row = [lora_slots.empty_feed(geometry, part)] * rows
            else:
                per_row = [lora_slots.sample_feed(geometry, part, 3, rng)] * rows
            feeds.append(lora_slots.stack_rows(per_row, *lora_slots.slot_axes(per_row[0])))
        return tuple(torch.from_numpy(v) for f in feeds for v in f.values())

    def adapter_dims(part, rows_dim, bottleneck, lora_geometry):
        """dynamic_shapes of the slot inputs: the row axis is the part's batch dimension, widths and ranks dynamic.
        torch.export ties a broadcast axis to the one it meets, and the shape arithmetic it emits for the batched
        products then needs the two equal: a portable graph takes one row of slot inputs per batch row (the
        runtime repeats a shared row), where the ORT-native decoder also broadcasts one row."""
        dims = []
        if bottleneck:
            width = Dim(f"{part}_adapter_width", min=0)
            dims += [{2: rows_dim, 3: width}, {2: rows_dim, 3: width}, {2: rows_dim, 4: width}, {2: rows_dim},
                     {2: rows_dim}, {2: rows_dim}]
        if lora_geometry:
            rank = Dim(f"{part}_lora_rank", min=0)
            for name in lora_slots.part_input_names({part: lora_geometry}, part):
                axis = lora_slots.rank_axis(name)
                dims.append({1: rows_dim, axis: rank} if axis is not None else {1: rows_dim})
        return dims

    S, H, T = facts.image_size, facts.hidden_size, facts.num_image_tokens
    L, kv, hd = facts.num_layers, facts.num_kv_heads, facts.head_dim

    def pixels(n):
        return torch.randn(n, 3, S, S, generator=g)

    def ids(b, s, n_image):
        x = torch.randint(0, facts.vocab_size, (b, s), generator=g)
        x[x == facts.image_token_id] = 0
        x[0, 2 : 2 + n_image] = facts.image_token_id
        return x

    def feats(n):
        return torch.randn(n, H, generator=g)

    def dec_args(b, s, p, pad=0):
        mask = torch.ones(b, p + s, dtype=torch.long)
        if pad:
            mask[-1, :pad] = 0
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, p:]
        past = [torch.randn(b, kv, p, hd, generator=g) for _ in range(2 * L)]
        return (torch.randn(b, s, H, generator=g), mask, pos, *past)

    batch = Dim("batch")
    num_images = Dim("num_images")
    seq = Dim("sequence")
    n_feat = Dim("num_image_features", min=0)
    total = Dim("total_sequence")
    past = Dim("past_sequence", min=0)
    dec_in, dec_out = decoder_io_names(L, "decoder" in slot_parts, (lora or {}).get("decoder"))
    vision = vision_part(model, "vision" in slot_parts, (lora or {}).get("vision"))
    if facts.anyres is None:
        vision_specs = PartSpec(
            "vision", vision, ["pixel_values"], ["image_features"],
            (pixels(2),), ({0: num_images},), [(pixels(1),), (pixels(3),)],
        )
    else:  # LLaVA-NeXT: tiles of images of other aspect ratios, with their pack plans (AnyResVisionPart)
        n_packed = Dim("num_packed_features")

        def tiles(image_size):
            index, weight = pack_plan(image_size, facts.anyres)
            return (pixels(facts.anyres.num_tiles(image_size)), torch.from_numpy(index), torch.from_numpy(weight))

        sizes = _anyres_sample_sizes(facts.anyres)
        vision_specs = PartSpec(
            "vision", vision, ["pixel_values", "pack_index", "pack_weight"], ["image_features"],
            tiles(sizes[0]), ({0: num_images}, {0: n_packed}, {0: n_packed}), [tiles(s) for s in sizes[1:]],
        )
    decoder_specs = PartSpec(
        "decoder", DecoderPart(model, "decoder" in slot_parts, (lora or {}).get("decoder")), dec_in, dec_out,
        dec_args(2, 5, 3), ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, tuple({0: batch, 2: past} for _ in range(2 * L))),
        [dec_args(1, 9, 0), dec_args(1, 1, 12), dec_args(2, 6, 0, pad=2), dec_args(3, 1, 7, pad=1)],
    )
    # Each part with adapter slots: exported with one row per batch row; checked with per-row, empty and broadcast
    # slots (SeqBn/Houlsby/ParBn mixes, other activations, width 0, rank 0).
    lora = lora or {}
    for spec, layers, dim, rows_dim in ((vision_specs, len(vision.layers), model.config.vision_config.hidden_size,
                                         num_images), (decoder_specs, L, H, batch)):
        bottleneck, geometry = spec.name in slot_parts, lora.get(spec.name)
        if not bottleneck and not geometry:
            continue
        if spec.name == "vision":  # decoder_io_names already lists the decoder's
            spec.input_names = (spec.input_names + (slot_input_names(spec.name) if bottleneck else [])
                                + lora_slots.part_input_names(lora, spec.name))

        def rows_of(args):
            return args[0].shape[0]

        spec.export_args = (*spec.export_args,
                            *adapter_args(spec.name, layers, dim, rows_of(spec.export_args), 0, bottleneck, geometry))
        extra = adapter_dims(spec.name, rows_dim, bottleneck, geometry)
        if spec.name == "vision":  # forward(pixel_values[, pack_index, pack_weight], *inputs): varargs nest
            spec.dynamic_shapes = (*spec.dynamic_shapes, tuple(extra))
        else:  # the decoder's *inputs holds past key/values then the slot inputs
            spec.dynamic_shapes = (*spec.dynamic_shapes[:3], (*spec.dynamic_shapes[3], *extra))
        spec.check_args = [(*args, *adapter_args(spec.name, layers, dim, rows_of(args), i % 3, bottleneck, geometry))
                           for i, args in enumerate(spec.check_args)]
    return [
        vision_specs,
        PartSpec(
            "embed", EmbedPart(model), ["input_ids", "image_features"], ["inputs_embeds"],
            (ids(2, T + 7, T), feats(T)), ({0: batch, 1: seq}, {0: n_feat}),
            [(ids(1, T + 4, T), feats(T)), (ids(1, 1, 0), feats(0)), (ids(3, 2, 0), feats(0))],
        ),
        decoder_specs,
    ]


def _anyres_sample_sizes(geometry) -> list[tuple[int, int]]:
    """Image sizes (height, width) for the export and its checks: the largest grid first, then a wide and a tall
    one where the pinpoints give them, each with padding to unpad (so the pack plans differ in length)."""
    t = geometry.tile
    by_tiles = sorted(geometry.grid_pinpoints, key=lambda hw: -hw[0] * hw[1])
    wide = max(geometry.grid_pinpoints, key=lambda hw: hw[1] / hw[0])
    tall = max(geometry.grid_pinpoints, key=lambda hw: hw[0] / hw[1])
    out = []
    for h, w in (by_tiles[0], wide, tall):
        size = (max(1, h - t // 3), w) if w >= h else (h, max(1, w - t // 3))
        if size not in out:
            out.append(size)
    return out if len(out) > 1 else out + [(geometry.tile, geometry.tile)]


def export_part(spec: PartSpec, out_path: Path) -> Path:
    """Write spec's module to out_path (+ external data beside it)."""
    import torch

    out_path.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            spec.module,
            spec.export_args,
            str(out_path),
            dynamo=True,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=spec.dynamic_shapes,
            opset_version=OPSET,
            optimize=True,
            external_data=True,
            verbose=False,
        )
    forget_matched_graphs()
    return out_path


def forget_matched_graphs() -> None:
    """Drop the exported graph that onnxscript's rewriter keeps after torch.onnx.export returns.

    Its default rewrite rules are module globals, and each rule's matcher holds the last graph it matched, with
    every weight the optimizer folded (a 7B decoder's transposed matrices, 13 GB). A build would then verify beside
    a second copy of the model. tests/test_scale.py checks that no exported weight outlives the export."""
    import gc

    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript layout: the test above says whether it still leaks
        return
    for matcher in [o for o in gc.get_objects() if isinstance(o, SimplePatternMatcher)]:
        for attribute in ("_graph", "_current_node", "_match"):
            if hasattr(matcher, attribute):
                setattr(matcher, attribute, None)
    gc.collect()


def add_slot_defaults(onnx_path: Path, empty: dict) -> None:
    """Give the part's adapter slot inputs default values (`empty`: "no adapter"), making them optional inputs.

    An ONNX graph input that also has an initializer of the same name may be left out of a feed. Hosts that know
    nothing of adapters (onnxruntime-genai without an adapter loaded, a plain C++ app) then run the base model."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path), load_external_data=False)
    for name, value in empty.items():
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    onnx.save(model, str(onnx_path))


def check_part(spec: PartSpec, onnx_path: Path, rel_tol: float, first_layers: int | None = None) -> dict:
    """Run ONNX Runtime and torch on the check inputs; raise ParityError naming the part and output if they differ.

    An output passes when max|ort - torch| <= rel_tol * max(1, max|torch|). first_layers=N (decoder only) compares
    the K/V outputs of the first N layers, on a graph cut to them, so that a decoder too large to hold twice (the
    torch model and an ONNX Runtime session) is still checked.
    """
    import onnxruntime as ort
    import torch

    module, output_names = spec.module, spec.output_names
    if first_layers is None:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    else:
        from ..parity.layers import first_layers_session

        session = first_layers_session(onnx_path, first_layers)
        module = spec.module.first_layers(first_layers)
        output_names = [o.name for o in session.get_outputs()]

    def module_args(args):  # the cut module takes its own layers' past K/V only
        if first_layers is None:
            return args
        return (*args[: 3 + 2 * first_layers], *args[3 + 2 * spec.module.num_layers :])

    # Slot inputs with defaults (add_slot_defaults) are overridable initializers, not listed by get_inputs().
    session_inputs = {i.name for i in [*session.get_inputs(), *session.get_overridable_initializers()]}
    worst: dict[str, float] = {}
    for args in spec.check_args:
        with torch.no_grad():
            expected = module(*module_args(args))
        expected = dict(zip(spec.output_names, expected if isinstance(expected, tuple) else (expected,)))
        feed = {name: t.numpy() for name, t in zip(spec.input_names, args) if name in session_inputs}
        got = session.run(output_names, feed)
        for name, o in zip(output_names, got):
            e = expected[name].numpy()
            if e.shape != o.shape:
                raise ParityError(
                    f"export check failed: part '{spec.name}' output '{name}' has shape {o.shape} in ONNX Runtime "
                    f"but {e.shape} in torch (inputs {[tuple(a.shape) for a in args]})"
                )
            err = float(np.abs(e - o).max()) / max(1.0, float(np.abs(e).max())) if e.size else 0.0
            worst[name] = max(worst.get(name, 0.0), err)
            if not err <= rel_tol:
                raise ParityError(
                    f"export check failed: part '{spec.name}' output '{name}' differs from torch by {err:.3g} "
                    f"(relative to its scale; allowed {rel_tol:g}) for inputs {[tuple(a.shape) for a in args]}"
                )
    return {"outputs_checked": len(worst), "max_rel_error": max(worst.values()) if worst else 0.0}

"""Adapter banks: `--adapter NAME=PATH` makes task NAME; unnamed adapters apply to every task.

LoRA and BitFit without a name merge into the one base graph. Adapters fed at run time become a task's pack:
`packs/<task>.safetensors`, selected per request, so switching tasks never touches the base. They are prefix
tuning, bottleneck adapters (slots.py) and, with --lora-mode swappable (the default), a named task's LoRA, IA3, VeRA
or AdaLoRA (lora_slots.py). A LoRA or PEFT method no slot can serve (slot_reason), a named BitFit, and every LoRA/PEFT
adapter of a task whose adapters would not compose in the slots are merged into copies of the parts they change, for
that task alone. An unnamed run-time adapter becomes the task 'default', which the runtime uses when no task is asked
for.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .adapters import MERGEABLE, load_adapter
from .errors import VlexportError

DEFAULT_TASK = "default"
_TASK_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


def parse_adapter_specs(specs: list[str | Path]) -> list[tuple[str | None, Path]]:
    """'PATH' or 'NAME=PATH' -> (name or None, path). A path that exists as given is never split."""
    out = []
    for spec in specs:
        text = str(spec)
        name, sep, rest = text.partition("=")
        if sep and not Path(text).exists() and _TASK_NAME.match(name):
            out.append((name, Path(rest)))
        elif sep and not Path(text).exists():
            raise VlexportError(f"--adapter '{text}': task names start with a letter and hold letters, digits, '_' or '-'")
        else:
            out.append((None, Path(text)))
    return out


LORA_MODES = ("swappable", "merged")


def load_bank(specs: list[str | Path], adapter_kind: str | None = None, lora_alpha: float | None = None,
              lora_mode: str = "swappable", log=None) -> tuple[list, dict]:
    """(adapters merged into the base, {task: [run-time adapters]}). lora_alpha: for single-file LoRAs that do not
    record their alpha (--lora-alpha). lora_mode: a named task's LoRA is fed through slots (swappable) or merged
    into copies of its parts (merged)."""
    if lora_mode not in LORA_MODES:
        raise VlexportError(f"--lora-mode {lora_mode!r}: use swappable (one base graph, LoRA fed per request) or "
                            "merged (a copy of the changed parts per task)")
    merged, tasks = [], {}
    for name, path in parse_adapter_specs(specs):
        adapter = load_adapter(path, adapter_kind, lora_alpha=lora_alpha)
        if adapter.kind in MERGEABLE and name is None:
            merged.append(adapter)
            continue
        if adapter.kind in ("lora", "peft") and lora_mode == "swappable":
            reason = adapter.slot_reason()
            adapter.swappable = reason is None
            if reason and log:
                what = "LoRA" if adapter.kind == "lora" else adapter.type_name
                log(f"task {name}: {what} '{path}' is merged into copies of its parts ({reason})")
        tasks.setdefault(name or DEFAULT_TASK, []).append(adapter)
    for name, adapters in tasks.items():
        _merge_if_not_composable(name, adapters, log)
        prefixes = [a for a in adapters if a.kind == "prefix"]
        if len(prefixes) > 1:
            raise VlexportError(f"task '{name}' has {len(prefixes)} prefix adapters; a task takes one prefix")
        parts = [a.part for a in adapters if a.kind == "bottleneck"]
        for part in set(parts):
            if parts.count(part) > 1:
                raise VlexportError(f"task '{name}' has {parts.count(part)} bottleneck adapters for the {part} tower; "
                                    "a task takes one per tower")
    return merged, tasks


def _merge_if_not_composable(name: str, adapters: list, log) -> None:
    """A task's LoRA/PEFT adapters apply in the order given (the reference nests them so). Slots sum the additive
    ones (LoRA, VeRA, AdaLoRA: any order gives the same sum); IA3 and DoRA scale, and a merged adapter sits under
    every slot whatever its place, so a task holding a PEFT method next to other LoRA/PEFT adapters, one of them IA3,
    DoRA or merged, is merged whole, in order. (Several LoRAs alone with a DoRA among them stay refused by
    lora_packs, as before.)"""
    weights = [a for a in adapters if a.kind in ("lora", "peft")]
    if len(weights) < 2 or not any(a.kind == "peft" for a in weights) or not any(a.swappable for a in weights):
        return
    if all(a.swappable and (a.additive if a.kind == "peft" else not a.describe()["dora"]) for a in weights):
        return
    for a in weights:
        a.swappable = False
    if log:
        log(f"task {name}: its {len(weights)} LoRA/PEFT adapters are merged into copies of its parts (IA3, or an "
            "adapter with no slot form, does not compose with the others in slots, nor does a DoRA)")


def slot_geometry(tasks: dict, facts, vision_layers: int, vision_dim: int) -> dict:
    """{part: {layers, dim}} for each part some task puts a bottleneck adapter in."""
    parts = {a.part for adapters in tasks.values() for a in adapters if a.kind == "bottleneck"}
    geometry = {"vision": (vision_layers, vision_dim), "decoder": (facts.num_layers, facts.hidden_size)}
    from .slots import ACTIVATIONS, input_names

    return {p: {"layers": geometry[p][0], "dim": geometry[p][1], "activations": len(ACTIVATIONS),
                "inputs": input_names(p)} for p in sorted(parts)}


def merged_here(adapter) -> bool:
    """Whether the adapter is merged (into the base, or into its task's copies of the parts), not fed at run time."""
    return adapter.kind in MERGEABLE and not getattr(adapter, "swappable", False)


def lora_geometry(tasks: dict, model, layers: dict) -> dict:
    """lora_slots geometry {part: {group: {layers, in, out, scale[, in_scale, out_scale]}}}: every group some task's
    swappable LoRA or PEFT method feeds. layers: {part: layer count} of the part's stacked groups (the CLIP layers
    the vision part runs). in_scale/out_scale appear only in a part where some task's IA3 feeds them, so a LoRA-only
    bank keeps its geometry and inputs as before."""
    from .lora_slots import OPTIONAL

    geometry: dict = {}
    for adapters in tasks.values():
        for a in adapters:
            if not getattr(a, "swappable", False):
                continue
            for part, groups in a.slot_groups(model).items():
                for group, spec in groups.items():
                    have = geometry.setdefault(part, {}).setdefault(
                        group, {"in": spec["in"], "out": spec["out"], "scale": False,
                                "layers": layers[part] if group.startswith("layers.") else 1})
                    for flag in OPTIONAL:
                        if spec.get(flag) or have.get(flag):
                            have[flag] = True
    return {part: dict(sorted(groups.items())) for part, groups in sorted(geometry.items())}


def lora_packs(tasks: dict, model, geometry: dict) -> dict:
    """{task: LoRA slot tensors} for the tasks with a swappable LoRA or PEFT method (several on one task add up:
    their ranks concatenate, which is their sum exactly; DoRA's scale does not compose, so one DoRA LoRA per task,
    and an IA3 is alone on its task: load_bank merges it otherwise)."""
    from .lora_slots import rank_axis

    packs = {}
    for name, adapters in tasks.items():
        loras = [a for a in adapters if getattr(a, "swappable", False)]
        if not loras:
            continue
        if len(loras) > 1 and any(a.describe().get("dora") for a in loras):
            raise VlexportError(f"task '{name}' has {len(loras)} LoRAs and one of them is a DoRA: DoRA's magnitude "
                                "does not compose with another LoRA on the same task; give each its own task")
        tensors: dict = {}
        for a in loras:
            for key, value in a.slot_tensors(model, geometry).items():
                if key in tensors and rank_axis(key) is not None:
                    value = np.concatenate([tensors[key], value], axis=rank_axis(key))
                tensors[key] = value
        packs[name] = tensors
    return packs


def rescale_lora_packs(packs: dict, scales: dict) -> None:
    """In place: for {module name: (input scale or None, output scale or None)} of linears whose input became
    x / s_in and output y / s_out, each task's LoRA there becomes a * s_in (per input channel) and b / s_out."""
    from .lora_slots import locate

    for tensors in packs.values():
        for module, (s_in, s_out) in scales.items():
            where = locate(module)
            if where is None:
                continue
            part, group, layer = where
            a, b = tensors.get(f"{part}_lora.{group}.a"), tensors.get(f"{part}_lora.{group}.b")
            if a is None or layer >= a.shape[0]:
                continue
            if s_in is not None:
                a[layer] *= np.asarray(s_in, np.float32)[None, :, None]
            if s_out is not None:
                b[layer] /= np.asarray(s_out, np.float32)[None, None, :]


def task_tensors(adapters: list, facts, slots: dict) -> dict:
    """Everything a task feeds at run time but its LoRA (lora_packs): prefix keys/values, bottleneck slot weights."""
    tensors = {}
    for a in adapters:
        if a.kind == "prefix":
            tensors.update(a.key_values(facts.num_layers, facts.num_kv_heads, facts.head_dim))
        elif a.kind == "bottleneck":
            tensors.update(a.slot_feed(slots[a.part]["layers"], slots[a.part]["dim"]))
    return tensors


def _part_bytes(bundle_dir: Path, onnx_file: str) -> int:
    """An exported part's size on disk: the graph and its external data."""
    path = bundle_dir / onnx_file
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))


def merged_parts(adapters: list) -> list[str]:
    """The parts a task's own merged LoRA/BitFit changes (exported again, merged, for that task)."""
    parts = set()
    for a in adapters:
        if merged_here(a):
            parts.update(a.describe()["parts"])
    return sorted(parts)


def write_packs(bundle_dir: Path, tasks: dict, facts, slots: dict, task_parts: dict, lora: dict | None = None
                ) -> dict:
    """Write each task's pack; return the manifest's 'tasks' entry (with the task's own merged parts, if any).
    lora: lora_packs' tensors per task."""
    from safetensors.numpy import save_file

    out = {}
    (bundle_dir / "packs").mkdir(exist_ok=True)
    for name, adapters in tasks.items():
        tensors = {**task_tensors(adapters, facts, slots), **(lora or {}).get(name, {})}
        rel = f"packs/{name}.safetensors"
        save_file(tensors, str(bundle_dir / rel))
        (bundle_dir / rel).chmod(0o644)  # safetensors writes 0600: a server run by another user must read it
        prefix = next((a for a in adapters if a.kind == "prefix"), None)
        out[name] = {
            "pack": rel,
            "parts": task_parts.get(name, {}),
            "parts_bytes": sum(_part_bytes(bundle_dir, f) for f in task_parts.get(name, {}).values()),
            "adapters": [a.describe() for a in adapters],
            "prefix_tokens": prefix.num_tokens if prefix else 0,
            "position_offset": prefix.position_offset if prefix else 0,
            "bottleneck_parts": sorted(a.part for a in adapters if a.kind == "bottleneck"),
            "lora_parts": sorted({k.split("_lora.", 1)[0] for k in (lora or {}).get(name, {})}),
            "bytes": sum(t.nbytes for t in tensors.values()),
        }
    return out

"""Adapter banks: `--adapter NAME=PATH` makes task NAME; unnamed adapters apply to every task.

LoRA and BitFit without a name merge into the one base graph. Adapters fed at run time (prefix tuning today)
become a task's pack: `packs/<task>.safetensors`, selected per request, so switching tasks never touches the base.
An unnamed run-time adapter becomes the task 'default', which the runtime uses when no task is asked for.
"""

from __future__ import annotations

import re
from pathlib import Path

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


def load_bank(specs: list[str | Path], adapter_kind: str | None = None, lora_alpha: float | None = None) -> tuple[list, dict]:
    """(adapters merged into the base, {task: [run-time adapters]}). lora_alpha: for single-file LoRAs that do not
    record their alpha (--lora-alpha)."""
    merged, tasks = [], {}
    for name, path in parse_adapter_specs(specs):
        adapter = load_adapter(path, adapter_kind, lora_alpha=lora_alpha)
        if adapter.kind in MERGEABLE and name is None:
            merged.append(adapter)
        else:
            tasks.setdefault(name or DEFAULT_TASK, []).append(adapter)
    for name, adapters in tasks.items():
        prefixes = [a for a in adapters if a.kind == "prefix"]
        if len(prefixes) > 1:
            raise VlexportError(f"task '{name}' has {len(prefixes)} prefix adapters; a task takes one prefix")
        parts = [a.part for a in adapters if a.kind == "bottleneck"]
        for part in set(parts):
            if parts.count(part) > 1:
                raise VlexportError(f"task '{name}' has {parts.count(part)} bottleneck adapters for the {part} tower; "
                                    "a task takes one per tower")
    return merged, tasks


def slot_geometry(tasks: dict, facts, vision_layers: int, vision_dim: int) -> dict:
    """{part: {layers, dim}} for each part some task puts a bottleneck adapter in."""
    parts = {a.part for adapters in tasks.values() for a in adapters if a.kind == "bottleneck"}
    geometry = {"vision": (vision_layers, vision_dim), "decoder": (facts.num_layers, facts.hidden_size)}
    from .slots import ACTIVATIONS, input_names

    return {p: {"layers": geometry[p][0], "dim": geometry[p][1], "activations": len(ACTIVATIONS),
                "inputs": input_names(p)} for p in sorted(parts)}


def task_tensors(adapters: list, facts, slots: dict) -> dict:
    """Everything a task feeds at run time: prefix keys/values and bottleneck slot weights."""
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
    """The parts a task's own LoRA/BitFit changes (exported again, merged, for that task)."""
    parts = set()
    for a in adapters:
        if a.kind in MERGEABLE:
            parts.update(a.describe()["parts"])
    return sorted(parts)


def write_packs(bundle_dir: Path, tasks: dict, facts, slots: dict, task_parts: dict) -> dict:
    """Write each task's pack; return the manifest's 'tasks' entry (with the task's own merged parts, if any)."""
    from safetensors.numpy import save_file

    out = {}
    (bundle_dir / "packs").mkdir(exist_ok=True)
    for name, adapters in tasks.items():
        tensors = task_tensors(adapters, facts, slots)
        rel = f"packs/{name}.safetensors"
        save_file(tensors, str(bundle_dir / rel))
        prefix = next((a for a in adapters if a.kind == "prefix"), None)
        out[name] = {
            "pack": rel,
            "parts": task_parts.get(name, {}),
            "parts_bytes": sum(_part_bytes(bundle_dir, f) for f in task_parts.get(name, {}).values()),
            "adapters": [a.describe() for a in adapters],
            "prefix_tokens": prefix.num_tokens if prefix else 0,
            "position_offset": prefix.position_offset if prefix else 0,
            "bottleneck_parts": sorted(a.part for a in adapters if a.kind == "bottleneck"),
            "bytes": sum(t.nbytes for t in tensors.values()),
        }
    return out

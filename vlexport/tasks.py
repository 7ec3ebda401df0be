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


def load_bank(specs: list[str | Path], adapter_kind: str | None = None) -> tuple[list, dict]:
    """(adapters merged into the base, {task: [run-time adapters]})."""
    merged, tasks = [], {}
    for name, path in parse_adapter_specs(specs):
        adapter = load_adapter(path, adapter_kind)
        if adapter.kind in MERGEABLE:
            if name is not None:
                raise VlexportError(
                    f"--adapter {name}={path}: a {adapter.kind} adapter inside a task would need its own merged "
                    "graph or swappable LoRA inputs, which this version does not build yet; pass it without a task "
                    "name to merge it into the base for every task"
                )
            merged.append(adapter)
        else:
            tasks.setdefault(name or DEFAULT_TASK, []).append(adapter)
    for name, adapters in tasks.items():
        if len(adapters) > 1:
            raise VlexportError(f"task '{name}' has {len(adapters)} prefix adapters; a task takes one prefix")
    return merged, tasks


def write_packs(bundle_dir: Path, tasks: dict, facts) -> dict:
    """Write each task's pack; return the manifest's 'tasks' entry."""
    from safetensors.numpy import save_file

    out = {}
    (bundle_dir / "packs").mkdir(exist_ok=True)
    for name, adapters in tasks.items():
        prefix = adapters[0]
        tensors = prefix.key_values(facts.num_layers, facts.num_kv_heads, facts.head_dim)
        rel = f"packs/{name}.safetensors"
        save_file(tensors, str(bundle_dir / rel))
        out[name] = {
            "pack": rel,
            "adapters": [a.describe() for a in adapters],
            "prefix_tokens": prefix.num_tokens,
            "position_offset": prefix.position_offset,
            "bytes": sum(t.nbytes for t in tensors.values()),
        }
    return out

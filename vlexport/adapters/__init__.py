"""Adapter ingestion: detect the kind and format of a user's adapter file and read it into one of the kinds below.

Each kind lives in its own module and offers validate(model), merge_into(model) and describe().
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import VlexportError
from .bitfit import BitFitAdapter, read_bitfit_dump, read_peft_beft
from .bottleneck import BottleneckAdapter, is_plain_bottleneck, read_adapterhub_bottleneck, read_plain_bottleneck
from .lora import LoraAdapter, read_llava_repo_lora, read_peft_lora
from .peft_methods import SUPPORTED_TYPES, UNSUPPORTED_TYPES, PeftMethodAdapter, read_peft_method
from .prefix import PrefixAdapter, read_adapterhub_prefix, read_peft_prefix
from .single_file import is_mlx_adapter, read_single_file_lora

Adapter = LoraAdapter | BitFitAdapter | PrefixAdapter | BottleneckAdapter | PeftMethodAdapter
KINDS = ("lora", "bitfit", "prefix", "bottleneck", "peft")
# Folded into the weights ("peft": PEFT's other mergeable methods, merged by PEFT); the others are fed at run time.
MERGEABLE = ("lora", "bitfit", "peft")
_NOT_YET = {
    "PROMPT_TUNING": "prompt tuning",
    "P_TUNING": "p-tuning",
}


def _peft_type(folder: Path) -> str | None:
    cfg = folder / "adapter_config.json"
    if not cfg.exists():
        return None
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise VlexportError(f"'{cfg}' is not valid JSON ({e})") from None
    if "peft_type" in data:
        return str(data["peft_type"]).upper()
    if isinstance(data.get("config"), dict):
        return "ADAPTERHUB"
    return None


def detect_kind(path: Path) -> str:
    """'lora' or 'bitfit', from the config and the keys."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    peft_type = _peft_type(folder)
    if peft_type == "LORA":
        return "lora"
    if peft_type == "BEFT":
        return "bitfit"
    if peft_type == "PREFIX_TUNING":
        return "prefix"
    if peft_type in SUPPORTED_TYPES or peft_type in UNSUPPORTED_TYPES:
        return "peft"
    if peft_type == "ADAPTERHUB":
        architecture = (json.loads((folder / "adapter_config.json").read_text())["config"]).get("architecture")
        if architecture in (None, "bottleneck"):
            return "bottleneck"
        if architecture == "prefix_tuning":
            return "prefix"
        raise VlexportError(
            f"'{path}' is an AdapterHub {architecture} adapter; vlexport reads AdapterHub bottleneck and prefix "
            "tuning adapters, and LoRA in PEFT's format"
        )
    if peft_type is not None:
        what = _NOT_YET.get(peft_type, peft_type)
        raise VlexportError(f"'{path}' is a PEFT {what} adapter; this vlexport version supports LoRA, BitFit/BEFT, "
                            f"prefix tuning and {', '.join(SUPPORTED_TYPES.values())}")
    if is_mlx_adapter(path):
        return "lora"
    if path.is_dir():
        raise VlexportError(f"adapter directory '{path}' has no adapter_config.json; pass the weights file instead")
    if is_plain_bottleneck(path):
        return "bottleneck"
    from .io import read_tensors

    keys = list(read_tensors(path))
    if keys and all(k.endswith(".bias") for k in keys):
        return "bitfit"
    if any("lora_" in k for k in keys):
        return "lora"
    raise VlexportError(
        f"cannot tell what kind of adapter '{path}' is (no adapter_config.json, keys like '{keys[0] if keys else ''}'); "
        f"pass --adapter-kind ({'|'.join(KINDS)})"
    )


def load_adapter(path: str | Path, kind: str | None = None, lora_alpha: float | None = None) -> Adapter:
    """lora_alpha: alpha for a single-file LoRA that does not record it (kohya without .alpha keys, a bare
    safetensors without metadata); ignored where the file or its config gives it."""
    path = Path(path)
    if not path.exists():
        raise VlexportError(f"adapter '{path}' does not exist")
    if kind is not None and kind not in KINDS:
        raise VlexportError(f"unknown --adapter-kind '{kind}': choose one of {', '.join(KINDS)}")
    kind = kind or detect_kind(path)
    folder = path if path.is_dir() else path.parent
    if kind == "prefix":
        return read_adapterhub_prefix(path) if _peft_type(folder) == "ADAPTERHUB" else read_peft_prefix(path)
    if kind == "bottleneck":
        return read_plain_bottleneck(path) if is_plain_bottleneck(path) else read_adapterhub_bottleneck(path)
    if kind == "peft":
        return read_peft_method(path, _peft_type(folder) or "")
    if kind == "lora":
        if path.is_dir() and (path / "non_lora_trainables.bin").exists():
            return read_llava_repo_lora(path)
        if is_mlx_adapter(path) or (path.is_file() and _peft_type(folder) is None):
            return read_single_file_lora(path, lora_alpha)
        return read_peft_lora(path)
    if _peft_type(folder) == "BEFT":
        return read_peft_beft(path)
    if path.is_dir():
        raise VlexportError(f"BitFit adapter '{path}' is a directory without a BEFT adapter_config.json; pass the bias file")
    return read_bitfit_dump(path)


def merge_adapters(model, adapters: list[Adapter], log=None) -> None:
    """Validate every adapter against the model, then merge them in the order given (fp32)."""
    from ..progress import track

    for adapter in adapters:
        if adapter.kind not in MERGEABLE:
            raise VlexportError(
                f"adapter '{adapter.path}' is {adapter.kind} tuning, which is fed at run time, not merged: give it a "
                f"task name (--adapter NAME={adapter.path})"
            )
    for adapter in adapters:
        adapter.validate(model)
    # One step per LoRA module (a 7B LoRA has hundreds, and its merge takes a minute), one per other adapter.
    from .lora import LoraAdapter

    steps = sum(len(a.modules) if isinstance(a, (LoraAdapter, PeftMethodAdapter)) else 1 for a in adapters)
    with track(log, "merge", total=steps) as advance:
        for adapter in adapters:
            if isinstance(adapter, (LoraAdapter, PeftMethodAdapter)):
                adapter.merge_into(model, on_module=lambda name: advance(1, name))
            else:
                adapter.merge_into(model)
                advance(1, adapter.path.name)

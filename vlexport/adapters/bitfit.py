"""BitFit: bias-only dumps (absolute values) and PEFT BEFT (deltas added to a layer's output).

A bias on a Llama linear that has none (attention_bias=False, mlp_bias=False) becomes a real bias parameter, which
the exported graph then adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VlexportError
from ..files import read_json, sha256_file
from .io import check_finite, read_tensors
from .keymap import keeps_text_layer, normalize_key, part_of


@dataclass
class BitFitAdapter:
    path: Path
    weights_file: Path
    format: str  # "bitfit-dump" (absolute) | "peft-beft" (deltas)
    biases: dict = field(default_factory=dict)  # module name -> [out] tensor
    source_keys: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    kind: str = "bitfit"

    @property
    def absolute(self) -> bool:
        return self.format == "bitfit-dump"

    @property
    def sha256(self) -> str:
        return sha256_file(self.weights_file)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "format": self.format,
            "path": str(self.path),
            "sha256": self.sha256,
            "values": "absolute" if self.absolute else "delta",
            "biases": len(self.biases),
            "parts": sorted({part_of(m) for m in self.biases}),
            "merged": True,
        }

    def without_text_layers_from(self, num_layers: int) -> "BitFitAdapter":
        """The same adapter without biases in decoder layers >= num_layers (for few-layer parity)."""
        import dataclasses

        return dataclasses.replace(self, biases={k: v for k, v in self.biases.items() if keeps_text_layer(k, num_layers)})

    def validate(self, model) -> None:
        import torch

        modules = dict(model.named_modules())
        for module, value in self.biases.items():
            mod = modules.get(module)
            key = self.source_keys[module]
            if mod is None or not hasattr(mod, "weight"):
                raise VlexportError(
                    f"adapter '{self.path}': tensor '{key}' maps to no module of the base model; check that --base "
                    "is the model it was trained on"
                )
            out = mod.weight.shape[0] if not isinstance(mod, torch.nn.Embedding) else mod.weight.shape[1]
            if getattr(mod, "bias", None) is None and not isinstance(mod, torch.nn.Linear):
                raise VlexportError(f"adapter '{self.path}': tensor '{key}' is a bias for {type(mod).__name__} '{module}', which has none")
            if value.numel() != out:
                raise VlexportError(
                    f"adapter '{self.path}': tensor '{key}' has shape {tuple(value.shape)} but the base model needs "
                    f"({out},); check --base"
                )

    def merge_into(self, model) -> None:
        import torch

        modules = dict(model.named_modules())
        with torch.no_grad():
            for module, value in self.biases.items():
                mod = modules[module]
                value = value.float().reshape(-1)
                if mod.bias is None:
                    mod.bias = torch.nn.Parameter(value.to(mod.weight.dtype))
                elif self.absolute:
                    mod.bias.copy_(value.to(mod.bias.dtype))
                else:
                    mod.bias.copy_((mod.bias.float() + value).to(mod.bias.dtype))


def read_bitfit_dump(path: Path) -> BitFitAdapter:
    path = Path(path)
    state = read_tensors(path)
    check_finite(state, path)
    adapter = BitFitAdapter(path=path, weights_file=path, format="bitfit-dump")
    for key, value in state.items():
        name = normalize_key(key)
        if not name.endswith(".bias"):
            raise VlexportError(
                f"BitFit file '{path}': tensor '{key}' is not a bias; a BitFit dump holds only '*.bias' tensors "
                "(use --adapter-kind to read the file as another kind)"
            )
        module = name[: -len(".bias")]
        adapter.biases[module] = value
        adapter.source_keys[module] = key
    return adapter


def read_peft_beft(path: Path) -> BitFitAdapter:
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = read_json(folder / "adapter_config.json")
    weights = folder / "adapter_model.safetensors" if path.is_dir() else path
    if path.is_dir() and not weights.exists():
        weights = folder / "adapter_model.bin"
    state = read_tensors(weights)
    check_finite(state, weights)
    adapter = BitFitAdapter(path=path, weights_file=weights, format="peft-beft", config=config)
    for key, value in state.items():
        name = normalize_key(key.replace(".beft_bias.default", ".beft_bias"))
        if not name.endswith(".beft_bias"):
            raise VlexportError(f"BEFT adapter '{weights}': tensor '{key}' is not a beft_bias tensor")
        module = name[: -len(".beft_bias")]
        adapter.biases[module] = value
        adapter.source_keys[module] = key
    return adapter

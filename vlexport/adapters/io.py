"""Reading adapter tensors safely: safetensors, or pickles only with weights_only=True."""

from __future__ import annotations

from pathlib import Path

from ..errors import VlexportError


def read_tensors(path: Path) -> dict:
    """All tensors of a .safetensors or .bin/.pt file, as fp32-or-original torch tensors."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise VlexportError(f"adapter file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise VlexportError(
                f"adapter file '{path}' is not a readable safetensors file ({e}); it may be truncated: "
                "copy or download it again"
            ) from None
    if path.suffix in (".bin", ".pt", ".pth"):
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for corrupt or unsafe pickles
            raise VlexportError(
                f"adapter file '{path}' could not be loaded with torch.load(weights_only=True) ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); vlexport loads only plain tensor state dicts: "
                "re-save it with safetensors"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise VlexportError(f"adapter file '{path}' is not a flat dict of tensors")
        return dict(state)
    raise VlexportError(f"adapter file '{path}' has an unknown extension: expected .safetensors, .bin or .pt")


def check_finite(tensors: dict, source: Path) -> None:
    """Every tensor is floating point (an integer, bool or complex adapter tensor is refused by name) and finite."""
    import torch

    for key, t in tensors.items():
        if not t.is_floating_point():
            raise VlexportError(
                f"adapter '{source}': tensor '{key}' has dtype {str(t.dtype).removeprefix('torch.')}, but adapter "
                "weights are floating point (float32/float16/bfloat16); the file is not an adapter or was saved "
                "wrongly (quantized?): save the trained weights in floating point"
            )
        if t.is_floating_point() and not torch.isfinite(t).all():
            n_bad = int((~torch.isfinite(t)).sum())
            raise VlexportError(
                f"adapter '{source}': tensor '{key}' has {n_bad} NaN/Inf values; the adapter is corrupt or "
                "training diverged: use a checkpoint from before the divergence"
            )


def peft_weights_file(path: Path) -> Path:
    """The weights of a PEFT adapter given as its directory (adapter_model.safetensors, else .bin) or as the file."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (path / name).exists():
            return path / name
    raise VlexportError(f"adapter directory '{path}' has no adapter_model.safetensors or adapter_model.bin")

"""Target profiles: targets/*.toml, validated into a Target."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import VlexportError
from .model import PARTS

BACKENDS = ("onnxruntime",)
PRECISIONS = ("fp32",)
TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    backend: str
    precision: dict
    parity: dict = field(default_factory=dict)
    source: str = ""

    def thresholds(self, precision: str) -> dict:
        return self.parity.get(precision, {})

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "backend": self.backend,
                "precision": dict(self.precision), "parity": self.parity, "source": self.source}


def available_targets() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def load_target(name_or_path: str) -> Target:
    path = Path(name_or_path)
    if not (path.suffix == ".toml" and path.exists()):
        path = TARGETS_DIR / f"{name_or_path}.toml"
        if not path.exists():
            raise VlexportError(
                f"unknown --target '{name_or_path}': choose one of {', '.join(available_targets())} "
                "or pass the path of your own .toml profile"
            )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise VlexportError(f"target profile '{path}' is not valid TOML ({e})") from None
    for key in ("name", "backend", "precision"):
        if key not in data:
            raise VlexportError(f"target profile '{path}' has no '{key}' field")
    if data["backend"] not in BACKENDS:
        raise VlexportError(f"target profile '{path}': backend '{data['backend']}' is not one of {', '.join(BACKENDS)}")
    precision = data["precision"]
    for part in PARTS:
        p = precision.get(part)
        if p not in PRECISIONS:
            raise VlexportError(
                f"target profile '{path}': precision.{part} = {p!r}; this version builds {', '.join(PRECISIONS)}"
            )
    parity = data.get("parity", {})
    for p in set(precision.values()):
        if p not in parity:
            raise VlexportError(f"target profile '{path}' has no [parity.{p}] thresholds for its {p} parts")
    return Target(
        name=data["name"], description=data.get("description", ""), backend=data["backend"],
        precision=dict(precision), parity=parity, source=str(path),
    )

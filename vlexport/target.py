"""Target profiles: targets/*.toml, validated into a Target.

Fields (all but name, backend, precision and parity are optional for CPU targets):
  name, description, backend ("onnxruntime" | "tensorrt"), device
  compute_capability ("8.7"), tensorrt_versions (["10.3"]), jetpack (["6.1", "6.2"])
  usable_memory_gb, memory_bandwidth_gbs, dla_cores, runtime_overhead_gb
  [precision]      vision / embed / decoder: fp32 | fp16 | int8
  [shapes]         batch, images, prompt_tokens: [min, opt, max]; context: max tokens (past + new)
  [builder]        optimization_level (0-5), workspace_gb, dla_vision (bool), timing_cache (bool)
  [int8]           how INT8 parts are made: calibration, decoder (w8a8 | weight-only), smoothquant_alpha, fallback,
                   form (see vlexport/precision/__init__.py)
  [parity.<prec>]  thresholds that build and verify apply (see README)
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import VlexportError
from .model import PARTS

BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8")
TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"
DEFAULT_SHAPES = {"batch": [1, 1, 1], "images": [1, 1, 1], "prompt_tokens": [1, 600, 2048], "context": 4096}


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    backend: str
    precision: dict
    parity: dict = field(default_factory=dict)
    source: str = ""
    device: str = "host CPU"
    compute_capability: str | None = None
    tensorrt_versions: tuple = ()
    jetpack: tuple = ()
    usable_memory_gb: float | None = None
    memory_bandwidth_gbs: float | None = None
    dla_cores: int = 0
    runtime_overhead_gb: float = 0.5
    shapes: dict = field(default_factory=lambda: dict(DEFAULT_SHAPES))
    builder: dict = field(default_factory=dict)
    int8: dict = field(default_factory=dict)

    def thresholds(self, precision: str) -> dict:
        return self.parity.get(precision, {})

    def with_precision(self, overrides: dict) -> "Target":
        import dataclasses

        for part, p in overrides.items():
            if part not in PARTS or p not in PRECISIONS:
                raise VlexportError(
                    f"--precision {part}={p}: parts are {', '.join(PARTS)} and precisions {', '.join(PRECISIONS)}"
                )
            if p not in self.parity:
                raise VlexportError(f"--precision {part}={p}: target '{self.name}' has no [parity.{p}] thresholds")
        return dataclasses.replace(self, precision={**self.precision, **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "Target":
        """The Target a manifest recorded (so a device needs no copy of the profile file)."""
        return cls(**{k: tuple(v) if k in ("tensorrt_versions", "jetpack") else v for k, v in d.items()})

    def to_dict(self) -> dict:
        import dataclasses

        d = dataclasses.asdict(self)
        d["tensorrt_versions"], d["jetpack"] = list(self.tensorrt_versions), list(self.jetpack)
        return d


def parse_precision_overrides(text: str | None) -> dict:
    """'vision=fp16,decoder=fp32' -> {'vision': 'fp16', 'decoder': 'fp32'}."""
    if not text:
        return {}
    out = {}
    for item in text.split(","):
        if "=" not in item:
            raise VlexportError(f"--precision '{text}': expected PART=PRECISION[,PART=PRECISION...], e.g. vision=fp16")
        part, p = (s.strip() for s in item.split("=", 1))
        out[part] = p
    return out


def available_targets() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def _range(path: Path, key: str, value) -> list[int]:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) for v in value)
            and 0 < value[0] <= value[1] <= value[2]):
        raise VlexportError(f"target profile '{path}': shapes.{key} must be [min, opt, max] integers with 0 < min <= opt <= max")
    return value


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
    for key in ("name", "backend", "precision", "parity"):
        if key not in data:
            raise VlexportError(f"target profile '{path}' has no '{key}' field")
    if data["backend"] not in BACKENDS:
        raise VlexportError(f"target profile '{path}': backend '{data['backend']}' is not one of {', '.join(BACKENDS)}")
    precision = data["precision"]
    for part in PARTS:
        if precision.get(part) not in PRECISIONS:
            raise VlexportError(
                f"target profile '{path}': precision.{part} = {precision.get(part)!r}; use one of {', '.join(PRECISIONS)}"
            )
    parity = data["parity"]
    for p in set(precision.values()):
        if p not in parity:
            raise VlexportError(f"target profile '{path}' has no [parity.{p}] thresholds for its {p} parts")
    shapes = {**DEFAULT_SHAPES, **data.get("shapes", {})}
    for key in ("batch", "images", "prompt_tokens"):
        _range(path, key, shapes[key])
    if not (isinstance(shapes["context"], int) and shapes["context"] >= shapes["prompt_tokens"][2]):
        raise VlexportError(f"target profile '{path}': shapes.context must be an integer >= shapes.prompt_tokens max")
    if data["backend"] == "tensorrt":
        for key in ("compute_capability", "tensorrt_versions", "usable_memory_gb"):
            if key not in data:
                raise VlexportError(f"target profile '{path}': a tensorrt target needs '{key}'")
    level = data.get("builder", {}).get("optimization_level", 3)
    if not (isinstance(level, int) and 0 <= level <= 5):
        raise VlexportError(f"target profile '{path}': builder.optimization_level must be 0..5 (TensorRT's range)")
    return Target(
        name=data["name"], description=data.get("description", ""), backend=data["backend"],
        precision=dict(precision), parity=parity, source=str(path),
        device=data.get("device", "host CPU"),
        compute_capability=data.get("compute_capability"),
        tensorrt_versions=tuple(data.get("tensorrt_versions", ())),
        jetpack=tuple(data.get("jetpack", ())),
        usable_memory_gb=data.get("usable_memory_gb"),
        memory_bandwidth_gbs=data.get("memory_bandwidth_gbs"),
        dla_cores=int(data.get("dla_cores", 0)),
        runtime_overhead_gb=float(data.get("runtime_overhead_gb", 0.5)),
        shapes=shapes,
        builder=dict(data.get("builder", {})),
        int8=_int8_section(path, data.get("int8", {})),
    )


def _int8_section(path: Path, section: dict) -> dict:
    from .precision import int8_options

    try:
        int8_options(section)
    except VlexportError as e:
        raise VlexportError(f"target profile '{path}' [int8]: {e}") from None
    return dict(section)

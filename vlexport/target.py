"""Target profiles: targets/*.toml, validated into a Target.

Fields (all but name, backend, precision and parity are optional for CPU targets):
  name, description, backend ("onnxruntime" | "tensorrt"), device
  compute_capability ("8.7"), tensorrt_versions (["10.3"]), jetpack (["6.1", "6.2"])
  usable_memory_gb, memory_bandwidth_gbs, dla_cores, runtime_overhead_gb
  [precision]      vision / embed / decoder: fp32 | fp16 | int8 | int4 (int4: decoder only, weight-only)
  [shapes]         batch, images, prompt_tokens: [min, opt, max]; context: max tokens (past + new)
  [builder]        optimization_level (0-5), workspace_gb, dla_vision (bool), timing_cache (bool)
  [int8]           how INT8 parts are made: calibration, decoder (w8a8 | weight-only), smoothquant_alpha, fallback,
                   form (see vlexport/precision/__init__.py)
  [int4]           how INT4 weight-only decoders are made: block_size (32|64|128), algo (rtn|hqq|gptq), symmetric,
                   lm_head (int4|int8), keep (int8|fp32: the fallback's precision), fallback, awq (precision/int4.py)
  [memory]         resident bytes per weight byte the backend holds for parts at each precision (fp32, fp16, int8,
                   int4; default 1), measured (bench/resident_memory.py): the memory plan multiplies weights by it
  [parity.<prec>]  thresholds that build and verify apply (see README): export_rel_tol, at least one gate threshold
                   (vlexport/parity/verify.py THRESHOLDS), and in [parity.fp32] optionally oracle_k, the factor
                   over PyTorch FP32's own error against the float64 oracle that the FP32 gate allows
Every key is checked at load: an unknown or misspelt one is an error naming it (a typo must never drop a check).
"""

from __future__ import annotations

import difflib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import VlexportError
from .model import PARTS

BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("fp32", "fp16", "int8", "int4")
TARGETS_DIR = Path(__file__).resolve().parent.parent / "targets"
# adapter_width / lora_rank: the widest bottleneck and the largest LoRA rank a slot takes (TensorRT profiles).
DEFAULT_SHAPES = {"batch": [1, 1, 1], "images": [1, 1, 1], "prompt_tokens": [1, 600, 2048], "context": 4096,
                  "adapter_width": 256, "lora_rank": 64}
TOP_LEVEL_KEYS = ("name", "description", "backend", "device", "compute_capability", "tensorrt_versions", "jetpack",
                  "usable_memory_gb", "memory_bandwidth_gbs", "dla_cores", "runtime_overhead_gb", "precision", "shapes",
                  "builder", "int8", "int4", "memory", "parity")
BUILDER_KEYS = ("optimization_level", "workspace_gb", "dla_vision", "timing_cache")
ORACLE_K_MAX = 10.0  # a larger k would let the oracle wave through errors ten times PyTorch FP32's own


def _unknown(where: str, key: str, known, fix: str = "") -> VlexportError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return VlexportError(f"{where}: unknown key '{key}'; {hint}known keys: {', '.join(known)}" + (f" ({fix})" if fix else ""))


def _check_keys(where: str, section, known, name: str) -> None:
    if not isinstance(section, dict):
        raise VlexportError(f"{where}: '{name}' must be a table ([{name}]), not {type(section).__name__}")
    for key in section:
        if key not in known:
            raise _unknown(f"{where} [{name}]" if name else where, key, known)


def parity_keys(precision: str) -> tuple[str, ...]:
    """The keys a [parity.<precision>] section may hold."""
    from .parity.verify import THRESHOLDS

    return ("export_rel_tol", *THRESHOLDS, *(("oracle_k",) if precision == "fp32" else ()))


def validate_parity(parity, where: str, used: set | None = None) -> None:
    """[parity.<precision>] sections: known precisions and keys only, export_rel_tol and at least one gate threshold
    in each, every value a finite number in its range; `used`, the precisions the parts run at, must each have one.
    A misspelt key would otherwise give a gate with no check, which passes."""
    from .parity.verify import THRESHOLDS

    if not isinstance(parity, dict):
        raise VlexportError(f"{where}: 'parity' must be a table of [parity.<precision>] sections ({', '.join(PRECISIONS)})")
    for prec, section in parity.items():
        if prec not in PRECISIONS:
            close = difflib.get_close_matches(prec, PRECISIONS, n=1)
            raise VlexportError(f"{where}: unknown section [parity.{prec}]; " + (f"did you mean [parity.{close[0]}]? " if close else "")
                                + f"sections are [parity.<precision>] with precision one of {', '.join(PRECISIONS)}")
        name = f"parity.{prec}"
        known = parity_keys(prec)
        if not isinstance(section, dict):
            raise VlexportError(f"{where}: [{name}] must be a table of thresholds, not a {type(section).__name__}")
        for key, value in section.items():
            if key not in known:
                fix = "oracle_k belongs in [parity.fp32]: FP16 and INT8 gates keep fixed limits" if key == "oracle_k" else ""
                raise _unknown(f"{where} [{name}]", key, known, fix)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise VlexportError(f"{where} [{name}]: {key} = {value!r}; use a finite number")
            if key == "oracle_k" and not 0 < value <= ORACLE_K_MAX:
                raise VlexportError(f"{where} [{name}]: oracle_k = {value!r}; use a number in (0, {ORACLE_K_MAX:g}] "
                                    "(2 allows the bundle twice PyTorch FP32's own error against float64)")
            if key in THRESHOLDS and THRESHOLDS[key][3] == ">=" and not 0 <= value <= 1:
                raise VlexportError(f"{where} [{name}]: {key} = {value!r}; a minimum cosine, agreement or match rate "
                                    "lies in [0, 1]")
            if key not in THRESHOLDS or THRESHOLDS[key][3] == "<=":
                if value < 0:
                    raise VlexportError(f"{where} [{name}]: {key} = {value!r}; a tolerance is >= 0")
        if "export_rel_tol" not in section:
            raise VlexportError(f"{where} [{name}] has no export_rel_tol; add it (the export check's max|ort - torch| / "
                                "max(1, max|torch|), e.g. 1e-4 for fp32)")
        if not any(k in THRESHOLDS for k in section):
            raise VlexportError(f"{where} [{name}] has no parity threshold, so its gate would check nothing; add at "
                                f"least one of {', '.join(THRESHOLDS)}")
    for p in sorted(used or ()):
        if p not in parity:
            raise VlexportError(f"{where} has no [parity.{p}] thresholds for its {p} parts; add that section")


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
    int4: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)  # precision -> resident bytes per weight byte on this backend

    def resident_factor(self, precision: str) -> float:
        return float(self.memory.get(precision, 1.0))

    def thresholds(self, precision: str) -> dict:
        if precision not in self.parity:
            raise VlexportError(f"target '{self.name}' ({self.source or 'recorded in the manifest'}) has no "
                                f"[parity.{precision}] thresholds; add that section to the profile")
        return self.parity[precision]

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
        """The Target a manifest recorded (so a device needs no copy of the profile file). Validated as a profile
        is: an older manifest may have recorded a profile with a misspelt threshold, whose check never ran."""
        import dataclasses

        where = "the bundle manifest's 'target'"
        if not isinstance(d, dict):
            raise VlexportError(f"{where} is not an object; rebuild the bundle")
        fields = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in fields:
                raise _unknown(where, key, fields, "rebuild the bundle with this vlexport")
        missing = [f for f in ("name", "description", "backend", "precision") if f not in d]
        if missing:
            raise VlexportError(f"{where} has no '{missing[0]}'; rebuild the bundle")
        validate_parity(d.get("parity", {}), f"{where} ({d['name']})", set((d.get("precision") or {}).values()))
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
    where = f"target profile '{path}'"
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise _unknown(where, key, TOP_LEVEL_KEYS, "see the field list in vlexport/target.py")
    for key in ("name", "backend", "precision", "parity"):
        if key not in data:
            raise VlexportError(f"target profile '{path}' has no '{key}' field")
    _check_keys(where, data["precision"], PARTS, "precision")
    _check_keys(where, data.get("shapes", {}), tuple(DEFAULT_SHAPES), "shapes")
    _check_keys(where, data.get("builder", {}), BUILDER_KEYS, "builder")
    from .precision import INT4_DEFAULTS, INT8_DEFAULTS, int4_options, int8_options  # here: it imports numpy

    _check_keys(where, data.get("int8", {}), tuple(INT8_DEFAULTS), "int8")
    _check_keys(where, data.get("int4", {}), tuple(INT4_DEFAULTS), "int4")
    _check_memory(where, data.get("memory", {}))
    if data["backend"] not in BACKENDS:
        raise VlexportError(f"target profile '{path}': backend '{data['backend']}' is not one of {', '.join(BACKENDS)}")
    precision = data["precision"]
    for part in PARTS:
        if precision.get(part) not in PRECISIONS:
            raise VlexportError(
                f"target profile '{path}': precision.{part} = {precision.get(part)!r}; use one of {', '.join(PRECISIONS)}"
            )
    parity = data["parity"]
    validate_parity(parity, where, set(precision.values()))
    shapes = {**DEFAULT_SHAPES, **data.get("shapes", {})}
    for key in ("batch", "images", "prompt_tokens"):
        _range(path, key, shapes[key])
    if not (isinstance(shapes["context"], int) and shapes["context"] >= shapes["prompt_tokens"][2]):
        raise VlexportError(f"target profile '{path}': shapes.context must be an integer >= shapes.prompt_tokens max")
    for key in ("adapter_width", "lora_rank"):
        if isinstance(shapes[key], bool) or not isinstance(shapes[key], int) or shapes[key] < 1:
            raise VlexportError(f"target profile '{path}': shapes.{key} must be a whole number >= 1 (the largest "
                                f"{'bottleneck width' if key == 'adapter_width' else 'LoRA rank'} an adapter slot takes)")
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
        int8=_options_section(path, data.get("int8", {}), "int8", int8_options),
        int4=_options_section(path, data.get("int4", {}), "int4", int4_options),
        memory=dict(data.get("memory", {})),
    )


def _options_section(path: Path, section: dict, name: str, parse) -> dict:
    """[int8] / [int4] parsed at load, so that a bad value names the profile rather than surfacing at build."""
    try:
        parse(section)
    except VlexportError as e:
        raise VlexportError(f"target profile '{path}' [{name}]: {e}") from None
    return dict(section)


def _check_memory(where: str, section) -> None:
    """[memory]: a factor >= 1 per precision (a backend never holds less than the weights' own bytes)."""
    _check_keys(where, section, PRECISIONS, "memory")
    for key, value in section.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 1 <= value <= 10:
            raise VlexportError(f"{where} [memory]: {key} = {value!r}; use the measured resident bytes per weight byte, "
                                "a number in [1, 10]")

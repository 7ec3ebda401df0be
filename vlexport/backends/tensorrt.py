"""TensorRT backend: build an engine from an exported ONNX part, and run it behind OrtRunner's interface.

Written against the TensorRT 10.x Python API (10.3 is what JetPack 6 ships). No machine of ours has TensorRT, so
none of this has been executed here: it is type-checked against tensorrt-stubs (tests/test_tensorrt_typecheck.py)
and the engines are meant to be built and run on the device itself, since an engine only runs on the TensorRT
version and GPU that built it.

`tensorrt` (and torch, used for CUDA buffers and device queries) are imported inside functions, so this module
imports everywhere; without TensorRT every entry point raises TensorRTUnavailable (exit code 2).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import VlexportError
from ..files import atomic_write_bytes, atomic_write_text, read_json, sha256_file

if TYPE_CHECKING:
    import tensorrt as trt
    import torch

PRECISIONS = ("fp32", "fp16", "int8", "int4")
PAST_PREFIX = "past_key_values."
CONTEXT_PROFILE, GENERATION_PROFILE = 0, 1  # the decoder's two profiles, in vlexport/trt/profiles.py's order


class TensorRTUnavailable(VlexportError):
    """TensorRT (or a CUDA GPU) is missing on this machine."""

    def __init__(self, reason: str):
        super().__init__(
            f"TensorRT is not importable here ({reason}). TensorRT engines are built and run on the device they "
            "target: copy the bundle there and run engines/build.sh (or `vlexport engines`) on the device"
        )
        self.reason = reason


def tensorrt_available() -> tuple[bool, str]:
    """(ok, reason): can this process build and run TensorRT engines?"""
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: bindings present but libnvinfer missing
        return False, f"tensorrt cannot be imported: {e}"
    # tensorrt-stubs installs a bare `tensorrt/` directory of .pyi files, which imports as an empty namespace package.
    if not hasattr(tensorrt, "Builder"):
        return False, "tensorrt cannot be imported: only type stubs (tensorrt-stubs) are installed, not TensorRT"
    import torch

    if not torch.cuda.is_available():
        return False, f"tensorrt {tensorrt.__version__} is importable but torch sees no CUDA GPU"
    return True, f"tensorrt {tensorrt.__version__} on {torch.cuda.get_device_name()}"


def _require_tensorrt() -> None:
    ok, reason = tensorrt_available()
    if not ok:
        raise TensorRTUnavailable(reason)


def compute_capability(value: object, where: str = "compute capability") -> str:
    """The one representation of a CUDA compute capability: "MAJOR.MINOR" (as target profiles write it).

    Accepts "8.7", "sm_87", 8.7, and [8, 7] / (8, 7) (torch.cuda.get_device_capability(), and engine metadata
    written by vlexport before 0.x recorded a list)."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v >= 0 for v in value):
        return f"{value[0]}.{value[1]}"
    if isinstance(value, float):
        value = repr(value)
    if isinstance(value, str):
        m = re.fullmatch(r"(\d+)\.(\d+)", value.strip()) or re.fullmatch(r"sm_(\d+)(\d)", value.strip())
        if m:
            return f"{int(m.group(1))}.{int(m.group(2))}"
    raise VlexportError(f"{where}: {value!r} is not a compute capability; write it as \"MAJOR.MINOR\", e.g. \"8.7\"")


def sm(capability: str) -> str:
    """ "8.7" -> "sm_87" """
    return "sm_" + compute_capability(capability).replace(".", "")


def device_capability() -> str:
    """This machine's CUDA device, in compute_capability()'s form."""
    import torch

    return compute_capability(tuple(torch.cuda.get_device_capability()), "this GPU")


def _current_device() -> dict[str, Any]:
    import tensorrt as trt
    import torch

    return {
        "tensorrt_version": trt.__version__,
        "device_name": torch.cuda.get_device_name(),
        "compute_capability": device_capability(),
    }


def source_digests(onnx_path: Path) -> dict[str, str | None]:
    """sha256 of an ONNX part and of its external data (NAME.onnx.data, None when it has none): the data holds the
    weights, so a rebuilt bundle can have an identical .onnx and other weights."""
    data = onnx_path.with_name(onnx_path.name + ".data")
    return {"onnx_sha256": sha256_file(onnx_path), "onnx_data_sha256": sha256_file(data) if data.is_file() else None}


def _check_profiles(profiles: list[dict], onnx_path: Path) -> None:
    if not profiles:
        raise VlexportError(f"no optimization profile given for '{onnx_path.name}'; every dynamic input needs min/opt/max")
    for i, profile in enumerate(profiles):
        for name, shapes in profile.items():
            if len(shapes) != 3 or len({len(s) for s in shapes}) != 1:
                raise VlexportError(f"profile {i} of '{onnx_path.name}': input '{name}' needs (min, opt, max) shapes "
                                    f"of one rank, got {shapes}")
            lo, opt, hi = shapes
            if not all(0 <= a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise VlexportError(f"profile {i} of '{onnx_path.name}': input '{name}' needs min <= opt <= max in "
                                    f"every dimension, got min {tuple(lo)}, opt {tuple(opt)}, max {tuple(hi)}")


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    precision: str,
    profiles: list[dict],
    *,
    optimization_level: int = 3,
    workspace_bytes: int = 4 << 30,
    timing_cache_path: Path | None = None,
    dla_core: int | None = None,
    strongly_typed: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Build `engine_path` from one ONNX part; write `<engine>.json` beside it and return that metadata.

    profiles: one {input name: (min, opt, max)} per optimization profile (vlexport/trt/profiles.py).
    Every file is written atomically; an unreadable timing cache is replaced by a new one (and logged).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    # Check our own arguments before TensorRT, so mistakes are reported the same way on every machine.
    if precision not in PRECISIONS:
        raise VlexportError(f"unknown precision '{precision}' for '{onnx_path.name}'; choose one of {', '.join(PRECISIONS)}")
    if strongly_typed and precision == "fp16":
        raise VlexportError(f"'{onnx_path.name}': a strongly typed network takes its precision from the graph and "
                            "TensorRT rejects the FP16 flag with it; export an fp16 graph, or build without strongly_typed")
    if not 0 <= optimization_level <= 5:
        raise VlexportError(f"builder optimization level must be 0-5 (got {optimization_level})")
    if dla_core is not None and (dla_core < 0 or precision in ("fp32", "int4")):
        raise VlexportError(f"DLA core {dla_core} for '{onnx_path.name}': DLA needs a core index >= 0 and runs FP16/INT8 "
                            "only; use precision fp16 or int8, or leave the part on the GPU")
    _check_profiles(profiles, onnx_path)
    if not onnx_path.is_file():
        raise VlexportError(f"ONNX part '{onnx_path}' not found")
    _require_tensorrt()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # 10.x: networks are always explicit-batch (flag 0); STRONGLY_TYPED is a bit position in the flags word.
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse(bytes)) so the decoder's external-data file is found next to the .onnx.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or "(no parser message)"
        raise VlexportError(f"TensorRT's ONNX parser rejected '{onnx_path.name}':\n  {errors}")

    # Every dynamic input (a -1 dimension) needs a range in every profile; a name the graph lacks is a mistake.
    graph_inputs = {t.name: _dims(t.shape) for t in (network.get_input(i) for i in range(network.num_inputs))}
    for i, profile in enumerate(profiles):
        missing = sorted(n for n, shape in graph_inputs.items() if -1 in shape and n not in profile)
        unknown = sorted(set(profile) - set(graph_inputs))
        if missing or unknown:
            raise VlexportError(f"profile {i} of '{onnx_path.name}' does not match the graph's inputs: "
                                f"dynamic inputs without a range {missing}, names the graph lacks {unknown}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.builder_optimization_level = optimization_level
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "int8" and not strongly_typed:
        # Explicit quantization: the graph's Q/DQ nodes carry the scales, no calibrator (deprecated since 10.1).
        # A strongly typed network takes INT8 from those Q/DQ nodes and forbids the flag.
        config.set_flag(trt.BuilderFlag.INT8)
    elif precision == "int4":
        # INT4 weight-only: blocked DequantizeLinear on the weights, FP16 activations (as trtexec --int4 --fp16).
        config.set_flag(trt.BuilderFlag.INT4)
        config.set_flag(trt.BuilderFlag.FP16)

    for i, profile in enumerate(profiles):
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in profile.items():
            # The stubs declare Dims; pybind11 converts a tuple of ints to Dims at run time.
            opt_profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))  # type: ignore[arg-type]
        if config.add_optimization_profile(opt_profile) < 0:
            raise VlexportError(f"TensorRT rejected optimization profile {i} of '{onnx_path.name}': {profile}")

    if timing_cache_path is not None:
        timing_cache_path = Path(timing_cache_path)
        cached = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
        try:
            cache = config.create_timing_cache(cached)  # empty bytes -> a new, empty cache
        except Exception as e:  # a truncated or corrupt file (a killed build before caches were atomic)
            if log is not None:
                log(f"timing cache '{timing_cache_path}' is unreadable ({type(e).__name__}); starting a new one")
            cache = config.create_timing_cache(b"")
        # ignore_mismatch=False: a cache from another GPU or TensorRT version would give wrong tactic timings.
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise VlexportError(f"timing cache '{timing_cache_path}' was made on another GPU or TensorRT version; "
                                "delete it and build again")

    if dla_core is not None:
        if dla_core >= builder.num_DLA_cores:
            raise VlexportError(f"DLA core {dla_core} requested but this device has {builder.num_DLA_cores} DLA cores")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU instead of failing

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:  # the stubs say IHostMemory, but the binding returns None on failure
        raise VlexportError(f"TensorRT failed to build an engine from '{onnx_path.name}'; see the TensorRT log above")

    atomic_write_bytes(engine_path, bytes(memoryview(serialized)))  # no half-written engine if the write fails
    if timing_cache_path is not None:
        atomic_write_bytes(timing_cache_path, bytes(memoryview(config.get_timing_cache().serialize())))

    meta = {
        **_current_device(),
        "precision": precision,
        "strongly_typed": strongly_typed,
        "profiles": [{name: [list(s) for s in shapes] for name, shapes in p.items()} for p in profiles],
        "dla_core": dla_core,
        "optimization_level": optimization_level,
        "onnx": onnx_path.name,
        # The graph and its external data (the weights): the loader refuses the engine if either changed.
        **source_digests(onnx_path),
        "built_by": "vlexport (TensorRT Python API)",
    }
    write_engine_metadata(engine_path, meta)
    return meta


def write_engine_metadata(engine_path: Path, meta: dict) -> None:
    atomic_write_text(_meta_path(Path(engine_path)), json.dumps(meta, indent=2) + "\n")


def read_engine_metadata(engine_path: Path) -> dict:
    engine_path = Path(engine_path)
    meta_path = _meta_path(engine_path)
    if not meta_path.is_file():
        raise VlexportError(f"'{meta_path}' is missing: it records which TensorRT, GPU and ONNX built "
                            f"'{engine_path.name}'; rebuild the engine with `vlexport engines`, or run engines/build.sh "
                            "and then `vlexport engines --adopt`")
    meta = read_json(meta_path, fix="rebuild the engine with `vlexport engines` (or engines/build.sh + --adopt)")
    if not isinstance(meta, dict):
        raise VlexportError(f"'{meta_path}' is not a JSON object; rebuild the engine with `vlexport engines`")
    return meta


def _meta_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def _engine_mismatches(meta: dict, current: dict) -> list[str]:
    problems = []
    if meta.get("tensorrt_version") != current["tensorrt_version"]:
        problems.append(f"it was built with TensorRT {meta.get('tensorrt_version')}, this is TensorRT "
                        f"{current['tensorrt_version']}")
    built = meta.get("compute_capability")
    built_cc = compute_capability(built, "the engine's compute_capability") if built is not None else None
    this_cc = compute_capability(current["compute_capability"], "this GPU")
    if meta.get("device_name") != current["device_name"] or built_cc != this_cc:
        built_sm = sm(built_cc) if built_cc else "unknown"
        problems.append(f"it was built on {meta.get('device_name')} ({built_sm}), this is "
                        f"{current['device_name']} ({sm(this_cc)})")
    return problems


def check_engine_source(meta: dict, expected: dict[str, str | None], engine: str) -> None:
    """Refuse an engine whose source ONNX (graph or weights) is not the bundle's: it would run other weights."""
    onnx_name = meta.get("onnx") or "its ONNX part"
    fix = ("rebuild it from this bundle's ONNX: `vlexport engines BUNDLE` on the device, or `bash engines/build.sh` "
           "then `vlexport engines BUNDLE --adopt`")
    if not meta.get("onnx_sha256"):
        raise VlexportError(f"engine '{engine}' records no sha256 of the ONNX it was built from, so it cannot be "
                            f"matched to this bundle; {fix}")
    for key, what in (("onnx_sha256", "graph"), ("onnx_data_sha256", "weights (external data)")):
        if meta.get(key) != expected.get(key):
            raise VlexportError(f"engine '{engine}' was built from another {onnx_name} than this bundle's: its {what} "
                                f"sha256 {str(meta.get(key))[:12]}… is not the bundle's {str(expected.get(key))[:12]}…; "
                                f"{fix}")


def check_engine_metadata(meta: dict) -> None:
    """Raise if this TensorRT version or GPU differs from the ones that built the engine (it would not load)."""
    _require_tensorrt()
    problems = _engine_mismatches(meta, _current_device())
    if problems:
        raise VlexportError("this engine cannot run here: " + "; ".join(problems) +
                            ". Rebuild it on this device (engines/build.sh or `vlexport engines`)")


def _dtypes() -> dict[trt.DataType, tuple[type[np.generic], torch.dtype]]:
    import tensorrt as trt
    import torch

    return {
        trt.DataType.FLOAT: (np.float32, torch.float32),
        trt.DataType.HALF: (np.float16, torch.float16),
        trt.DataType.INT8: (np.int8, torch.int8),
        trt.DataType.INT32: (np.int32, torch.int32),
        trt.DataType.INT64: (np.int64, torch.int64),
        trt.DataType.BOOL: (np.bool_, torch.bool),
    }


def _dims(d: trt.Dims) -> tuple[int, ...]:
    return tuple(d[i] for i in range(len(d)))  # Dims has __len__/__getitem__ but no __iter__ in the stubs


class TensorRTRunner:
    """One engine; infer(feed) -> dict of numpy arrays, like OrtRunner, so the runtime's KV-cache loop is unchanged."""

    def __init__(self, engine_path: Path, source: dict[str, str | None] | None = None):
        """source: the bundle's digests of the engine's ONNX part (source_digests()); given, an engine built from
        another ONNX is refused before TensorRT sees it."""
        _require_tensorrt()
        import tensorrt as trt
        import torch

        engine_path = Path(engine_path)
        if not engine_path.is_file():
            raise VlexportError(f"TensorRT engine '{engine_path}' not found; build it on this device first")
        self.meta = read_engine_metadata(engine_path)
        if source is not None:
            check_engine_source(self.meta, source, engine_path.name)
        check_engine_metadata(self.meta)

        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)  # kept: the engine must not outlive its runtime
        if self.meta.get("dla_core") is not None:
            self.runtime.DLA_core = int(self.meta["dla_core"])
        self.engine = self.runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:  # the stubs say ICudaEngine, but the binding returns None on failure
            raise VlexportError(f"TensorRT could not load '{engine_path}'; rebuild it on this device")
        self.context = self.engine.create_execution_context()
        self.active_profile = 0  # a new context starts on profile 0
        self.stream = torch.cuda.Stream()  # our own stream: TensorRT warns about (and syncs on) the default stream

        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        dtypes = _dtypes()
        self.dtypes: dict[str, tuple[type[np.generic], torch.dtype]] = {}
        for n in names:
            dt = self.engine.get_tensor_dtype(n)
            if dt not in dtypes:
                raise VlexportError(f"engine '{engine_path.name}' tensor '{n}' has type {dt}, which vlexport cannot feed")
            self.dtypes[n] = dtypes[dt]
        # (min, max) per input per profile, to pick the profile a call's shapes fit.
        self.ranges: list[dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = []
        for p in range(self.engine.num_optimization_profiles):
            profile_range = {}
            for n in self.input_names:
                lo, _opt, hi = self.engine.get_tensor_profile_shape(n, p)
                profile_range[n] = (_dims(lo), _dims(hi))
            self.ranges.append(profile_range)

    def _choose_profile(self, shapes: dict[str, tuple[int, ...]]) -> int:
        order = list(range(len(self.ranges)))
        past = [s for n, s in shapes.items() if n.startswith(PAST_PREFIX)]
        if past and len(order) > GENERATION_PROFILE:
            # Decoder: prefill (empty cache) is the context profile, later steps the generation profile.
            first = CONTEXT_PROFILE if len(past[0]) > 2 and past[0][2] == 0 else GENERATION_PROFILE
            order.remove(first)
            order.insert(0, first)
        for p in order:
            if all(len(shapes[n]) == len(lo) and all(a <= d <= b for a, d, b in zip(lo, shapes[n], hi))
                   for n, (lo, hi) in self.ranges[p].items()):
                return p
        ranges = "; ".join(f"profile {p}: " + ", ".join(f"{n} {lo}..{hi}" for n, (lo, hi) in r.items())
                           for p, r in enumerate(self.ranges))
        raise VlexportError(f"input shapes {shapes} fit none of the engine's optimization profiles ({ranges}); "
                            "rebuild the engine with wider shape ranges")

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise VlexportError(f"missing inputs {missing} for the TensorRT engine (it takes {self.input_names})")
        # The engine's own input types (e.g. INT32 where the ONNX graph said INT64 on older TensorRT) decide the cast.
        arrays = {n: np.ascontiguousarray(feed[n], dtype=self.dtypes[n][0]) for n in self.input_names}
        shapes = {n: tuple(a.shape) for n, a in arrays.items()}
        profile = self._choose_profile(shapes)
        keep = []  # device tensors must stay alive until the stream has finished with them
        with torch.cuda.stream(self.stream):
            handle = self.stream.cuda_stream
            if profile != self.active_profile:
                if not self.context.set_optimization_profile_async(profile, handle):
                    raise VlexportError(f"TensorRT could not switch to optimization profile {profile}")
                self.active_profile = profile
            for n, a in arrays.items():
                if not self.context.set_input_shape(n, shapes[n]):
                    raise VlexportError(f"TensorRT rejected shape {shapes[n]} for input '{n}' (profile {profile})")
                # At least one element: a zero-size input (image_features [0, H] on decode steps) still needs a
                # valid, non-null address, and torch gives zero-size CUDA tensors a null data pointer.
                dev = torch.empty(max(a.size, 1), dtype=self.dtypes[n][1], device="cuda")
                dev[: a.size].copy_(torch.from_numpy(a).reshape(-1))
                self.context.set_tensor_address(n, dev.data_ptr())
                keep.append(dev)
            outputs: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = {}
            for n in self.output_names:
                shape = _dims(self.context.get_tensor_shape(n))  # known once every input shape is set
                if any(d < 0 for d in shape):
                    raise VlexportError(f"output '{n}' has an unresolved shape {shape}; data-dependent output shapes "
                                        "are not supported by this runner")
                dev = torch.empty(max(math.prod(shape), 1), dtype=self.dtypes[n][1], device="cuda")
                self.context.set_tensor_address(n, dev.data_ptr())
                outputs[n] = (dev, shape)
            if not self.context.execute_async_v3(handle):
                raise VlexportError("TensorRT inference failed (execute_async_v3); see the TensorRT log above")
        self.stream.synchronize()
        return {n: dev[: math.prod(shape)].reshape(shape).cpu().numpy() for n, (dev, shape) in outputs.items()}

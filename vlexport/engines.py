"""TensorRT engines for a bundle: built here when TensorRT and the target's GPU are present, otherwise planned
(engines/build.sh with the exact trtexec commands) and built later on the device with `vlexport engines`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .errors import VlexportError
from .target import Target
from .trt.profiles import bundle_profiles
from .trt.trtexec import build_script, part_command


def device_mismatch(target: Target) -> str | None:
    """Why engines for `target` cannot be built on this machine, or None if they can."""
    from .backends.tensorrt import tensorrt_available

    ok, reason = tensorrt_available()
    if not ok:
        return reason
    import torch

    major, minor = torch.cuda.get_device_capability()
    if f"{major}.{minor}" != target.compute_capability:
        return (f"this GPU ({torch.cuda.get_device_name()}, sm_{major}{minor}) is not the target's "
                f"(sm_{target.compute_capability.replace('.', '')}); TensorRT engines run only on the GPU that built them")
    return None


def _engine_precision(onnx_precision: str, wanted: str) -> str:
    """INT8 engines only from a Q/DQ part: a part left in FP32 (INT8 failed its gate) builds as FP16 instead."""
    if onnx_precision == "int8":
        return "int8"
    return "fp16" if wanted == "int8" else wanted


def engine_parts(manifest: dict, target: Target) -> dict:
    profiles = bundle_profiles(manifest, target.shapes)
    dla = bool(target.builder.get("dla_vision")) and target.dla_cores > 0
    return {
        name: {
            "file": f"engines/{name}.engine",
            "onnx": part["file"],
            "precision": _engine_precision(part["precision"], target.precision[name]),
            "profiles": [{k: [list(s) for s in v] for k, v in p.items()} for p in profiles[name]],
            "dla_core": 0 if (dla and name == "vision") else None,
        }
        for name, part in manifest["parts"].items()
    }


def plan_engines(bundle_dir: Path, manifest: dict, target: Target, log: Callable[[str], None]) -> dict:
    """Write engines/build.sh; build the engines now if this machine can. Returns the manifest's 'engines' entry."""
    parts = engine_parts(manifest, target)
    version = target.tensorrt_versions[0]
    commands = {
        name: part_command(name, p["onnx"], p["precision"], _profiles(p), version, target.builder, p["dla_core"] is not None)
        for name, p in parts.items()
    }
    reason = device_mismatch(target)
    engines_dir = bundle_dir / "engines"
    engines_dir.mkdir(exist_ok=True)
    script = engines_dir / "build.sh"
    script.write_text(build_script(commands, target.name, target.tensorrt_versions, reason or "(built here too)"))
    script.chmod(0o755)
    entry = {
        "status": "planned", "reason": reason, "tensorrt_versions": list(target.tensorrt_versions),
        "compute_capability": target.compute_capability, "script": "engines/build.sh",
        "timing_cache": "engines/timing.cache", "parts": parts,
    }
    if reason is None:
        _build_all(bundle_dir, parts, target, log)
        entry["status"] = "built"
    else:
        log(f"no TensorRT engine was built here: {reason}. On the {target.device}, run `bash engines/build.sh` "
            "in the bundle (or `vlexport engines BUNDLE`)")
    return entry


def _profiles(part: dict) -> list[dict]:
    return [{k: tuple(tuple(s) for s in v) for k, v in p.items()} for p in part["profiles"]]


def _build_all(bundle_dir: Path, parts: dict, target: Target, log) -> None:
    from .backends.tensorrt import build_engine

    for name, p in parts.items():
        log(f"building TensorRT engine for {name} ({p['precision']})")
        build_engine(
            bundle_dir / p["onnx"], bundle_dir / p["file"], p["precision"], _profiles(p),
            optimization_level=target.builder.get("optimization_level", 3),
            workspace_bytes=int(target.builder.get("workspace_gb", 4) * 1024**3),
            timing_cache_path=bundle_dir / "engines" / "timing.cache",
            dla_core=p["dla_core"],
        )


def build_engines_on_device(bundle_dir: Path, adopt: bool, log: Callable[[str], None]) -> dict:
    """`vlexport engines BUNDLE`: build (or, with adopt, record engines that build.sh made) and update the manifest."""
    from .backends.tensorrt import TensorRTUnavailable
    from .bundle import read_manifest, write_manifest

    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    entry = manifest.get("engines")
    if not entry:
        raise VlexportError(f"bundle '{bundle_dir}' was built for target '{manifest['target']['name']}', which has no "
                            "TensorRT engines; rebuild it with a TensorRT --target such as jetson-orin")
    target = Target.from_dict(manifest["target"])
    reason = device_mismatch(target)
    if reason is not None:
        raise TensorRTUnavailable(f"cannot build engines for '{target.name}' here: {reason}")
    if adopt:
        missing = [p["file"] for p in entry["parts"].values() if not (bundle_dir / p["file"]).exists()]
        if missing:
            raise VlexportError(f"engines not found: {', '.join(missing)}; run `bash engines/build.sh` first")
        _adopt_metadata(bundle_dir, entry["parts"])
    else:
        _build_all(bundle_dir, entry["parts"], target, log)
    entry["status"], entry["reason"] = "built", None
    manifest.pop("files", None)
    manifest.pop("schema_version", None)
    manifest["engines"] = entry
    return write_manifest(bundle_dir, manifest)


def _adopt_metadata(bundle_dir: Path, parts: dict) -> None:
    """Engines made by build.sh carry no metadata: record the TensorRT version and GPU that made them."""
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    for p in parts.values():
        meta = {"tensorrt_version": trt.__version__, "device_name": torch.cuda.get_device_name(),
                "compute_capability": f"{major}.{minor}", "precision": p["precision"], "profiles": p["profiles"],
                "dla_core": p["dla_core"], "built_by": "trtexec (engines/build.sh)"}
        (bundle_dir / (p["file"] + ".json")).write_text(json.dumps(meta, indent=2))

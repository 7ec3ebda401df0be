"""TensorRT engines for a bundle: built here when TensorRT and the target's GPU are present, otherwise planned
(engines/build.sh with the exact trtexec commands) and built later on the device with `vlexport engines`."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .bundle import bundle_file
from .errors import VlexportError
from .files import atomic_write_text, sha256_file
from .target import Target
from .trt.profiles import bundle_profiles
from .trt.trtexec import build_script, part_command


def device_mismatch(target: Target) -> str | None:
    """Why engines for `target` cannot be built on this machine, or None if they can."""
    from .backends.tensorrt import compute_capability, device_capability, sm, tensorrt_available

    ok, reason = tensorrt_available()
    if not ok:
        return reason
    import torch

    here = device_capability()
    wanted = compute_capability(target.compute_capability, f"target '{target.name}' compute_capability")
    if here != wanted:
        return (f"this GPU ({torch.cuda.get_device_name()}, {sm(here)}) is not the target's ({sm(wanted)}); "
                "TensorRT engines run only on the GPU that built them")
    return None


def _engine_precision(onnx_precision: str, wanted: str) -> str:
    """INT8/INT4 engines only from a Q/DQ part: a part left in FP32 (its gate failed) builds as FP16 instead."""
    if onnx_precision in ("int8", "int4"):
        return onnx_precision
    return "fp16" if wanted in ("int8", "int4") else wanted


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
    text = build_script(commands, target.name, target.tensorrt_versions, reason or "(built here too)")
    atomic_write_text(script, text + _source_records(bundle_dir, parts))
    script.chmod(0o755)
    from .backends.tensorrt import compute_capability

    entry = {
        "status": "planned", "reason": reason, "tensorrt_versions": list(target.tensorrt_versions),
        "compute_capability": compute_capability(target.compute_capability, f"target '{target.name}' compute_capability"),
        "script": "engines/build.sh",
        "timing_cache": "engines/timing.cache", "parts": parts,
    }
    if reason is None:
        _build_all(bundle_dir, parts, target, log)
        entry["status"] = "built"
    else:
        log(f"no TensorRT engine was built here: {reason}. On the {target.device}, run `bash engines/build.sh` "
            "in the bundle (or `vlexport engines BUNDLE`)")
    return entry


SOURCE_SUFFIX = ".source.sha256"


def _source_record(part: dict) -> str:
    """engines/NAME.engine.source.sha256: what build.sh records of the ONNX each engine was built from."""
    return part["file"] + SOURCE_SUFFIX


def _source_records(bundle_dir: Path, parts: dict) -> str:
    """Lines that end build.sh: `sha256sum` of each part's ONNX and external data, which `--adopt` compares with
    the bundle's, so that engines built from another bundle's ONNX are not adopted."""
    import shlex

    lines = ["# Record the ONNX each engine was built from: `vlexport engines . --adopt` checks it."]
    for p in parts.values():
        files = [p["onnx"]] + ([p["onnx"] + ".data"] if (bundle_dir / (p["onnx"] + ".data")).is_file() else [])
        lines.append(f"sha256sum {' '.join(shlex.quote(f) for f in files)} > {shlex.quote(_source_record(p))}")
    return "\n".join(lines) + "\n"


def _expected_sources(bundle_dir: Path, manifest: dict, onnx_rel: str) -> dict[str, str | None]:
    """The bundle's digests of one ONNX part and its external data: from the sealed table (checked when the
    manifest was read), or hashed here for a bundle still being written."""
    files = manifest.get("files") or {}
    data_rel = onnx_rel + ".data"

    def digest(rel: str) -> str | None:
        if rel in files:
            return files[rel]["sha256"]
        path = bundle_file(bundle_dir, rel)
        return sha256_file(path) if path.is_file() else None

    return {"onnx_sha256": digest(onnx_rel), "onnx_data_sha256": digest(data_rel)}


def open_engines(bundle_dir: Path, manifest: dict) -> dict:
    """A TensorRTRunner per part, each engine checked first: built (status), its metadata present, built from this
    bundle's ONNX (graph and weights), and by this TensorRT version on this GPU."""
    from .backends.tensorrt import TensorRTRunner

    bundle_dir = Path(bundle_dir)
    engines = manifest.get("engines")
    if not engines or engines.get("status") != "built":
        why = "it has no TensorRT target" if not engines else f"its engines are not built yet ({engines.get('reason')})"
        raise VlexportError(
            f"bundle '{bundle_dir}' cannot run on TensorRT: {why}; on the device run `vlexport engines {bundle_dir}` first"
        )
    runners = {}
    for name, part in engines["parts"].items():
        engine = bundle_file(bundle_dir, part["file"], f"engines.parts.{name}.file")
        expected = _expected_sources(bundle_dir, manifest, part["onnx"])
        runners[name] = TensorRTRunner(engine, source=expected)
    return runners


def _profiles(part: dict) -> list[dict]:
    return [{k: tuple(tuple(s) for s in v) for k, v in p.items()} for p in part["profiles"]]


def _build_all(bundle_dir: Path, parts: dict, target: Target, log) -> None:
    from .backends.tensorrt import build_engine

    for name, p in parts.items():
        log(f"building TensorRT engine for {name} ({p['precision']})")
        build_engine(
            bundle_file(bundle_dir, p["onnx"]), bundle_file(bundle_dir, p["file"]), p["precision"], _profiles(p),
            optimization_level=target.builder.get("optimization_level", 3),
            workspace_bytes=int(target.builder.get("workspace_gb", 4) * 1024**3),
            timing_cache_path=bundle_file(bundle_dir, "engines/timing.cache"),
            dla_core=p["dla_core"], log=log,
        )


def build_engines_on_device(bundle_dir: Path, adopt: bool, log: Callable[[str], None]) -> dict:
    """`vlexport engines BUNDLE`: build (or, with adopt, record engines that build.sh made) and update the manifest."""
    from .backends.tensorrt import TensorRTUnavailable
    from .bundle import read_manifest, write_manifest

    bundle_dir = Path(bundle_dir)
    # What engines/build.sh (or an earlier, interrupted `vlexport engines`) writes is not in the sealed table yet.
    peek = read_manifest(bundle_dir, verify_files=False)
    entry = peek.get("engines")
    if not entry:
        raise VlexportError(f"bundle '{bundle_dir}' was built for target '{peek['target']['name']}', which has no "
                            "TensorRT engines; rebuild it with a TensorRT --target such as jetson-orin")
    outputs = {rel for p in entry["parts"].values()
               for rel in (p["file"], p["file"] + ".json", _source_record(p))}
    outputs.add(entry.get("timing_cache") or "engines/timing.cache")
    _remove_temporaries(bundle_dir / "engines", log)
    manifest = read_manifest(bundle_dir, allow_unlisted=outputs)
    entry = manifest["engines"]
    target = Target.from_dict(manifest["target"])
    reason = device_mismatch(target)
    if reason is not None:
        from .backends.tensorrt import tensorrt_available

        if not tensorrt_available()[0]:
            raise TensorRTUnavailable(f"cannot build engines for '{target.name}' here: {reason}")
        raise VlexportError(f"cannot build or adopt engines for target '{target.name}' here: {reason}; run "
                            f"`vlexport engines` on the {target.device}")
    if adopt:
        missing = [p["file"] for p in entry["parts"].values() if not bundle_file(bundle_dir, p["file"]).is_file()]
        if missing:
            raise VlexportError(f"engines not found: {', '.join(missing)}; run `bash engines/build.sh` first")
        _adopt_metadata(bundle_dir, manifest, entry["parts"])
    else:
        _build_all(bundle_dir, entry["parts"], target, log)
    entry["status"], entry["reason"] = "built", None
    manifest["engines"] = entry
    return write_manifest(bundle_dir, manifest)  # re-sealed: one atomic rename of manifest.json


def _remove_temporaries(engines_dir: Path, log: Callable[[str], None]) -> None:
    """Temporary files of an interrupted engine or metadata write (files.atomic_write_bytes' `.NAME.*.tmp`)."""
    if not engines_dir.is_dir():
        return
    for f in engines_dir.iterdir():
        if f.name.startswith(".") and f.name.endswith(".tmp") and f.is_file() and not f.is_symlink():
            f.unlink()
            log(f"removed '{f}', left by an interrupted engine build")


def _read_source_record(bundle_dir: Path, part: dict) -> dict[str, str | None]:
    """The digests build.sh recorded (`sha256sum` lines: HASH, two spaces, FILE) for one engine's ONNX."""
    rel = _source_record(part)
    path = bundle_file(bundle_dir, rel)
    fix = ("run `bash engines/build.sh` again (it records them after building), then `vlexport engines . --adopt`; "
           "or build the engines with `vlexport engines .`")
    if not path.is_file():
        raise VlexportError(f"'{rel}' is missing: it records which ONNX built '{part['file']}', and an engine whose "
                            f"source is unknown is not adopted; {fix}")
    digests: dict[str, str] = {}
    for line in path.read_text(errors="replace").splitlines():
        fields = line.strip().split(maxsplit=1)
        if len(fields) == 2:
            digests[fields[1].lstrip("*")] = fields[0].lower()
    if part["onnx"] not in digests:
        raise VlexportError(f"'{rel}' has no sha256 line for '{part['onnx']}'; {fix}")
    return {"onnx_sha256": digests[part["onnx"]], "onnx_data_sha256": digests.get(part["onnx"] + ".data")}


def _adopt_metadata(bundle_dir: Path, manifest: dict, parts: dict) -> None:
    """Engines made by build.sh carry no metadata: check that each was built from this bundle's ONNX (build.sh's
    sha256sum record) and record the TensorRT version, GPU and ONNX digests, as build_engine does."""
    import tensorrt as trt
    import torch

    from .backends.tensorrt import check_engine_source, device_capability, write_engine_metadata

    for p in parts.values():
        expected = _expected_sources(bundle_dir, manifest, p["onnx"])
        recorded = _read_source_record(bundle_dir, p)
        check_engine_source({**recorded, "onnx": p["onnx"]}, expected, p["file"])
        meta = {"tensorrt_version": trt.__version__, "device_name": torch.cuda.get_device_name(),
                "compute_capability": device_capability(), "precision": p["precision"], "profiles": p["profiles"],
                "dla_core": p["dla_core"], "onnx": p["onnx"], **expected, "built_by": "trtexec (engines/build.sh)"}
        write_engine_metadata(bundle_file(bundle_dir, p["file"]), meta)

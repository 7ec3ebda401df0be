"""The exact trtexec commands that build a bundle's engines on the device (engines/build.sh).

Engines must be built on the device that runs them (no cross-building to Jetson), so a build on any other machine
writes this plan instead. Flags are limited to trtexec's documented options for the target's TensorRT version.
"""

from __future__ import annotations

import shlex

from .profiles import Profile

# Options documented for each trtexec version (../shared/notes/tensorrt.md). The plan uses no others.
COMMON_OPTIONS = {
    "--onnx", "--saveEngine", "--minShapes", "--optShapes", "--maxShapes", "--fp16", "--int8", "--best",
    "--timingCacheFile", "--builderOptimizationLevel", "--memPoolSize", "--useDLACore", "--allowGPUFallback",
    "--profilingVerbosity", "--skipInference", "--versionCompatible", "--refit", "--verbose",
}
TRTEXEC_OPTIONS = {
    "8.6": COMMON_OPTIONS,
    "10": COMMON_OPTIONS | {"--bf16", "--int4", "--stronglyTyped", "--stripWeights", "--profile"},
}


def options_for(version: str) -> set[str]:
    return TRTEXEC_OPTIONS["10"] if int(version.split(".")[0]) >= 10 else TRTEXEC_OPTIONS["8.6"]


def _shape_spec(profile: Profile, which: int) -> str:
    # Our input names hold only letters, digits, '_' and '.', so they need no quoting inside a trtexec shape spec
    # (quotes are for names with ':' or ',').
    return ",".join(f"{name}:" + "x".join(str(d) for d in shapes[which]) for name, shapes in profile.items())


def _merge(profiles: list[Profile]) -> Profile:
    """One profile spanning several (trtexec 8.6 builds one profile only)."""
    merged: Profile = {}
    for name in profiles[0]:
        mins = [min(p[name][0][i] for p in profiles) for i in range(len(profiles[0][name][0]))]
        maxs = [max(p[name][2][i] for p in profiles) for i in range(len(profiles[0][name][0]))]
        opt = profiles[-1][name][1]
        merged[name] = (tuple(mins), tuple(max(lo, min(o, hi)) for lo, o, hi in zip(mins, opt, maxs)), tuple(maxs))
    return merged


def part_command(part: str, onnx_file: str, precision: str, profiles: list[Profile], version: str, builder: dict,
                 dla: bool) -> list[str]:
    """argv of one trtexec invocation, run from the bundle directory."""
    ten = int(version.split(".")[0]) >= 10
    if not ten and len(profiles) > 1:
        profiles = [_merge(profiles)]
    argv = ["trtexec", f"--onnx={onnx_file}", f"--saveEngine=engines/{part}.engine"]
    for i, profile in enumerate(profiles):
        if ten and len(profiles) > 1:
            argv.append(f"--profile={i}")
        argv += [f"--minShapes={_shape_spec(profile, 0)}", f"--optShapes={_shape_spec(profile, 1)}",
                 f"--maxShapes={_shape_spec(profile, 2)}"]
    if precision == "fp16":
        argv.append("--fp16")
    elif precision == "int8":
        argv += ["--int8", "--fp16"]  # explicit Q/DQ graph; FP16 for the layers left unquantized
    elif precision == "int4":
        if not ten:
            raise ValueError(f"INT4 engines need TensorRT 10 (trtexec --int4), not {version}")
        # Blocked INT4 DequantizeLinear on the weights (weight-only); FP16 activations and unquantized layers.
        argv += ["--int4", "--fp16"]
    workspace_mib = int(builder.get("workspace_gb", 4) * 1024)
    argv.append(f"--memPoolSize=workspace:{workspace_mib}M" if ten else f"--memPoolSize=workspace:{workspace_mib}")
    argv += ["--timingCacheFile=engines/timing.cache",
             f"--builderOptimizationLevel={builder.get('optimization_level', 3)}",
             "--skipInference"]
    if dla:
        argv += ["--useDLACore=0", "--allowGPUFallback"]
    return argv


def build_script(commands: dict[str, list[str]], target_name: str, versions: tuple, reason: str) -> str:
    lines = [
        "#!/usr/bin/env bash",
        f"# Builds this bundle's TensorRT engines for target '{target_name}' (TensorRT {', '.join(versions)}).",
        f"# Not built where the bundle was made: {reason}",
        "# Run on the device, from the bundle directory: bash engines/build.sh",
        "# Then record them in the manifest: vlexport engines . --adopt",
        "set -euo pipefail",
        'cd "$(dirname "$0")/.."',
        'TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"',
    ]
    for part, argv in commands.items():
        lines.append(f"echo 'building {part} engine'")
        lines.append('"$TRTEXEC" ' + " ".join(shlex.quote(a) for a in argv[1:]))
    return "\n".join(lines) + "\n"

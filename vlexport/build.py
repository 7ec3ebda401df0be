"""`vlexport build`: base + adapters -> merged fp32 model -> three ONNX parts (each checked) -> bundle.

`build` validates every input first (`plan_build`, no expensive work), then runs `STAGES` in order over one
`BuildState` inside a temporary directory that becomes the bundle only when every stage has passed. Each stage is a
plain function of the state; `stage(state, name)` records its seconds and peak RSS for the manifest."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .adapters import merge_adapters
from .bundle import atomic_directory, check_output_path, onnx_io, write_manifest
from .errors import ParityError, VlexportError
from .export import ort_native
from .export.onnx import add_slot_defaults, check_part, export_part, part_specs
from .model import EXPORT_ATTENTION, check_base_dir, facts_from_config, fingerprint, load_llava
from .parity.verify import check_first_layers, check_oracle_option
from .plan import BYTES, check_fits, parameter_counts, plan_memory
from .precision import Int4Options, Int8Options, int4_options, int8_options
from .progress import track
from .target import Target, load_target
from .export.parts import feature_indices
from . import lora_slots
from .tasks import (load_bank, lora_geometry, lora_packs, merged_here, merged_parts, rescale_lora_packs, slot_geometry,
                    write_packs)


def read_text_assets(base: Path) -> dict:
    """Tokenizer, image preprocessing and chat template of a base directory, as the runtime needs them."""
    from .preprocess import ImageSpec

    base = Path(base)
    tok_cfg = json.loads((base / "tokenizer_config.json").read_text()) if (base / "tokenizer_config.json").exists() else {}
    proc_cfg = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (base / name).exists():
            proc_cfg.update(json.loads((base / name).read_text()))
    if not proc_cfg:
        raise VlexportError(f"--base '{base}' has no processor_config.json or preprocessor_config.json (image preprocessing)")
    template = None
    if (base / "chat_template.jinja").exists():
        template = (base / "chat_template.jinja").read_text()
    elif (base / "chat_template.json").exists():
        template = json.loads((base / "chat_template.json").read_text()).get("chat_template")
    else:
        template = proc_cfg.get("chat_template") or tok_cfg.get("chat_template")

    def token_str(value):
        return value.get("content") if isinstance(value, dict) else value

    extra = tok_cfg.get("extra_special_tokens") or {}
    image_token = proc_cfg.get("image_token") or (extra.get("image_token") if isinstance(extra, dict) else None) or "<image>"
    # LLaVA-NeXT: the any-resolution tiling around the per-tile steps (vlexport/anyres.py).
    kind = (proc_cfg.get("image_processor") or proc_cfg).get("image_processor_type", "")
    anyres = None
    if "LlavaNext" in kind:
        from .anyres import AnyResSpec

        anyres = AnyResSpec.from_processor_config(proc_cfg)
    return {
        "image_spec": anyres.tile_spec if anyres else ImageSpec.from_processor_config(proc_cfg),
        "anyres_spec": anyres,
        "chat_template": template,
        "image_token": token_str(image_token),
        "bos_token": token_str(tok_cfg.get("bos_token")),
        "eos_token": token_str(tok_cfg.get("eos_token")),
    }


def _copy_tokenizer(base: Path, out: Path) -> None:
    if (base / "tokenizer.json").exists():
        shutil.copy2(base / "tokenizer.json", out / "tokenizer.json")
        return
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(base))
        tok.backend_tokenizer.save(str(out / "tokenizer.json"))
    except Exception as e:  # sentencepiece conversion can fail in many ways; report it as an input problem
        raise VlexportError(
            f"--base '{base}' has no tokenizer.json and its tokenizer could not be converted ({e}); save the "
            "tokenizer with a fast tokenizer (tokenizer.json) first"
        ) from None


def _eos_ids(base: Path, facts) -> list[int]:
    eos = None
    gen = base / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
    if eos is None:
        eos = facts.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def _peak_rss_mb() -> float:
    """The process's peak RSS so far (a high-water mark: a stage's figure includes the stages before it)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float | None:
    """The process's RSS now (Linux), after freed heap memory is handed back to the system (glibc keeps freed
    blocks for reuse, and a 7B's export leaves gigabytes of them that the next stage's peak would stack on)."""
    import ctypes
    import ctypes.util

    libc = ctypes.util.find_library("c")
    if libc:
        try:
            ctypes.CDLL(libc).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    line = next((l for l in status.splitlines() if l.startswith("VmRSS:")), None)
    return int(line.split()[1]) / 1024 if line else None


def host_memory_bytes() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_export_dtype(config: dict, prof, int4: Int4Options | None = None) -> tuple[str, str | None]:
    """fp32, unless an fp32 copy of the model would not fit twice in this machine's memory (the export check holds
    the model and an ONNX Runtime session at once). Then parts that ship in FP16 are exported straight from the
    checkpoint's weights in fp16, and no fp32 copy is ever made; an INT4 decoder is quantized from those fp16
    weights when its options need no calibration run (uncalibrated RTN on ONNX Runtime). Returns the dtype and,
    for fp16, the reason."""
    from .precision.int4 import calibration_options

    fp32_bytes = 4 * sum(parameter_counts(config).values())
    memory = host_memory_bytes()
    if 2 * fp32_bytes <= memory:
        return "float32", None
    too_big = (f"an fp32 copy of this model ({fp32_bytes / 1e9:.1f} GB) does not fit twice in this machine's memory "
               f"({memory / 1e9:.1f} GB)")
    others = {k: v for k, v in prof.precision.items() if v not in ("fp16", "int4")}
    if others:
        # INT8 needs its calibration run on an fp32 export, and FP32 parts the fp32 copy itself.
        said = ", ".join(f"{k}={v}" for k, v in others.items())
        raise VlexportError(
            f"{too_big}, and only FP16 and uncalibrated INT4 parts export from fp16 weights (target '{prof.name}' "
            f"asks for {said}); use --precision {','.join(f'{k}=fp16' for k in others)}, --target cpu-fp16 or "
            "another target whose parts are fp16 (or int4 decoder), or build on a machine with more memory"
        )
    if "int4" in prof.precision.values():
        int4 = int4 or Int4Options()
        needs = calibration_options(int4)
        if prof.backend != "onnxruntime":
            raise VlexportError(
                f"{too_big}, and the INT4 parts of '{prof.name}' ({prof.backend}, blocked DequantizeLinear) are lowered "
                "after a calibration run on an fp32 export; build them on a machine with more memory, or use an "
                "onnxruntime target with --int4 algo=rtn,fallback=false,awq=false"
            )
        if needs:
            raise VlexportError(
                f"{too_big}, so the decoder exports in fp16 and its INT4 options {', '.join(needs)} would need the "
                "calibration run (an ONNX Runtime session of the whole FP16 decoder, and AWQ's activations); use "
                "--int4 algo=rtn,fallback=false,awq=false (RTN from the weights alone), or build on a machine with "
                "more memory"
            )
    return "float16", (f"an fp32 copy of the model ({fp32_bytes / 1e9:.1f} GB) would not fit twice in this "
                       f"machine's {memory / 1e9:.1f} GB, so the parts are exported from fp16 weights"
                       + (" (INT4: uncalibrated RTN from them)" if "int4" in prof.precision.values() else ""))


def check_buildable(target, int8) -> None:
    """Precisions this version can produce for the target's backend."""
    if target.precision["embed"] == "int8":
        raise VlexportError(
            f"target '{target.name}' asks for embed=int8: the embedding part is a table lookup (one row per token), "
            "which INT8 would make smaller but not faster, and vlexport does not build it; use embed=fp16 or fp32"
        )
    if target.backend == "tensorrt" and target.precision["decoder"] == "int8" and int8.decoder == "weight-only":
        raise VlexportError(
            f"target '{target.name}': INT8 weight-only decoders are built for ONNX Runtime (MatMulNBits) only; "
            "for TensorRT use --int8 decoder=w8a8 (the calibrated Q/DQ graph)"
        )
    if target.backend == "tensorrt" and int8.form == "dynamic":
        raise VlexportError(
            f"target '{target.name}': TensorRT cannot import dynamic INT8 (DynamicQuantizeLinear, MatMulInteger); "
            "drop --int8 form=dynamic (TensorRT targets use the Q/DQ graph)"
        )




@dataclass
class BuildState:
    """What the stages share: the validated inputs (set by plan_build), then what each stage produces."""

    base: Path
    out: Path
    force: bool
    prof: Target
    int8_opts: Int8Options
    calib: Path | None
    facts: Any
    assets: dict
    loaded: list
    tasks: dict
    memory: Any
    dtype: str
    low_memory: str | None
    verify: bool
    verify_layers: int | None
    oracle: str
    strict_precision: bool
    log: Callable[[str], None]
    stages: dict = field(default_factory=dict)
    int4_opts: Int4Options = field(default_factory=Int4Options)
    awq: dict | None = None  # AWQ scales folded into the norms (INT4 decoder), as SmoothQuant's are for INT8
    prequantized: dict | None = None  # the AutoAWQ checkpoint this base was dequantized from, and the re-quant error
    model: Any = None
    slots: dict = field(default_factory=dict)  # bottleneck slot geometry per part (slots.py)
    lora_slots: dict = field(default_factory=dict)  # LoRA slot geometry per part (lora_slots.py)
    lora_packs: dict = field(default_factory=dict)  # per task: its LoRA slot tensors
    smoothing: dict | None = None
    tmp: Path | None = None
    parts: dict = field(default_factory=dict)
    task_parts: dict = field(default_factory=dict)
    task_forms: dict = field(default_factory=dict)  # per task with its own decoder: {"decoder": form}
    manifest: dict = field(default_factory=dict)
    report: dict | None = None

    @property
    def exported_precision(self) -> str:
        return "fp32" if self.dtype == "float32" else "fp16"

    @property
    def export_rel_tol(self) -> float:
        return self.prof.thresholds(self.exported_precision)["export_rel_tol"]


@contextlib.contextmanager
def stage(state: BuildState, name: str):
    """Time a stage; its seconds, the process's peak RSS so far and its RSS after it go into the manifest's
    build.stages."""
    t = time.perf_counter()
    yield
    gc.collect()
    state.stages[name] = {"seconds": time.perf_counter() - t, "peak_rss_mb": _peak_rss_mb(), "rss_mb": _rss_mb()}


def plan_build(base, adapters, out, target, force, adapter_kind, verify, precision, int8, calib, verify_layers,
               oracle, strict_precision, log, int4=None, lora_alpha=None, lora_mode="swappable") -> BuildState:
    """Every check that needs no model: output path, base, target, precisions, calibration data, adapters, memory."""
    base, out = Path(base), Path(out)
    check_output_path(out, force)
    config = check_base_dir(base)
    prof = load_target(target).with_precision(precision or {})
    int8_opts = int8_options(prof.int8, int8)
    check_buildable(prof, int8_opts)
    int4_opts = int4_options(prof.int4, int4)
    from .precision.int4 import check_int4_buildable
    from .prequantized import check_prequantized, import_awq

    check_int4_buildable(prof, int4_opts)
    prequantized = None
    if check_prequantized(base):  # AutoAWQ GEMM: dequantized into the cache; the build goes on from that copy
        base, prequantized = import_awq(base, int4_opts.block_for(prof.backend), int4_opts.symmetric, log)
        config = check_base_dir(base)
    if verify:
        check_oracle_option(oracle)
    if {"int8", "int4"} & set(prof.precision.values()):
        from .precision.calibration import calib_cases

        calib_cases(calib)  # a bad calibration folder fails now, not after the export
    facts = facts_from_config(config)
    if facts.anyres is not None and prof.backend == "tensorrt":
        raise VlexportError(f"target '{prof.name}' is TensorRT: LLaVA-NeXT bases build for ONNX Runtime targets only "
                            "for now (their vision engine needs profiles over the tile count, up to "
                            f"{facts.anyres.max_tiles()} tiles per image, that vlexport does not plan yet); use --target cpu")
    if facts.anyres is not None and {"int8", "int4"} & set(prof.precision.values()):
        raise VlexportError(f"target '{prof.name}' asks for {', '.join(f'{k}={v}' for k, v in prof.precision.items())}: "
                            "LLaVA-NeXT bases build in FP32 or FP16 only for now (INT8/INT4 calibration does not tile "
                            "images yet); use --target cpu or cpu-fp16, or --precision with fp32/fp16 parts")
    assets = read_text_assets(base)
    loaded, tasks = load_bank(adapters, adapter_kind, lora_alpha, lora_mode, log)
    check_slot_sizes(tasks, prof)
    memory = plan_memory(config, prof, adapter_bytes=sum(task_bytes(tasks, config, prof).values()), int4=int4_opts)
    check_fits(memory, config, prof)
    dtype, low_memory = choose_export_dtype(config, prof, int4_opts)
    if low_memory:
        log(low_memory)
        if tasks:
            raise VlexportError("bank tasks are not built for models exported in fp16 to save memory yet; build the "
                                "model without NAME=PATH adapters, or on a machine with more memory")
        if verify and verify_layers is None:
            verify_layers = min(2, facts.num_layers)
            log(f"the fp32 PyTorch reference would not fit either: verify compares the first {verify_layers} decoder layers")
    check_first_layers(verify_layers, facts.num_layers, bool(tasks), "--layers")
    return BuildState(base=base, out=out, force=force, prof=prof, int8_opts=int8_opts, calib=calib, facts=facts,
                      assets=assets, loaded=loaded, tasks=tasks, memory=memory, dtype=dtype, low_memory=low_memory,
                      verify=verify, verify_layers=verify_layers, oracle=oracle, strict_precision=strict_precision,
                      log=log, int4_opts=int4_opts, prequantized=prequantized)


def task_bytes(tasks: dict, config: dict, prof: Target) -> dict[str, int]:
    """What each bank task adds to memory. Fed at run time: the adapter's own bytes (a swappable LoRA's A and B,
    a bottleneck's weights, a prefix's KV). A task with its own merged LoRA/BitFit loads its own copies of the
    parts that adapter changes."""
    counts = parameter_counts(config)
    return {name: sum(a.nbytes for a in task if not merged_here(a))
            + sum(counts[part] * BYTES[prof.precision[part]] for part in merged_parts(task))
            for name, task in tasks.items()}


def check_slot_sizes(tasks: dict, prof: Target) -> None:
    """TensorRT engines take adapter slots up to the profile's largest: a task's LoRA rank (its LoRAs' ranks add up)
    up to shapes.lora_rank, a bottleneck up to shapes.adapter_width. Refused now, not when an engine first runs."""
    if prof.backend != "tensorrt":
        return
    for name, adapters in tasks.items():
        rank = sum(max(a.describe()["ranks"], default=0) for a in adapters if getattr(a, "swappable", False))
        if rank > prof.shapes["lora_rank"]:
            raise VlexportError(f"task '{name}': its LoRA rank {rank} is over target '{prof.name}' shapes.lora_rank = "
                                f"{prof.shapes['lora_rank']}, the largest its TensorRT profiles take; raise "
                                "shapes.lora_rank in the target profile, or build with --lora-mode merged")
        for a in adapters:
            width = max(a.describe()["widths"], default=0) if a.kind == "bottleneck" else 0
            if width > prof.shapes["adapter_width"]:
                raise VlexportError(f"task '{name}': bottleneck '{a.path}' is {width} wide, over target '{prof.name}' "
                                    f"shapes.adapter_width = {prof.shapes['adapter_width']}; raise shapes.adapter_width "
                                    "in the target profile")


def load_and_merge(state: BuildState) -> None:
    with stage(state, "load_and_merge"):
        state.model = model = load_llava(state.base, dtype=state.dtype, attention=EXPORT_ATTENTION[state.dtype])
        merge_adapters(model, state.loaded, state.log)
        for task_adapters in state.tasks.values():
            for a in task_adapters:
                a.validate(model)
        facts = state.facts
        vision_layers = max(feature_indices(facts.vision_feature_layer, model.config.vision_config.num_hidden_layers))
        state.slots = slot_geometry(state.tasks, facts, vision_layers, model.config.vision_config.hidden_size)
        state.lora_slots = lora_geometry(state.tasks, model, {"vision": vision_layers, "decoder": facts.num_layers})
        state.lora_packs = lora_packs(state.tasks, model, state.lora_slots)
    state.log(f"merged {len(state.loaded)} adapter(s) into the base in {state.dtype}")


def apply_awq(state: BuildState) -> None:
    """AWQ's activation-aware scales for an INT4 decoder, searched on the calibration set and folded into the norms
    (precision/awq.py); cached per base, adapters, set and INT4 options."""
    if state.prof.precision.get("decoder") != "int4" or not state.int4_opts.awq:
        return
    from .precision import awq

    with stage(state, "awq"):
        state.awq = awq.search_cached(state.model, state.base, state.loaded, state.calib, state.assets,
                                      state.int4_opts.block_for(state.prof.backend), state.int4_opts.symmetric, state.log,
                                      lm_head_bits=4 if state.int4_opts.lm_head == "int4" else 8,
                                      int8_activations=state.prof.backend != "tensorrt")
        record: dict = {}
        n = _apply_awq(state.model, state.awq, record)
        _follow_rescaled_linears(state, record)
    state.log(f"AWQ: {n} norm/linear groups in the decoder rescaled (scales searched on the calibration set)")


def _apply_awq(model, scales: dict | None, record: dict | None = None) -> int:
    from .precision import awq

    return awq.fold(model, scales["scales"], record) if scales else 0


def _follow_rescaled_linears(state: BuildState, record: dict) -> None:
    """SmoothQuant and AWQ rescale a linear's input (x / s, W * s) and AWQ some outputs (y / s): the LoRA slot packs,
    computed on the unscaled model, follow (a * s per input channel, b / s per output), so that every task still
    adds exactly its delta. DoRA's per-output scale is unchanged by either."""
    if not state.lora_packs or not record:
        return
    names = {module: name for name, module in state.model.named_modules()}
    rescale_lora_packs(state.lora_packs, {names[m]: scales for m, scales in record.items()})


def apply_smoothquant(state: BuildState) -> None:
    """SmoothQuant's channel maxima on the calibration set (cached per base, adapters and set), folded into the model."""
    if not state.int8_opts.smoothed_parts(state.prof.precision):
        return
    with stage(state, "smoothquant"):
        state.smoothing = _smoothquant_maxima(state)
        record: dict = {}
        n = _apply_smoothing(state.model, state.smoothing, record)
        _follow_rescaled_linears(state, record)
    state.log(f"SmoothQuant (alpha {state.smoothing['alpha']}): {n} norm/linear groups in "
              f"{', '.join(state.smoothing['parts'])} rescaled")


def _smoothquant_maxima(state: BuildState) -> dict:
    import hashlib
    import io

    import numpy as np

    from .files import atomic_write_bytes
    from .precision import calibration, smoothquant

    parts = state.int8_opts.smoothed_parts(state.prof.precision)
    key = hashlib.sha256("|".join([fingerprint(state.base), *[a.sha256 for a in state.loaded],
                                   calibration.calib_fingerprint(state.calib), *sorted(parts)]).encode()).hexdigest()[:24]
    path = calibration.cache_root() / "smoothquant" / f"{key}.npz"
    maxima = _read_maxima_cache(path, state.log)
    if maxima is None:
        from transformers import AutoProcessor

        from .runtime import render_chat_prompt

        cases = calibration.calib_cases(state.calib)
        assets = state.assets

        def chat(prompt):
            return render_chat_prompt(assets["chat_template"], prompt, assets["bos_token"], assets["eos_token"])

        texts = [calibration.prompt_text(c, chat) for c in cases]
        with track(state.log, "SmoothQuant channel maxima"):
            maxima = smoothquant.activation_maxima(state.model, AutoProcessor.from_pretrained(str(state.base)), cases,
                                                   texts, parts)
        buffer = io.BytesIO()
        np.savez(buffer, **maxima)
        atomic_write_bytes(path, buffer.getvalue())  # a killed build never leaves half a cache
        state.log(f"SmoothQuant: channel maxima measured on {len(cases)} calibration cases, saved to {path}")
    return {"parts": sorted(parts), "alpha": state.int8_opts.smoothquant_alpha, "maxima": maxima}


def _read_maxima_cache(path: Path, log) -> dict | None:
    """The cached channel maxima, or None when there are none or the file is truncated or corrupt (then rebuilt)."""
    import zipfile

    import numpy as np

    if not path.exists():
        return None
    try:
        with np.load(path) as cached:
            maxima = {k: cached[k] for k in cached.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        log(f"SmoothQuant: the cache {path} is unreadable ({type(e).__name__}); measuring again")
        return None
    log(f"SmoothQuant: reusing channel maxima from {path}")
    return maxima


def _apply_smoothing(model, smoothing: dict | None, record: dict | None = None) -> int:
    from .precision import smoothquant

    if not smoothing:
        return 0
    return smoothquant.smooth(model, smoothing["maxima"], smoothing["alpha"], set(smoothing["parts"]), record)


def _export_checked(state: BuildState, spec, path: Path, first_layers: int | None = None) -> dict:
    """Export one part, add its slot defaults, and check ONNX Runtime against torch on other shapes."""
    with track(state.log, f"export {spec.name}", total=2) as advance:
        advance(0, "torch.onnx.export")
        export_part(spec, path)
        if state.prof.backend == "onnxruntime":
            # Optional slot inputs for ONNX Runtime hosts. Not for TensorRT: its ONNX parser treats an input that
            # has an initializer as a constant, which would freeze the slot.
            _add_slot_defaults(state, spec.name, path)
        advance(1, "check: ONNX Runtime vs torch")
        check = check_part(spec, path, state.export_rel_tol, first_layers=first_layers)
        advance(1, "checked")
    return check


def _add_slot_defaults(state: BuildState, part: str, path: Path) -> None:
    empty = lora_slots.no_adapter_feed(state.slots, state.lora_slots, part)
    if empty:
        add_slot_defaults(path, empty)


def export_parts(state: BuildState) -> None:
    exported = state.exported_precision
    specs = part_specs(state.model, state.facts, frozenset(state.slots), state.lora_slots)
    order = [spec.name for spec in specs]
    native_from_fp16 = _native_from_fp16(state)
    if native_from_fp16:
        # The decoder first: once written, its layers are dropped (_native_decoder), and vision and embed are
        # exported beside a model that no longer holds them (13 GB less on a 7B).
        specs = sorted(specs, key=lambda spec: spec.name != "decoder")
    for spec in specs:
        with stage(state, f"export_{spec.name}"):
            t = time.perf_counter()
            path = state.tmp / f"{spec.name}.onnx"
            if spec.name == "decoder" and native_from_fp16:
                # Straight from the fp16 weights in the ORT-native form: tracing the whole decoder for a portable
                # graph that would not ship was the build's memory peak (16.4 GB on a 7B).
                state.log("decoder: no portable export (the ORT-native form is built from the fp16 weights)")
                check = _native_decoder(state, state.model, spec.module, path, "decoder")
                state.parts["decoder"] = {"file": path.name, "precision": exported, **onnx_io(path),
                                          "form": ort_native.FORM, "export_check": {**check, "portable": None}}
                state.log(f"decoder: ORT-native form, ONNX Runtime vs torch max rel. error "
                          f"{check['max_rel_error']:.2e} on its first {check['first_layers']} layers")
                continue
            # A decoder too large to hold twice is checked on its first layers (their K/V outputs).
            first = 2 if state.low_memory and spec.name == "decoder" else None
            check = _export_checked(state, spec, path, first_layers=first)
            # Exported FP32; lower_precision lowers them for ONNX Runtime, and makes TensorRT's INT8 Q/DQ graphs.
            # TensorRT lowers the rest to FP16 when it builds the engines.
            state.parts[spec.name] = {"file": path.name, "precision": exported, **onnx_io(path), "export_check": check}
        state.log(f"exported {spec.name} ({time.perf_counter() - t:.1f}s), ONNX Runtime vs torch max rel. error "
                  f"{check['max_rel_error']:.2e}")
    state.parts = {name: state.parts[name] for name in order if name in state.parts}


def _native_decoder(state: BuildState, model, module, path: Path, label: str) -> dict | None:
    """ONNX Runtime targets: the decoder at `path` rebuilt in the ORT-native form (export/ort_native.py) from the
    same merged weights, and checked against torch. Returns that check, or None where the portable graph stays."""
    if state.prof.backend != "onnxruntime":
        return None  # TensorRT cannot import the contrib ops
    if state.prof.precision.get("decoder") == "int8" and state.int8_opts.form == "qdq":
        # --int8 form=qdq asks for TensorRT's Q/DQ graph (to check or ship it), which contrib ops would spoil.
        state.log(f"{label}: the portable form ships (int8 form=qdq is TensorRT's graph)")
        return None
    fp16_products = _native_from_fp16(state)
    reason = ort_native.unsupported_reason(model, fp16_products=fp16_products)
    if reason:
        state.log(f"{label}: the portable form ships ({reason})")
        return None
    slots = "decoder" in state.slots
    lora = state.lora_slots.get("decoder")
    with track(state.log, f"{label}: ORT-native form", total=2) as advance:
        ort_native.write_native_decoder(model, path, slots, lora=lora, fp16_products=fp16_products)
        _add_slot_defaults(state, "decoder", path)
        advance(1, "check: ONNX Runtime vs torch")
        if fp16_products:  # not runnable before its INT4 lowering: its first layers are checked on their own
            # Nothing else needs the decoder's layers (vision and embed use none, verify loads its own reference,
            # and the model is dropped after the exports): all but the checked ones go now, 12 GB on a 7B.
            layers = model.model.language_model.layers
            del layers[ort_native.CHECK_LAYERS:]
            gc.collect()
            check = ort_native.check_native_first_layers(model, module, path.parent, state.export_rel_tol, slots,
                                                         label, lora=lora)
        else:
            check = ort_native.check_native_decoder(module, path, state.export_rel_tol, slots, label, lora=lora)
        advance(1, "checked")
    return check


def _native_from_fp16(state: BuildState) -> bool:
    """A model loaded in fp16 to save memory (choose_export_dtype) whose decoder ships at INT4 on ONNX Runtime takes
    the native form from its fp16 weights: the products keep them until precision.int4 quantizes them (uncalibrated
    RTN, which choose_export_dtype requires there)."""
    import torch

    model = state.model
    return (bool(state.low_memory) and state.prof.backend == "onnxruntime"
            and state.prof.precision.get("decoder") == "int4" and model is not None
            and model.lm_head.weight.dtype == torch.float16
            and ort_native.unsupported_reason(model, fp16_products=True) is None)


def export_native_forms(state: BuildState) -> None:
    """The decoder's ORT-native form replaces the portable graph in ONNX Runtime bundles; the manifest records each
    part's form (parts.NAME.form). Then the merged model is released."""
    for name, entry in state.parts.items():
        entry.setdefault("form", "portable")
    decoder = state.parts.get("decoder")
    if decoder is not None and state.model is not None and decoder["form"] != ort_native.FORM:
        with stage(state, "export_native_decoder"):
            from .export.parts import DecoderPart

            path = state.tmp / decoder["file"]
            module = DecoderPart(state.model, "decoder" in state.slots, state.lora_slots.get("decoder"))
            check = _native_decoder(state, state.model, module, path, "decoder")
            if check is not None:
                decoder.update(form=ort_native.FORM, **onnx_io(path),
                               export_check={**check, "portable": decoder["export_check"]})
                state.log(f"decoder: ORT-native form, ONNX Runtime vs torch max rel. error {check['max_rel_error']:.2e}")
    state.model = None
    gc.collect()  # a 7B's weights must be gone before verify loads its reference


def export_task_parts(state: BuildState) -> None:
    """Tasks with their own LoRA/BitFit: the parts it changes, exported again with it merged (a copy per task)."""
    for name, task_adapters in state.tasks.items():
        own = [a for a in task_adapters if merged_here(a)]
        if not own:
            continue
        wanted = merged_parts(own)
        with stage(state, f"export_task_{name}"):
            model = load_llava(state.base, attention=EXPORT_ATTENTION["float32"])
            merge_adapters(model, [*state.loaded, *own], state.log)
            _apply_smoothing(model, state.smoothing)  # the base's channel maxima; the fold is exact for any weights
            _apply_awq(model, state.awq)
            for spec in part_specs(model, state.facts, frozenset(state.slots), state.lora_slots):
                if spec.name not in wanted:
                    continue
                path = state.tmp / "tasks" / name / f"{spec.name}.onnx"
                _export_checked(state, spec, path)
                state.task_parts.setdefault(name, {})[spec.name] = path.relative_to(state.tmp).as_posix()
                if spec.name == "decoder":
                    native = _native_decoder(state, model, spec.module, path, f"task {name}: decoder")
                    state.task_forms.setdefault(name, {})["decoder"] = ort_native.FORM if native else "portable"
            del model
        state.log(f"task {name}: exported its own merged {', '.join(wanted)} part(s)")


def write_assets_and_manifest(state: BuildState) -> None:
    """Tokenizer, chat template and task packs into the bundle; the manifest as far as it is known now."""
    tmp, facts, base, assets = state.tmp, state.facts, state.base, state.assets
    _copy_tokenizer(base, tmp)
    spec = assets["image_spec"]
    if assets["chat_template"]:
        (tmp / "chat_template.jinja").write_text(assets["chat_template"])
    state.manifest = {
        "vlexport_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "base": {"path": str(base.resolve()), "fingerprint": fingerprint(base), "model_type": facts.model_type,
                 **({"prequantized": state.prequantized} if state.prequantized else {})},
        "adapters": [a.describe() for a in state.loaded],
        "tasks": write_packs(tmp, state.tasks, facts, state.slots, state.task_parts, state.lora_packs),
        "slots": state.slots,
        "lora_slots": state.lora_slots,
        "target": state.prof.to_dict(),
        "memory_plan": state.memory.to_dict(),
        "parts": state.parts,
        "model": {
            "image_token_id": facts.image_token_id,
            "num_image_tokens": facts.anyres.max_image_tokens()[0] if facts.anyres else facts.num_image_tokens,
            "vocab_size": facts.vocab_size,
            "hidden_size": facts.hidden_size,
            "num_layers": facts.num_layers,
            "num_attention_heads": facts.num_heads,
            "num_kv_heads": facts.num_kv_heads,
            "head_dim": facts.head_dim,
            "image_size": facts.image_size,
            "max_position_embeddings": facts.max_position_embeddings,
            **({"anyres": _anyres_manifest(facts, assets)} if facts.anyres is not None else {}),
        },
        "tokenizer": {
            "file": "tokenizer.json",
            "image_token": assets["image_token"],
            "bos_token": assets["bos_token"],
            "eos_token": assets["eos_token"],
        },
        "preprocessing": {"image": {k: getattr(spec, k) for k in spec.__dataclass_fields__}},
        "chat_template": {"file": "chat_template.jinja"} if assets["chat_template"] else None,
        "generation": {"eos_token_ids": _eos_ids(base, facts)},
        "build": {"stages": state.stages, "export_dtype": state.dtype,
                  **({"export_dtype_reason": state.low_memory} if state.low_memory else {})},
    }
    for name, forms in state.task_forms.items():  # a task's own decoder has a form too (runtime: decoder_form)
        state.manifest["tasks"][name]["forms"] = forms


def _anyres_manifest(facts, assets: dict) -> dict:
    """LLaVA-NeXT: the geometry the runtime needs to tile an image, count its tokens and plan its packing
    (model.num_image_tokens is then the worst case over image sizes)."""
    g, spec = facts.anyres, assets["anyres_spec"]
    if spec is None:
        raise VlexportError("the base is LLaVA-NeXT (config.json model_type 'llava_next') but its processor config is "
                            "not a LlavaNextImageProcessor's; save the model's processor with it")
    if tuple(map(tuple, spec.grid_pinpoints)) != g.grid_pinpoints or spec.tile != g.tile:
        raise VlexportError(f"the base's processor config tiles images with image_grid_pinpoints "
                            f"{[list(p) for p in spec.grid_pinpoints]} of {spec.tile} px but config.json has "
                            f"{[list(p) for p in g.grid_pinpoints]} of {g.tile} px; make them agree")
    return {"family": g.family, "grid_pinpoints": [list(p) for p in g.grid_pinpoints], "tile": g.tile,
            "patch": g.patch, "newline": g.newline, "base_hw": list(spec.base_hw),
            "max_image_tokens": g.max_image_tokens()[0], "max_tiles": g.max_tiles(), "packing": "vision-graph"}


def lower_precision(state: BuildState) -> None:
    prof, manifest = state.prof, state.manifest
    if not set(prof.precision.values()) - {"fp32"}:
        return
    from .precision import lower_parts

    with stage(state, "lower_precision"):
        lower_parts(state.tmp, manifest, prof, state.int8_opts, state.calib, state.log, int4=state.int4_opts)
    smoothing = state.smoothing
    manifest["precision"] = {
        "parts": {name: part["precision"] for name, part in state.parts.items()},
        "int8": dataclasses.asdict(state.int8_opts) if "int8" in prof.precision.values() else None,
        "int4": dataclasses.asdict(state.int4_opts) if "int4" in prof.precision.values() else None,
        "awq": {"parts": ["decoder"], "groups": len(state.awq["scales"])} if state.awq else None,
        "smoothquant": {"parts": smoothing["parts"], "alpha": smoothing["alpha"]} if smoothing else None,
        "calibration_set": str(state.calib) if state.calib else "calib/ (default)",
    }


def verify_parity(state: BuildState) -> None:
    """The bundle against the PyTorch reference (adapters unmerged). The last step of the INT8 fallback: a part that
    fails the gate on verify's data ships in FP32, and is verified again."""
    if not state.verify:
        return
    from .parity.verify import verify_directory
    from .precision import failing_int8_parts, restore_fp32

    tmp, manifest, log = state.tmp, state.manifest, state.log

    def run_verify() -> dict:
        return verify_directory(tmp, manifest, base=state.base, adapters=state.loaded, tasks=state.tasks,
                                layers=state.verify_layers, oracle=state.oracle, log=log)

    with stage(state, "verify"):
        report = run_verify()
        def failing() -> list[str]:
            enabled = {"int8": state.int8_opts.fallback, "int4": state.int4_opts.fallback}
            return [p for p in failing_int8_parts(manifest, report) if enabled[manifest["parts"][p]["precision"]]]

        while not report["passed"] and failing():
            for part in failing():
                lowered = manifest["parts"][part]["precision"].upper()
                restore_fp32(tmp, manifest, part, f"{lowered} failed the parity gate ({report['summary']})")
                log(f"{part}: {lowered} failed the parity gate ({report['summary']}); shipping it in FP32")
            manifest["precision"]["parts"] = {name: part["precision"] for name, part in state.parts.items()}
            report = run_verify()
    state.report = report
    (tmp / "parity_report.json").write_text(json.dumps(report, indent=2) + "\n")
    oracle = report.get("oracle") or {}
    ratios = [o["ratio"] for o in oracle.get("outputs", []) if o.get("ratio") is not None]
    # The worst bundle-vs-float64 error as a multiple of PyTorch FP32's own (below 1: nearer the truth than it).
    manifest["parity"] = {"report": "parity_report.json", "passed": report["passed"], "oracle": oracle.get("mode", "off"),
                          "oracle_worst_ratio": max(ratios) if ratios else None}
    if not report["passed"]:
        raise ParityError(f"parity check failed: {report['summary']}; the bundle was not written")


def shipped_precision(manifest: dict, prof: Target) -> dict:
    """Per part: the precision the target asked for, the one the bundle ships, and why they differ.

    On TensorRT an FP32 ONNX part asked for in FP16 is not a fallback: TensorRT lowers it when it builds the engine."""
    out = {}
    for name, part in manifest["parts"].items():
        requested, shipped = prof.precision[name], part["precision"]
        if prof.backend == "tensorrt" and requested == "fp16" and shipped == "fp32":
            shipped = "fp16"
        reason = None
        if shipped != requested:
            reason = (part.get("lowering") or {}).get("result") or f"exported in {shipped}"
        out[name] = {"requested": requested, "shipped": shipped, "reason": reason}
    return out


def check_shipped_precision(state: BuildState) -> None:
    """Say what shipped; with --strict-precision a part that ships above its requested precision fails the build."""
    state.manifest["build"]["precision"] = shipped = shipped_precision(state.manifest, state.prof)
    short = {name: p for name, p in shipped.items() if p["reason"]}
    for name, p in short.items():
        state.log(f"{name}: requested {p['requested']}, ships {p['shipped']} ({p['reason']})")
    if short and state.strict_precision:
        said = "; ".join(f"{name} requested {p['requested']} ships {p['shipped']}" for name, p in short.items())
        raise ParityError(f"--strict-precision: {said}; the bundle was not written (drop --strict-precision to ship "
                          "it anyway, or improve the calibration set)")


def finish_bundle(state: BuildState) -> None:
    """Drop the FP32 copies the fallback no longer needs, plan TensorRT engines, write the ORT-GenAI files, seal."""
    from .genai import write_genai_files, write_task_files
    from .precision import drop_fp32_originals

    tmp, manifest, prof = state.tmp, state.manifest, state.prof
    drop_fp32_originals(tmp, manifest)
    if prof.backend == "tensorrt":
        from .engines import plan_engines

        manifest["engines"] = plan_engines(tmp, manifest, prof, state.log)
    # The same parts open with onnxruntime-genai's C/C++ runtime (og.Model / OgaCreateModel on the directory).
    manifest["onnxruntime_genai"] = {"files": write_genai_files(tmp, manifest)}
    if manifest["tasks"] and prof.backend == "onnxruntime":
        # Bank tasks in ORT-GenAI: vlexport.genai.open_model(bundle, task), or OgaConfigOverlay in C/C++.
        manifest["onnxruntime_genai"]["tasks"] = write_task_files(tmp, manifest)
    state.manifest = write_manifest(tmp, manifest)


STAGES = (load_and_merge, apply_smoothquant, apply_awq, export_parts, export_native_forms, export_task_parts,
          write_assets_and_manifest,
          lower_precision, verify_parity, check_shipped_precision, finish_bundle)


def build(
    base: str | Path,
    adapters: list[str | Path] = (),
    out: str | Path = "bundle",
    target: str = "cpu",
    force: bool = False,
    adapter_kind: str | None = None,
    verify: bool = True,
    precision: dict | None = None,
    int8: str | None = None,
    int4: str | None = None,
    calib: str | Path | None = None,
    verify_layers: int | None = None,
    oracle: str = "auto",
    strict_precision: bool = False,
    log: Callable[[str], None] = lambda msg: None,
    lora_alpha: float | None = None,
    lora_mode: str = "swappable",
) -> dict:
    """Build a bundle. Every input is checked before the first expensive step; on any failure nothing is left at `out`.

    verify_layers=N verifies only the first N decoder layers (`vlexport verify --layers`); it is chosen (N=2) when
    the fp32 PyTorch reference would not fit in memory. oracle: auto | fp64 | off (see vlexport/parity/verify.py).
    strict_precision: fail (exit 1) when a part ships at a higher precision than the target asked for.
    lora_mode: a named task's LoRA is fed per request through LoRA slots over one base graph (swappable), or
    merged into copies of the parts it changes (merged)."""
    state = plan_build(base, adapters, out, target, force, adapter_kind, verify, precision, int8, calib, verify_layers,
                       oracle, strict_precision, log, int4=int4, lora_alpha=lora_alpha, lora_mode=lora_mode)
    with atomic_directory(state.out, force, log) as tmp:
        state.tmp = tmp
        with track(log, "build", total=len(STAGES)) as advance:
            for run_stage in STAGES:
                advance(0, run_stage.__name__.replace("_", " "))
                run_stage(state)
                advance(1)
    log(f"bundle written to {state.out}")
    return state.manifest

"""`vlexport build`: base + adapters -> merged fp32 model -> three ONNX parts (each checked) -> bundle."""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import time
from pathlib import Path
from typing import Callable

from . import __version__
from .adapters import MERGEABLE, merge_adapters
from .bundle import atomic_directory, check_output_path, onnx_io, write_manifest
from .errors import VlexportError
from .export.onnx import add_slot_defaults, check_part, export_part, part_specs
from .model import EXPORT_ATTENTION, check_base_dir, facts_from_config, fingerprint, load_llava
from .parity.verify import check_first_layers
from .plan import BYTES, check_fits, parameter_counts, plan_memory
from .precision import int8_options
from .target import load_target
from .export.parts import feature_indices
from .tasks import load_bank, merged_parts, slot_geometry, write_packs


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
    return {
        "image_spec": ImageSpec.from_processor_config(proc_cfg),
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


def host_memory_bytes() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def choose_export_dtype(config: dict, prof) -> tuple[str, str | None]:
    """fp32, unless an fp32 copy of the model would not fit twice in this machine's memory (the export check holds
    the model and an ONNX Runtime session at once). Then parts that ship in FP16 are exported straight from the
    checkpoint's weights in fp16, and no fp32 copy is ever made. Returns the dtype and, for fp16, the reason."""
    fp32_bytes = 4 * sum(parameter_counts(config).values())
    memory = host_memory_bytes()
    if 2 * fp32_bytes <= memory:
        return "float32", None
    if set(prof.precision.values()) == {"fp16"}:
        return "float16", (f"an fp32 copy of the model ({fp32_bytes / 1e9:.1f} GB) would not fit twice in this "
                           f"machine's {memory / 1e9:.1f} GB, so the FP16 parts are exported from fp16 weights")
    raise VlexportError(
        f"an fp32 copy of this model ({fp32_bytes / 1e9:.1f} GB) does not fit twice in this machine's memory "
        f"({memory / 1e9:.1f} GB), and only all-FP16 builds export from fp16 weights (precision here: "
        f"{', '.join(f'{k}={v}' for k, v in prof.precision.items())}); use --target cpu-fp16 or another target "
        "whose parts are all fp16, or build on a machine with more memory"
    )


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


def _smoothquant(model, base: Path, assets: dict, adapters: list, opts, precision: dict, calib, log) -> dict | None:
    """Channel maxima on the calibration set (cached per base, adapters and set), folded into the model in place."""
    import hashlib

    import numpy as np

    from .precision import calibration, smoothquant

    parts = opts.smoothed_parts(precision)
    if not parts:
        return None
    key = hashlib.sha256("|".join([fingerprint(base), *[a.sha256 for a in adapters], calibration.calib_fingerprint(calib),
                                   *sorted(parts)]).encode()).hexdigest()[:24]
    path = calibration.cache_root() / "smoothquant" / f"{key}.npz"
    if path.exists():
        maxima = dict(np.load(path))
        log(f"SmoothQuant: reusing channel maxima from {path}")
    else:
        from transformers import AutoProcessor

        from .runtime import render_chat_prompt

        cases = calibration.calib_cases(calib)

        def chat(prompt):
            return render_chat_prompt(assets["chat_template"], prompt, assets["bos_token"], assets["eos_token"])

        texts = [calibration.prompt_text(c, chat) for c in cases]
        maxima = smoothquant.activation_maxima(model, AutoProcessor.from_pretrained(str(base)), cases, texts, parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **maxima)
        log(f"SmoothQuant: channel maxima measured on {len(cases)} calibration cases, saved to {path}")
    return {"parts": sorted(parts), "alpha": opts.smoothquant_alpha, "maxima": maxima}


def _apply_smoothing(model, smoothing: dict | None) -> int:
    from .precision import smoothquant

    if not smoothing:
        return 0
    return smoothquant.smooth(model, smoothing["maxima"], smoothing["alpha"], set(smoothing["parts"]))


def _export_task_parts(tmp: Path, base: Path, loaded: list, tasks: dict, facts, slots: dict, rel_tol: float,
                       stages: dict, log, slot_defaults: bool, smoothing: dict | None) -> dict:
    """Tasks with their own LoRA/BitFit: the parts it changes, exported again with it merged (a copy per task)."""
    out = {}
    for name, task_adapters in tasks.items():
        own = [a for a in task_adapters if a.kind in MERGEABLE]
        if not own:
            continue
        t = time.perf_counter()
        model = load_llava(base, attention=EXPORT_ATTENTION["float32"])
        merge_adapters(model, [*loaded, *own])
        _apply_smoothing(model, smoothing)  # the base's channel maxima; the fold is exact for any weights
        wanted = merged_parts(own)
        for spec in part_specs(model, facts, frozenset(slots)):
            if spec.name not in wanted:
                continue
            path = export_part(spec, tmp / "tasks" / name / f"{spec.name}.onnx")
            if spec.name in slots and slot_defaults:
                add_slot_defaults(path, spec.name, slots[spec.name]["layers"], slots[spec.name]["dim"])
            check_part(spec, path, rel_tol)
            out.setdefault(name, {})[spec.name] = path.relative_to(tmp).as_posix()
        stages[f"export_task_{name}"] = {"seconds": time.perf_counter() - t, "peak_rss_mb": _peak_rss_mb()}
        log(f"task {name}: exported its own merged {', '.join(wanted)} part(s)")
    return out


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
    calib: str | Path | None = None,
    verify_layers: int | None = None,
    log: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Build a bundle. Every input is checked before the first expensive step; on any failure nothing is left at `out`.

    verify_layers=N verifies only the first N decoder layers (`vlexport verify --layers`); it is chosen (N=2) when
    the fp32 PyTorch reference would not fit in memory."""
    base, out = Path(base), Path(out)
    check_output_path(out, force)
    config = check_base_dir(base)
    prof = load_target(target).with_precision(precision or {})
    int8_opts = int8_options(prof.int8, int8)
    check_buildable(prof, int8_opts)
    if "int8" in prof.precision.values():
        from .precision.calibration import calib_cases

        calib_cases(calib)  # a bad calibration folder fails now, not after the export
    facts = facts_from_config(config)
    assets = read_text_assets(base)
    loaded, tasks = load_bank(adapters, adapter_kind)
    pack_bytes = sum(a.nbytes for task in tasks.values() for a in task if a.kind not in MERGEABLE)
    # A task with its own merged LoRA/BitFit loads its own copies of the parts that adapter changes.
    counts = parameter_counts(config)
    for task in tasks.values():
        for part in merged_parts([a for a in task if a.kind in MERGEABLE]):
            pack_bytes += counts[part] * BYTES[prof.precision[part]]
    memory = plan_memory(config, prof, adapter_bytes=pack_bytes)
    check_fits(memory, config, prof)
    dtype, low_memory = choose_export_dtype(config, prof)
    if low_memory:
        log(low_memory)
        if tasks:
            raise VlexportError("bank tasks are not built for models exported in fp16 to save memory yet; build the "
                                "model without NAME=PATH adapters, or on a machine with more memory")
        if verify and verify_layers is None:
            verify_layers = min(2, facts.num_layers)
            log(f"the fp32 PyTorch reference would not fit either: verify compares the first {verify_layers} decoder layers")
    check_first_layers(verify_layers, facts.num_layers, bool(tasks), "--verify-layers")
    stages: dict[str, dict] = {}

    t = time.perf_counter()
    model = load_llava(base, dtype=dtype, attention=EXPORT_ATTENTION[dtype])
    merge_adapters(model, loaded)
    for task_adapters in tasks.values():
        for a in task_adapters:
            a.validate(model)
    vision_layers = max(feature_indices(facts.vision_feature_layer, model.config.vision_config.num_hidden_layers))
    slots = slot_geometry(tasks, facts, vision_layers, model.config.vision_config.hidden_size)
    stages["load_and_merge"] = {"seconds": time.perf_counter() - t, "peak_rss_mb": _peak_rss_mb()}
    log(f"merged {len(loaded)} adapter(s) into the base in {dtype}")
    t = time.perf_counter()
    smoothing = _smoothquant(model, base, assets, loaded, int8_opts, prof.precision, calib, log)
    if smoothing:
        n = _apply_smoothing(model, smoothing)
        stages["smoothquant"] = {"seconds": time.perf_counter() - t, "peak_rss_mb": _peak_rss_mb()}
        log(f"SmoothQuant (alpha {smoothing['alpha']}): {n} norm/linear groups in {', '.join(smoothing['parts'])} rescaled")

    exported = "fp32" if dtype == "float32" else "fp16"
    rel_tol = prof.thresholds(exported)["export_rel_tol"]
    with atomic_directory(out, force) as tmp:
        parts = {}
        for spec in part_specs(model, facts, frozenset(slots)):
            t = time.perf_counter()
            path = export_part(spec, tmp / f"{spec.name}.onnx")
            if spec.name in slots and prof.backend == "onnxruntime":
                # Optional slot inputs for ONNX Runtime hosts. Not for TensorRT: its ONNX parser treats an input
                # that has an initializer as a constant, which would freeze the slot.
                add_slot_defaults(path, spec.name, slots[spec.name]["layers"], slots[spec.name]["dim"])
            # A decoder too large to hold twice is checked on its first layers (their K/V outputs).
            check = check_part(spec, path, rel_tol, first_layers=2 if low_memory and spec.name == "decoder" else None)
            seconds = time.perf_counter() - t
            stages[f"export_{spec.name}"] = {"seconds": seconds, "peak_rss_mb": _peak_rss_mb()}
            # Exported FP32; lower_parts below lowers them for ONNX Runtime, and makes TensorRT's INT8 Q/DQ graphs.
            # TensorRT lowers the rest to FP16 when it builds the engines.
            parts[spec.name] = {"file": path.name, "precision": exported, **onnx_io(path), "export_check": check}
            log(f"exported {spec.name} ({seconds:.1f}s), ONNX Runtime vs torch max rel. error {check['max_rel_error']:.2e}")
        del model
        gc.collect()  # a 7B's weights must be gone before verify loads its reference
        task_parts = _export_task_parts(tmp, base, loaded, tasks, facts, slots, rel_tol, stages, log,
                                        slot_defaults=prof.backend == "onnxruntime", smoothing=smoothing)

        _copy_tokenizer(base, tmp)
        spec = assets["image_spec"]
        if assets["chat_template"]:
            (tmp / "chat_template.jinja").write_text(assets["chat_template"])
        manifest = {
            "vlexport_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "base": {"path": str(base.resolve()), "fingerprint": fingerprint(base), "model_type": "llava"},
            "adapters": [a.describe() for a in loaded],
            "tasks": write_packs(tmp, tasks, facts, slots, task_parts),
            "slots": slots,
            "target": prof.to_dict(),
            "memory_plan": memory.to_dict(),
            "parts": parts,
            "model": {
                "image_token_id": facts.image_token_id,
                "num_image_tokens": facts.num_image_tokens,
                "vocab_size": facts.vocab_size,
                "hidden_size": facts.hidden_size,
                "num_layers": facts.num_layers,
                "num_attention_heads": facts.num_heads,
                "num_kv_heads": facts.num_kv_heads,
                "head_dim": facts.head_dim,
                "image_size": facts.image_size,
                "max_position_embeddings": facts.max_position_embeddings,
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
            "build": {"stages": stages, "export_dtype": dtype, **({"export_dtype_reason": low_memory} if low_memory else {})},
        }
        if set(prof.precision.values()) - {"fp32"}:
            from .precision import lower_parts

            lower_parts(tmp, manifest, prof, int8_opts, calib, log, stages)
            manifest["precision"] = {
                "parts": {name: part["precision"] for name, part in parts.items()},
                "int8": dataclasses.asdict(int8_opts) if "int8" in prof.precision.values() else None,
                "smoothquant": {"parts": smoothing["parts"], "alpha": smoothing["alpha"]} if smoothing else None,
                "calibration_set": str(calib) if calib else "calib/ (default)",
            }
        if verify:
            from .parity.verify import verify_directory
            from .precision import failing_int8_parts, restore_fp32

            t = time.perf_counter()
            report = verify_directory(tmp, manifest, base=base, adapters=loaded, tasks=tasks, layers=verify_layers, log=log)
            # The last step of the fallback: an INT8 part that fails the gate on verify's data ships in FP32.
            while not report["passed"] and int8_opts.fallback and failing_int8_parts(manifest, report):
                for part in failing_int8_parts(manifest, report):
                    restore_fp32(tmp, manifest, part, f"INT8 failed the parity gate ({report['summary']})")
                    log(f"{part}: INT8 failed the parity gate ({report['summary']}); shipping it in FP32")
                manifest["precision"]["parts"] = {name: part["precision"] for name, part in parts.items()}
                report = verify_directory(tmp, manifest, base=base, adapters=loaded, tasks=tasks, layers=verify_layers,
                                          log=log)
            stages["verify"] = {"seconds": time.perf_counter() - t, "peak_rss_mb": _peak_rss_mb()}
            (tmp / "parity_report.json").write_text(json.dumps(report, indent=2) + "\n")
            manifest["parity"] = {"report": "parity_report.json", "passed": report["passed"]}
            if not report["passed"]:
                from .errors import ParityError

                raise ParityError(f"parity check failed: {report['summary']}; the bundle was not written")
        from .precision import drop_fp32_originals

        drop_fp32_originals(tmp, manifest)
        if prof.backend == "tensorrt":
            from .engines import plan_engines

            manifest["engines"] = plan_engines(tmp, manifest, prof, log)
        from .genai import write_genai_files

        # The same parts open with onnxruntime-genai's C/C++ runtime (og.Model / OgaCreateModel on the directory).
        manifest["onnxruntime_genai"] = {"files": write_genai_files(tmp, manifest)}
        if manifest["tasks"] and prof.backend == "onnxruntime":
            from .genai import write_task_files

            # Bank tasks in ORT-GenAI: vlexport.genai.open_model(bundle, task), or OgaConfigOverlay in C/C++.
            manifest["onnxruntime_genai"]["tasks"] = write_task_files(tmp, manifest)
        manifest = write_manifest(tmp, manifest)
    log(f"bundle written to {out}")
    return manifest

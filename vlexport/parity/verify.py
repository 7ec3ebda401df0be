"""`vlexport verify`: compare a bundle, part by part and end to end, with the PyTorch reference (adapters unmerged).

Checks per case (image + prompt):
  vision   image_features        bundle preprocessing + vision part vs HF processor + reference vision path
  decoder  logits                teacher-forced over the reference's continuation, through the bundle's KV cache
  generate tokens                free-running greedy decoding, exact match and first divergence
Thresholds come from the bundle's target profile, per precision.

The float64 oracle (--oracle auto|fp64|off): the same unmerged PyTorch reference evaluated in float64, on the same
inputs widened exactly. Every output is then measured twice against it, the bundle and PyTorch FP32, and an FP32
check passes when the bundle's error is within max(limit, oracle_k x FP32's own error): a bundle that is as close
to the truth as the reference it is judged against passes, however ill-conditioned the model.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import VlexportError
from . import metrics
from .data import Case, builtin_cases, folder_cases

# threshold key in targets/*.toml -> (part, output, metric, comparison)
THRESHOLDS = {
    "vision_rel_tol": ("vision", "image_features", "max_rel_to_scale", "<="),
    "vision_cosine_min": ("vision", "image_features", "cosine", ">="),
    "logit_rel_tol": ("decoder", "logits", "max_rel_logit_diff", "<="),
    "top1_min": ("decoder", "logits", "top1_agreement", ">="),
    "logit_cosine_min": ("decoder", "logits", "cosine", ">="),
    "kl_mean_max": ("decoder", "logits", "kl_mean", "<="),
    "greedy_exact_match": ("generate", "tokens", "exact_match_rate", ">="),
    # --layers N mode: every present.{i}.key|value of the first N layers
    "hidden_rel_tol": ("decoder", "present.*", "max_rel_to_scale", "<="),
}


def run_case(case: Case, bundle, model, processor, max_new_tokens: int, task: str | None = None,
             oracle=None) -> dict:
    """One case. `oracle` (the reference in float64, or None) adds, to each output, the bundle's metrics against it
    ("vs_oracle") and PyTorch FP32's ("reference_vs_oracle"), and to the tokens the near-tie rule's verdict."""
    from ..backends.torch_reference import oracle_inputs, reference_features, reference_generate, reference_logits

    text = bundle.chat_prompt(case.prompt) if case.prompt is not None else case.raw_prompt
    inputs = processor(images=case.image, text=text, return_tensors="pt")
    size = bundle.image_size_of(case.image)  # LLaVA-NeXT: the image's size sets its token count and packing
    prompt_ids = bundle.encode(text, size)
    if prompt_ids != inputs["input_ids"][0].tolist():
        raise VlexportError(f"case {case.name}: the bundle's tokenizer disagrees with the base processor on the prompt")

    ref_features = reference_features(model, inputs["pixel_values"], inputs.get("image_sizes"))
    features = bundle.image_features(bundle.pixel_values(case.image), task, size)
    vision = metrics.feature_metrics(ref_features, features)

    ref_tokens = reference_generate(model, processor, case.image, text, max_new_tokens)
    test = bundle.generate(case.image, raw_prompt=text, max_new_tokens=max_new_tokens, task=task)
    greedy = metrics.greedy_match(ref_tokens, test.token_ids)

    ref_logits = reference_logits(model, inputs, ref_tokens)
    test_logits = bundle.teacher_forced_logits(prompt_ids, features, ref_tokens, task)
    decoder = metrics.logit_metrics(ref_logits, test_logits)
    decoder["kl_per_token"] = metrics.kl_per_token(ref_logits, test_logits).tolist()
    tokens = {**greedy, "ref": ref_tokens, "test": test.token_ids}
    if oracle is not None:
        wide = oracle_inputs(inputs)
        oracle_features = reference_features(oracle, wide["pixel_values"], wide.get("image_sizes"))
        vision["vs_oracle"] = metrics.feature_metrics(oracle_features, features)
        vision["reference_vs_oracle"] = metrics.feature_metrics(oracle_features, ref_features)
        # Teacher-forced over the same continuation as the FP32 reference, so all three see the same context.
        oracle_logits = reference_logits(oracle, wide, ref_tokens)
        decoder["vs_oracle"] = metrics.logit_metrics(oracle_logits, test_logits)
        decoder["reference_vs_oracle"] = metrics.logit_metrics(oracle_logits, ref_logits)
        tokens["oracle"] = metrics.greedy_match_with_oracle(ref_tokens, test.token_ids,
                                                            oracle_logits.argmax(-1).tolist())
    return {
        "name": case.name if task is None else f"{task}:{case.name}",
        "task": task,
        "prompt": case.prompt if case.prompt is not None else case.raw_prompt,
        "vision": {"image_features": vision},
        "decoder": {"logits": decoder},
        "generate": {"tokens": tokens},
    }


def executed_precision(manifest: dict, backend: str) -> dict:
    """The precision each part runs at on this backend: the ONNX parts' own, or the engines'."""
    if backend == "tensorrt" and not (manifest.get("engines") or {}).get("parts"):
        raise VlexportError("the bundle cannot run on TensorRT: it has no TensorRT target (no engines in its "
                            "manifest); build it for a TensorRT target, or verify with --backend onnxruntime")
    parts = manifest["engines"]["parts"] if backend == "tensorrt" else manifest["parts"]
    return {name: part["precision"] for name, part in parts.items()}


PRECISION_ORDER = ("int4", "int8", "fp16", "fp32")  # least precise first


def threshold_precisions(manifest: dict, backend: str = "onnxruntime") -> dict:
    """{threshold key: the precision whose [parity.<precision>] section it is read from}, for the keys that section
    sets. The recorded sections are validated first: an unknown key or a missing section is an error, never a
    silently dropped check (a manifest may have recorded an older, unvalidated profile)."""
    from ..target import validate_parity

    target = manifest["target"]
    parity = target.get("parity")
    precision = executed_precision(manifest, backend)
    where = f"the bundle's recorded target '{target.get('name', '?')}'"
    validate_parity(parity, where, set(precision.values()))
    end_to_end = min((precision[p] for p in ("vision", "embed", "decoder") if p in precision), key=PRECISION_ORDER.index)
    out = {}
    for key, (part, output, *_rest) in THRESHOLDS.items():
        p = precision["vision"] if part == "vision" else precision["decoder"] if output.startswith("present") else end_to_end
        if key in parity[p]:
            out[key] = p
    return out


def thresholds_for(manifest: dict, backend: str = "onnxruntime") -> dict:
    """Each threshold from the [parity.<precision>] section of the precision its output depends on.

    Vision features depend on the vision part alone. Logits and greedy tokens depend on every part upstream (an INT8
    vision part moves an FP32 decoder's logits), so they take the least precise of vision, embed and decoder."""
    parity = manifest["target"]["parity"]
    return {key: parity[p][key] for key, p in threshold_precisions(manifest, backend).items()}


def oracle_gated(manifest: dict, backend: str = "onnxruntime") -> tuple[dict, float | None]:
    """({threshold key: k} for the checks the oracle judges, k): the FP32 sections' keys, when [parity.fp32] sets
    oracle_k. FP16 and INT8 gates keep their fixed limits against the FP32 reference."""
    k = manifest["target"]["parity"].get("fp32", {}).get("oracle_k")
    if k is None:
        return {}, None
    return {key: k for key, p in threshold_precisions(manifest, backend).items() if p == "fp32"}, k


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def evaluate(cases: list[dict], thresholds: dict, oracle_k: dict | None = None) -> tuple[list[dict], bool]:
    """One check per threshold and output; each names the part, output, metric, worst case and the bound.

    oracle_k: {threshold key: k} for the checks judged against the float64 oracle (see _oracle_check). Nothing
    passes by default: no checks at all, an unknown threshold key or a non-finite value each give a failing check."""
    oracle_k = oracle_k or {}
    checks = []
    for key, limit in thresholds.items():
        if key not in THRESHOLDS:
            checks.append(_failed_check(key, f"unknown threshold '{key}' (known: {', '.join(THRESHOLDS)})"))
            continue
        if not _finite(limit) or (key in oracle_k and not (_finite(oracle_k[key]) and oracle_k[key] > 0)):
            checks.append(_failed_check(key, f"threshold {key} = {limit!r} (oracle_k {oracle_k.get(key)!r}) is not a "
                                             "finite number"))
            continue
        part, pattern, metric, op = THRESHOLDS[key]
        present = cases[0].get(part, {}) if cases else {}
        if pattern.endswith("*"):
            outputs = [o for o in present if o.startswith(pattern[:-1])]
        else:
            outputs = [pattern] if pattern in present else []
        for output in outputs:
            if key in oracle_k:
                checks.append(_oracle_check(cases, key, part, output, metric, op, limit, oracle_k[key]))
            else:
                checks.append(_check(cases, key, part, output, metric, op, limit))
    if not checks:
        why = "no cases" if not cases else f"none of the thresholds {', '.join(thresholds) or '(none)'} applies"
        checks.append(_failed_check("no checks", f"no parity check ran ({why}); a gate that checks nothing cannot pass"))
    return checks, all(c["passed"] for c in checks)


def _failed_check(key: str, message: str) -> dict:
    return {"part": "parity", "output": key, "metric": key, "value": None, "limit": None, "op": "", "passed": False,
            "worst_case": None, "threshold": key, "basis": "reference", "message": message}


def _value(case: dict, part: str, output: str, metric: str, sub: str | None = None):
    """A case's metric, or NaN where it is missing, so that a missing value fails like a non-finite one."""
    d = case.get(part, {}).get(output, {})
    d = d.get(sub, {}) if sub else d
    v = d.get(metric)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else float("nan")


def _nonfinite(pairs: list) -> tuple | None:
    return next(((v, name) for v, name in pairs if not math.isfinite(v)), None)


def _check(cases, key, part, output, metric, op, limit) -> dict:
    if metric == "exact_match_rate":
        value = float(np.mean([bool(c[part][output].get("exact", False)) for c in cases]))
        worst = next((c["name"] for c in cases if not c[part][output].get("exact", False)), None)
        bad = None
    elif metric == "top1_agreement" and all("tokens" in c[part][output] for c in cases):
        # A rate over every teacher-forced token. Per case it would move in steps of 1/32, and its minimum would
        # turn "top-1 >= 98%" into "no token may differ".
        pairs = [(_value(c, part, output, "top1_agreement"), c["name"]) for c in cases]
        bad = _nonfinite(pairs)
        stats = [c[part][output] for c in cases]
        value = sum(s["top1_agreement"] * s["tokens"] for s in stats) / max(1, sum(s["tokens"] for s in stats))
        worst = min(pairs)[1] if bad is None else bad[1]
    else:
        pairs = [(_value(c, part, output, metric), c["name"]) for c in cases]
        # max()/min() over NaN depend on order: a non-finite value is the worst case, always.
        bad = _nonfinite(pairs)
        value, worst = bad if bad else (max if op == "<=" else min)(pairs)
    passed = bad is None and math.isfinite(value) and (value <= limit if op == "<=" else value >= limit)
    out = {"part": part, "output": output, "metric": metric, "value": value, "limit": limit,
           "op": op, "passed": bool(passed), "worst_case": worst, "threshold": key, "basis": "reference"}
    if bad is not None:
        out["message"] = f"non-finite {metric} ({bad[0]}) in case {bad[1]}"
    return out


def _error(value: float, op: str) -> float:
    """A metric as an error, 0 = identical: the value itself for '<=' metrics; 1 - value for '>=' ones (cosine,
    top-1 agreement), clipped at 0 because a cosine may round to just above 1."""
    return value if op == "<=" else max(0.0, 1.0 - value)


def _oracle_check(cases, key, part, output, metric, op, limit, k) -> dict:
    """The FP32 gate against the float64 oracle. Per case, with e() the metric as an error (see _error):
        e(bundle vs oracle) <= max(e(limit), k * e(PyTorch FP32 vs oracle))
    so the bundle may be off the truth by k times what the reference itself is, never less than the fixed limit.
    The worst case is the one nearest its bound; a missing or non-finite value, on either side, fails."""
    base = {"part": part, "output": output, "metric": metric, "op": op, "threshold": key, "basis": "oracle",
            "fixed_limit": limit, "oracle_k": k}
    if metric == "exact_match_rate":
        flags = [(bool(c[part][output].get("oracle", {}).get("passed", False)), c["name"]) for c in cases]
        value = float(np.mean([f for f, _ in flags]))
        worst = next((name for f, name in flags if not f), None)
        ties = sum(len(c[part][output].get("oracle", {}).get("near_ties", [])) for c in cases)
        return {**base, "value": value, "limit": limit, "passed": bool(value >= limit), "worst_case": worst,
                "fp32_value": None, "ratio": None, "near_ties": ties}
    rows = []
    for c in cases:
        b = _value(c, part, output, metric, "vs_oracle")
        f = _value(c, part, output, metric, "reference_vs_oracle")
        if not (math.isfinite(b) and math.isfinite(f)):
            return {**base, "value": b, "limit": None, "passed": False, "worst_case": c["name"], "fp32_value": f,
                    "ratio": None, "message": f"non-finite or missing {metric} against the oracle in case {c['name']} "
                                              f"(bundle {b}, PyTorch FP32 {f})"}
        bound = max(_error(limit, op), k * _error(f, op))
        eb = _error(b, op)
        score = eb / bound if bound > 0 else (0.0 if eb == 0 else math.inf)
        rows.append((score, c["name"], b, f, bound, eb))
    score, worst, b, f, bound, eb = max(rows, key=lambda r: r[0])
    ef = _error(f, op)
    passed = all(r[0] <= 1.0 for r in rows)
    # Cases that pass only on k x FP32's error, over the fixed limit even against float64: the summary names them.
    over = [r[1] for r in rows if r[5] > _error(limit, op)]
    return {**base, "value": b, "limit": bound if op == "<=" else 1.0 - bound, "passed": passed,
            "worst_case": worst, "fp32_value": f, "ratio": eb / ef if ef > 0 else None,
            "relaxed": bool(passed and over), "over_fixed_limit": over}


def _aggregate(cases: list[dict]) -> dict:
    """The worst value of each metric over all cases, per part and output."""
    worse_is_low = {"cosine", "top1_agreement", "exact", "norm_ratio"}
    out: dict = {}
    for part in ("vision", "decoder", "generate"):
        for output, first in cases[0].get(part, {}).items():
            agg = {}
            for metric, v in first.items():
                if not isinstance(v, (int, float, bool)) or metric in ("ref_tokens", "test_tokens"):
                    continue
                vals = [c[part][output][metric] for c in cases if c[part][output][metric] is not None]
                if not vals:
                    agg[metric] = None
                elif metric == "norm_ratio":
                    agg[metric] = max(vals, key=lambda x: abs(x - 1.0))
                else:
                    agg[metric] = (min if metric in worse_is_low else max)(vals)
            out.setdefault(part, {})[output] = agg
    return out


def check_first_layers(layers: int | None, num_layers: int, has_tasks: bool, option: str = "--layers") -> None:
    """What few-layer parity can check: verify calls this, and build before its first export."""
    if layers is None:
        return
    if not 1 <= layers <= num_layers:
        raise VlexportError(f"{option} must be between 1 and the model's {num_layers} decoder layers (got {layers})")
    if has_tasks:
        raise VlexportError(f"{option} does not cover task packs yet; verify a bundle with tasks in full")


ORACLES = ("auto", "fp64", "off")
# auto: float64 oracle weights (8 B/parameter) next to what verify holds anyway, the FP32 reference and the bundle's
# FP32 parts (4 + 4 B/parameter), with a quarter of headroom for activations, PEFT's copies and the allocator.
ORACLE_BYTES_PER_PARAMETER = 8 + 4 + 4
ORACLE_HEADROOM = 1.25


def check_oracle_option(oracle: str) -> None:
    if oracle not in ORACLES:
        raise VlexportError(f"--oracle {oracle!r}: use one of {', '.join(ORACLES)} (auto = fp64 when the model fits "
                            "in memory in float64)")


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, capped by a cgroup (container) limit; None if unknown."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    try:
        cg = Path("/sys/fs/cgroup")
        limit, used = (cg / "memory.max").read_text().strip(), (cg / "memory.current").read_text().strip()
        if limit != "max":
            avail = min(avail, int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return avail


def reference_parameters(base: Path, layers: int | None = None) -> int:
    """Parameters of the reference from config.json alone; in --layers N mode only the first N decoder layers."""
    import copy
    import json

    from ..plan import parameter_counts

    config = copy.deepcopy(json.loads((Path(base) / "config.json").read_text()))
    if layers is not None:
        config["text_config"]["num_hidden_layers"] = layers
    return int(sum(parameter_counts(config).values()))


def choose_oracle(oracle: str, base: Path, layers: int | None = None, available: int | None = None) -> tuple[bool, str]:
    """(use the float64 oracle, why), for --oracle auto|fp64|off."""
    check_oracle_option(oracle)
    if oracle == "off":
        return False, "--oracle off"
    try:
        n = reference_parameters(base, layers)
    except (OSError, ValueError, KeyError, TypeError) as e:
        if oracle == "fp64":
            return True, "--oracle fp64"
        return False, f"auto: the model could not be sized from '{Path(base) / 'config.json'}' ({e}); fixed limits apply"
    need = ORACLE_HEADROOM * ORACLE_BYTES_PER_PARAMETER * n
    scope = f"first {layers} decoder layers, " if layers is not None else ""
    if oracle == "fp64":
        return True, f"--oracle fp64 ({scope}{n / 1e6:.1f}M parameters, {n * 8 / 2**30:.2f} GiB in float64)"
    available = available_memory() if available is None else available
    if available is None:
        return False, "auto: host memory unknown; fixed limits apply (pass --oracle fp64 to force it)"
    fits = need <= available
    return fits, (f"auto: {scope}{n / 1e6:.1f}M parameters need {need / 2**30:.2f} GiB with the oracle, "
                  f"{available / 2**30:.2f} GiB available" + ("" if fits else "; fixed limits apply"))


def verify_directory(
    bundle_dir: Path,
    manifest: dict,
    base: Path,
    adapters: list,
    data: str | Path | None = None,
    max_new_tokens: int = 32,
    layers: int | None = None,
    backend: str = "onnxruntime",
    tasks: dict | None = None,
    log: Callable[[str], None] = lambda msg: None,
    oracle: str = "auto",
) -> dict:
    """tasks: {name: [run-time adapters]}; each task is checked against its own reference (base adapters + its own).

    oracle: "auto" | "fp64" | "off". With the oracle, FP32 checks are judged against the reference in float64
    (see _oracle_check and metrics.greedy_match_with_oracle); without it, against the FP32 reference."""
    import torch
    from transformers import AutoProcessor

    from ..backends.torch_reference import build_reference
    from ..progress import track
    from ..runtime import Bundle

    check_oracle_option(oracle)
    check_max_new_tokens(max_new_tokens)
    thresholds = thresholds_for(manifest, backend)  # validates the recorded profile before any model loads
    cases_in = folder_cases(data) if data else builtin_cases()
    tasks = tasks or {}
    check_first_layers(layers, manifest["model"]["num_layers"], bool(tasks))
    if layers is not None and backend != "onnxruntime":
        raise VlexportError("--layers runs on the ONNX parts only (it cuts the decoder graph); drop --backend")
    use_oracle, oracle_reason = choose_oracle(oracle, base, layers)
    log(f"parity oracle: {'float64' if use_oracle else 'off'} ({oracle_reason})")
    if layers is not None:
        from .layers import verify_first_layers

        results = verify_first_layers(bundle_dir, manifest, base, adapters, layers, cases_in, log, oracle=use_oracle)
    else:
        bundle = Bundle(bundle_dir, manifest=manifest, backend=backend)  # refuses a backend the bundle cannot run
        processor = AutoProcessor.from_pretrained(str(base))
        results = []
        # Without a 'default' task, a request with no task runs the base alone: check that path too.
        runs = ([] if "default" in tasks else [(None, [])]) + list(tasks.items())
        with track(log, "verify", total=len(cases_in) * len(runs)) as advance:
            for task, task_adapters in runs:
                model = oracle_model = None  # the previous task's references go before the next ones load
                model = build_reference(base, [*adapters, *task_adapters])
                if use_oracle:
                    oracle_model = build_reference(base, [*adapters, *task_adapters], dtype=torch.float64)
                for case in cases_in:
                    log(f"parity case {case.name}" + (f" (task {task})" if task else ""))
                    results.append(run_case(case, bundle, model, processor, max_new_tokens, task, oracle=oracle_model))
                    advance(1, case.name if task is None else f"{task}:{case.name}")
    oracle_k, k = oracle_gated(manifest, backend) if use_oracle else ({}, None)
    checks, passed = evaluate(results, thresholds, oracle_k)
    summary = _summary(checks, passed)
    nonfinite = [c["name"] for c in results if c.get("decoder", {}).get("logits", {}).get("nonfinite")]
    if nonfinite:  # say it plainly: NaN/inf logits are an overflow (FP16 range), not a rounding difference
        summary += f"; non-finite logits (overflow?) in {', '.join(nonfinite[:3])}" + (" ..." if len(nonfinite) > 3 else "")
    oracle_report = {"requested": oracle, "mode": "fp64" if use_oracle else "off", "reason": oracle_reason, "k": k,
                     "method": "the same unmerged PyTorch reference in float64 (weights, adapters, inputs widened "
                               "exactly from the processor's float32 pixel values)" if use_oracle else None,
                     "outputs": oracle_outputs(results) if use_oracle else [],
                     "near_ties": near_ties(results) if use_oracle else []}
    if use_oracle and k is None:
        oracle_report["note"] = ("[parity.fp32] sets no oracle_k: the oracle is measured and reported, but the fixed "
                                 "limits against the FP32 reference decide")
    return {
        "passed": passed,
        "summary": summary,
        "reference": {
            "base": str(Path(base).resolve()),
            "adapters": [{"path": str(a.path), "kind": a.kind, "format": a.format} for a in adapters],
            "tasks": {name: [{"path": str(a.path), "kind": a.kind, "format": a.format} for a in ta]
                      for name, ta in tasks.items()},
            "method": "PyTorch fp32, adapters unmerged (PEFT for LoRA/BEFT and prefix tuning (forward only); BitFit "
                      "biases as trained parameters)",
        },
        "oracle": oracle_report,
        "backend": backend,
        "precision": executed_precision(manifest, backend),
        "thresholds": thresholds,
        "max_new_tokens": max_new_tokens,
        "mode": "full" if layers is None else f"first {layers} decoder layers, teacher-forced over the prompt",
        "checks": checks,
        "parts": _aggregate(results),
        "cases": results,
    }


def describe_check(c: dict) -> str:
    """One line per check, as the summary and JUnit give it."""
    if c.get("message") and c.get("value") is None:
        return f"{c['part']}/{c['output']}: {c['message']}"
    value = "-" if c["value"] is None else f"{c['value']:.3g}"
    if c.get("basis") == "oracle" and c.get("fp32_value") is not None and c["op"] == "<=":
        text = (f"{c['part']}/{c['output']} {c['metric']}={value} vs float64 (limit <= {c['limit']:.3g} = "
                f"max({c['fixed_limit']:g}, {c['oracle_k']:g} x PyTorch FP32's {c['fp32_value']:.3g}), "
                f"worst case {c['worst_case']})")
    elif c.get("basis") == "oracle" and c.get("fp32_value") is not None:  # a minimum: bounded as 1 - value
        text = (f"{c['part']}/{c['output']} {c['metric']}={c['value']:.8g} vs float64 (1 - {c['metric']} = "
                f"{1 - c['value']:.3g}, limit <= {1 - c['limit']:.3g} = max({1 - c['fixed_limit']:.3g}, "
                f"{c['oracle_k']:g} x PyTorch FP32's {1 - c['fp32_value']:.3g}), worst case {c['worst_case']})")
    else:
        limit = "-" if c["limit"] is None else f"{c['limit']:g}"
        vs = " vs float64" if c.get("basis") == "oracle" else ""
        text = f"{c['part']}/{c['output']} {c['metric']}={value}{vs} (limit {c['op']} {limit}, worst case {c['worst_case']})"
    return text + (f": {c['message']}" if c.get("message") else "")


def _summary(checks: list[dict], passed: bool) -> str:
    if passed:
        relaxed = [c for c in checks if c.get("relaxed")]
        if relaxed:  # say so: these passed on the oracle's bound, above the profile's fixed limit
            return "all checks passed; " + "; ".join(
                f"{c['part']}/{c['output']} {c['metric']} over the fixed limit {c['fixed_limit']:g} against float64 in "
                f"{', '.join(c['over_fixed_limit'][:3])}{' ...' if len(c['over_fixed_limit']) > 3 else ''}, within "
                f"{c['oracle_k']:g} x PyTorch FP32's own error there" for c in relaxed)
        return "all checks passed"
    return "; ".join(describe_check(c) for c in checks if not c["passed"])


ORACLE_METRIC = {"image_features": "max_rel_to_scale", "logits": "max_rel_logit_diff"}  # present.*: max_rel_to_scale


def oracle_outputs(cases: list[dict]) -> list[dict]:
    """Per output, the worst error over all cases of the bundle and of PyTorch FP32 against the oracle, in the
    gate's metric (max |Δ| / scale of the oracle's output), and their ratio (below 1: the bundle is nearer the
    truth than the reference it would be judged against)."""
    out = []
    if not cases:
        return out
    for part in ("vision", "decoder"):
        for output, first in cases[0].get(part, {}).items():
            if "vs_oracle" not in first:
                continue
            metric = ORACLE_METRIC.get(output, "max_rel_to_scale")
            b = [(_value(c, part, output, metric, "vs_oracle"), c["name"]) for c in cases]
            f = [(_value(c, part, output, metric, "reference_vs_oracle"), c["name"]) for c in cases]
            worst_b, worst_f = _nonfinite(b) or max(b), _nonfinite(f) or max(f)
            ratio = worst_b[0] / worst_f[0] if math.isfinite(worst_b[0]) and worst_f[0] > 0 else None
            out.append({"part": part, "output": output, "metric": metric, "bundle": worst_b[0],
                        "reference": worst_f[0], "ratio": ratio if ratio is None or math.isfinite(ratio) else None,
                        "worst_case": worst_b[1]})
    return out


def near_ties(cases: list[dict]) -> list[dict]:
    """Every position where PyTorch FP32's greedy token and the oracle's choice differ, and what the bundle did."""
    out = []
    for c in cases:
        tok = c.get("generate", {}).get("tokens", {})
        o = tok.get("oracle")
        if not o:
            continue
        for t in o["near_ties"]:
            i = t["position"]
            out.append({"case": c["name"], "position": i, "reference_token": t["reference"], "oracle_token": t["oracle"],
                        "bundle_token": tok["test"][i] if i < len(tok["test"]) else None,
                        "accepted": o["accepted_near_tie"] == i,
                        "compared": i < o["checked_tokens"]})
    return out


def _recorded_adapter(rec: dict):
    """An adapter the manifest records, refused if its file changed since the build."""
    from ..adapters import load_adapter

    a = load_adapter(rec["path"], rec["kind"], lora_alpha=rec.get("lora_alpha_given"))
    if a.sha256 != rec["sha256"]:
        raise VlexportError(
            f"adapter '{rec['path']}' changed since the bundle was built (sha256 differs); pass --adapter to "
            "check against it anyway, or rebuild"
        )
    return a


def check_max_new_tokens(max_new_tokens) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise VlexportError(f"--max-new-tokens must be an integer of at least 1 (got {max_new_tokens!r}): verify "
                            "compares that many greedy tokens per case")


def reference_adapters(manifest: dict, specs: list[str | Path] | None) -> tuple[list, dict]:
    """(base adapters, {task: adapters}) for the reference: the manifest's, with `specs` (as build takes them)
    overriding them. A plain PATH replaces the base adapters (all the plain ones together); NAME=PATH replaces task
    NAME's adapters (all the entries with that name together)."""
    from ..adapters import load_adapter
    from ..tasks import parse_adapter_specs

    recorded_tasks = manifest.get("tasks") or {}
    parsed = parse_adapter_specs(specs or [])
    unknown = sorted({name for name, _ in parsed if name is not None and name not in recorded_tasks})
    if unknown:
        have = ", ".join(sorted(recorded_tasks)) or "none"
        raise VlexportError(f"--adapter {unknown[0]}=...: the bundle has no task '{unknown[0]}' (its tasks: {have}); "
                            "use PATH for the base adapters or NAME=PATH with one of its tasks")
    plain = [p for name, p in parsed if name is None]
    loaded = [load_adapter(p) for p in plain] if plain else [_recorded_adapter(rec) for rec in manifest["adapters"]]
    tasks = {}
    for name, rec in recorded_tasks.items():
        given = [p for n, p in parsed if n == name]
        tasks[name] = [load_adapter(p) for p in given] if given else [_recorded_adapter(a) for a in rec["adapters"]]
    return loaded, tasks


def verify_bundle(
    bundle_dir: str | Path,
    base: str | Path | None = None,
    adapters: list[str | Path] | None = None,
    data: str | Path | None = None,
    max_new_tokens: int = 32,
    layers: int | None = None,
    backend: str = "onnxruntime",
    log: Callable[[str], None] = lambda msg: None,
    oracle: str = "auto",
) -> dict:
    """Verify a finished bundle. Sources default to those recorded in the manifest, checked by fingerprint.

    adapters: PATH or NAME=PATH entries, as build takes them (see reference_adapters)."""
    from ..bundle import read_manifest
    from ..model import fingerprint

    check_max_new_tokens(max_new_tokens)  # before anything loads
    check_oracle_option(oracle)
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    if base is None:
        base = Path(manifest["base"]["path"])
        if not base.exists():
            raise VlexportError(f"the base recorded in the bundle, '{base}', no longer exists; pass --base")
        if fingerprint(base) != manifest["base"]["fingerprint"]:
            raise VlexportError(
                f"the base at '{base}' changed since the bundle was built (fingerprint differs); pass --base to "
                "check against it anyway, or rebuild"
            )
    loaded, tasks = reference_adapters(manifest, adapters)
    return verify_directory(bundle_dir, manifest, Path(base), loaded, data=data, max_new_tokens=max_new_tokens,
                            layers=layers, backend=backend, tasks=tasks, log=log, oracle=oracle)

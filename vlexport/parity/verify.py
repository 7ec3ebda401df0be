"""`vlexport verify`: compare a bundle, part by part and end to end, with the PyTorch reference (adapters unmerged).

Checks per case (image + prompt):
  vision   image_features        bundle preprocessing + vision part vs HF processor + reference vision path
  decoder  logits                teacher-forced over the reference's continuation, through the bundle's KV cache
  generate tokens                free-running greedy decoding, exact match and first divergence
Thresholds come from the bundle's target profile, per precision.
"""

from __future__ import annotations

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


def _reference_features(model, pixel_values) -> np.ndarray:
    import torch

    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = llava.config
    with torch.no_grad():
        out = llava.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        )
    return torch.cat(list(out.pooler_output), dim=0).numpy()


def _reference_logits(model, inputs, continuation: list[int]) -> np.ndarray:
    """Logits that predict each continuation token, from one forward pass over prompt + continuation."""
    import torch

    ids = torch.cat([inputs["input_ids"], torch.tensor([continuation[:-1]], dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], attention_mask=torch.ones_like(ids)).logits
    start = inputs["input_ids"].shape[1] - 1
    return logits[0, start : start + len(continuation)].numpy()


def _bundle_logits(bundle, prompt_ids: list[int], features: np.ndarray, continuation: list[int],
                   task: str | None = None) -> np.ndarray:
    """The bundle's logits for the same positions: prefill, then one decode step per teacher-forced token."""
    ids = np.array([prompt_ids], dtype=np.int64)
    past, n_prefix, offset = bundle.initial_state(task)
    mask = np.ones((1, n_prefix + ids.shape[1]), dtype=np.int64)
    pos = offset + np.arange(ids.shape[1], dtype=np.int64)[None]
    logits, past = bundle.decode_step(bundle.embed(ids, features, task), mask, pos, past, task)
    rows = [logits[0, -1]]
    for token in continuation[:-1]:
        mask = np.ones((1, mask.shape[1] + 1), dtype=np.int64)
        pos = pos[:, -1:] + 1
        step = np.array([[token]], dtype=np.int64)
        logits, past = bundle.decode_step(bundle.embed(step, None, task), mask, pos, past, task)
        rows.append(logits[0, -1])
    return np.stack(rows)


def run_case(case: Case, bundle, model, processor, max_new_tokens: int, task: str | None = None) -> dict:
    from ..backends.torch_reference import reference_generate

    text = bundle.chat_prompt(case.prompt) if case.prompt is not None else case.raw_prompt
    inputs = processor(images=case.image, text=text, return_tensors="pt")
    prompt_ids = bundle.encode(text)
    if prompt_ids != inputs["input_ids"][0].tolist():
        raise VlexportError(f"case {case.name}: the bundle's tokenizer disagrees with the base processor on the prompt")

    ref_features = _reference_features(model, inputs["pixel_values"])
    features = bundle.image_features(bundle.pixel_values(case.image), task)
    vision = {
        "cosine": metrics.cosine(ref_features, features),
        "norm_ratio": metrics.norm_ratio(ref_features, features),
        "scale": float(np.abs(ref_features).max()),
        **metrics.error_stats(ref_features, features),
    }
    vision["max_rel_to_scale"] = vision["max_abs"] / max(vision["scale"], 1e-12)

    ref_tokens = reference_generate(model, processor, case.image, text, max_new_tokens)
    test = bundle.generate(case.image, raw_prompt=text, max_new_tokens=max_new_tokens, task=task)
    greedy = metrics.greedy_match(ref_tokens, test.token_ids)

    ref_logits = _reference_logits(model, inputs, ref_tokens)
    test_logits = _bundle_logits(bundle, prompt_ids, features, ref_tokens, task)
    decoder = metrics.logit_metrics(ref_logits, test_logits)
    decoder["kl_per_token"] = metrics.kl_per_token(ref_logits, test_logits).tolist()
    return {
        "name": case.name if task is None else f"{task}:{case.name}",
        "task": task,
        "prompt": case.prompt if case.prompt is not None else case.raw_prompt,
        "vision": {"image_features": vision},
        "decoder": {"logits": decoder},
        "generate": {"tokens": {**greedy, "ref": ref_tokens, "test": test.token_ids}},
    }


def executed_precision(manifest: dict, backend: str) -> dict:
    """The precision each part runs at on this backend: the ONNX parts' own, or the engines'."""
    parts = manifest["engines"]["parts"] if backend == "tensorrt" else manifest["parts"]
    return {name: part["precision"] for name, part in parts.items()}


PRECISION_ORDER = ("int8", "fp16", "fp32")  # least precise first


def thresholds_for(manifest: dict, backend: str = "onnxruntime") -> dict:
    """Each threshold from the [parity.<precision>] section of the precision its output depends on.

    Vision features depend on the vision part alone. Logits and greedy tokens depend on every part upstream (an INT8
    vision part moves an FP32 decoder's logits), so they take the least precise of vision, embed and decoder."""
    parity = manifest["target"]["parity"]
    precision = executed_precision(manifest, backend)
    end_to_end = min((precision[p] for p in ("vision", "embed", "decoder") if p in precision), key=PRECISION_ORDER.index)
    out = {}
    for key, (part, output, *_rest) in THRESHOLDS.items():
        p = precision["vision"] if part == "vision" else precision["decoder"] if output.startswith("present") else end_to_end
        section = parity.get(p, {})
        if key in section:
            out[key] = section[key]
    return out


def evaluate(cases: list[dict], thresholds: dict) -> tuple[list[dict], bool]:
    """One check per threshold; each names the part, output, metric, worst case and the bound."""
    checks = []
    for key, limit in thresholds.items():
        if key not in THRESHOLDS:
            continue
        part, pattern, metric, op = THRESHOLDS[key]
        present = cases[0].get(part, {})
        if pattern.endswith("*"):
            outputs = [o for o in present if o.startswith(pattern[:-1])]
        else:
            outputs = [pattern] if pattern in present else []
        for output in outputs:
            checks.append(_check(cases, key, part, output, metric, op, limit))
    return checks, all(c["passed"] for c in checks)


def _check(cases, key, part, output, metric, op, limit) -> dict:
    if metric == "exact_match_rate":
        value = float(np.mean([c[part][output]["exact"] for c in cases]))
        worst = next((c["name"] for c in cases if not c[part][output]["exact"]), None)
    elif metric == "top1_agreement" and all("tokens" in c[part][output] for c in cases):
        # A rate over every teacher-forced token. Per case it would move in steps of 1/32, and its minimum would
        # turn "top-1 >= 98%" into "no token may differ".
        stats = [c[part][output] for c in cases]
        value = sum(s["top1_agreement"] * s["tokens"] for s in stats) / max(1, sum(s["tokens"] for s in stats))
        worst = min(cases, key=lambda c: c[part][output]["top1_agreement"])["name"]
    else:
        values = [(c[part][output][metric], c["name"]) for c in cases]
        value, worst = (max if op == "<=" else min)(values)
    passed = value <= limit if op == "<=" else value >= limit
    return {"part": part, "output": output, "metric": metric, "value": value, "limit": limit,
            "op": op, "passed": bool(passed), "worst_case": worst, "threshold": key}


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
) -> dict:
    """tasks: {name: [run-time adapters]}; each task is checked against its own reference (base adapters + its own)."""
    from transformers import AutoProcessor

    from ..backends.torch_reference import build_reference
    from ..runtime import Bundle

    cases_in = folder_cases(data) if data else builtin_cases()
    tasks = tasks or {}
    check_first_layers(layers, manifest["model"]["num_layers"], bool(tasks))
    if layers is not None:
        if backend != "onnxruntime":
            raise VlexportError("--layers runs on the ONNX parts only (it cuts the decoder graph); drop --backend")
        from .layers import verify_first_layers

        results = verify_first_layers(bundle_dir, manifest, base, adapters, layers, cases_in, log)
    else:
        bundle = Bundle(bundle_dir, manifest=manifest, backend=backend)  # refuses a backend the bundle cannot run
        processor = AutoProcessor.from_pretrained(str(base))
        results = []
        # Without a 'default' task, a request with no task runs the base alone: check that path too.
        runs = ([] if "default" in tasks else [(None, [])]) + list(tasks.items())
        for task, task_adapters in runs:
            model = build_reference(base, [*adapters, *task_adapters])
            for case in cases_in:
                log(f"parity case {case.name}" + (f" (task {task})" if task else ""))
                results.append(run_case(case, bundle, model, processor, max_new_tokens, task))
    thresholds = thresholds_for(manifest, backend)
    checks, passed = evaluate(results, thresholds)
    failed = [c for c in checks if not c["passed"]]
    summary = "all checks passed" if passed else "; ".join(
        f"{c['part']}/{c['output']} {c['metric']}={c['value']:.3g} (limit {c['op']} {c['limit']:g}, worst case {c['worst_case']})"
        for c in failed
    )
    nonfinite = [c["name"] for c in results if c.get("decoder", {}).get("logits", {}).get("nonfinite")]
    if nonfinite:  # say it plainly: NaN/inf logits are an overflow (FP16 range), not a rounding difference
        summary += f"; non-finite logits (overflow?) in {', '.join(nonfinite[:3])}" + (" ..." if len(nonfinite) > 3 else "")
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
        "backend": backend,
        "precision": executed_precision(manifest, backend),
        "thresholds": thresholds,
        "max_new_tokens": max_new_tokens,
        "mode": "full" if layers is None else f"first {layers} decoder layers, teacher-forced over the prompt",
        "checks": checks,
        "parts": _aggregate(results),
        "cases": results,
    }


def _recorded_adapter(rec: dict):
    """An adapter the manifest records, refused if its file changed since the build."""
    from ..adapters import load_adapter

    a = load_adapter(rec["path"], rec["kind"])
    if a.sha256 != rec["sha256"]:
        raise VlexportError(
            f"adapter '{rec['path']}' changed since the bundle was built (sha256 differs); pass --adapter to "
            "check against it anyway, or rebuild"
        )
    return a


def verify_bundle(
    bundle_dir: str | Path,
    base: str | Path | None = None,
    adapters: list[str | Path] | None = None,
    data: str | Path | None = None,
    max_new_tokens: int = 32,
    layers: int | None = None,
    backend: str = "onnxruntime",
    log: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Verify a finished bundle. Sources default to those recorded in the manifest, checked by fingerprint."""
    from ..adapters import load_adapter
    from ..bundle import read_manifest
    from ..model import fingerprint

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
    if adapters is None:
        loaded = [_recorded_adapter(rec) for rec in manifest["adapters"]]
    else:
        loaded = [load_adapter(p) for p in adapters]
    tasks = {}
    for name, rec in (manifest.get("tasks") or {}).items():
        tasks[name] = [_recorded_adapter(a) for a in rec["adapters"]]
    return verify_directory(bundle_dir, manifest, Path(base), loaded, data=data, max_new_tokens=max_new_tokens,
                            layers=layers, backend=backend, tasks=tasks, log=log)

"""Per-part latency of several bundles of one model (FP32, FP16, INT8 forms) against PyTorch eager FP32, in one run.

Every bundle must come from the same base and adapters: PyTorch runs that model once, as the common baseline.
The decode floor of each bundle is the bytes its decoder actually reads per token (its weight file as stored, plus
the FP32 KV cache at that context) divided by the measured read bandwidth.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import VlexportError
from ..progress import track
from .bandwidth import measure_read_bandwidth
from .latency import BundleSide, TorchSide, prompt_ids, timed


def label(manifest: dict) -> str:
    """e.g. 'vision int8 (dynamic), decoder int8 (dynamic)' or 'fp32'."""
    parts = manifest["parts"]
    names = []
    for name in ("vision", "decoder"):
        p = parts[name]
        form = (p.get("lowering") or {}).get("form")
        names.append(f"{name} {p['precision']}" + (f" ({form})" if form else ""))
    precisions = {parts[n]["precision"] for n in ("vision", "decoder")}
    return precisions.pop() if len(precisions) == 1 and "fp32" in precisions else ", ".join(names)


def decoder_bytes(bundle_dir: Path, manifest: dict) -> int:
    """Bytes of the decoder as stored: what one batch-1 decode step streams from memory."""
    f = bundle_dir / manifest["parts"]["decoder"]["file"]
    data = f.with_name(f.name + ".data")
    return f.stat().st_size + (data.stat().st_size if data.exists() else 0)


def run_precision_bench(bundle_dirs: list[Path], threads: int = 2, contexts=(64, 300), prompt_tokens: int | None = None,
                        repeats: int = 10, warmup: int = 2, log: Callable[[str], None] = lambda m: None) -> dict:
    import torch

    from ..runtime import Bundle
    from .run import machine, merged_torch_model

    torch.set_num_threads(threads)
    bundles = [Bundle(d, threads=threads) for d in bundle_dirs]
    first = bundles[0].manifest
    for b in bundles[1:]:
        same = (b.manifest["base"]["fingerprint"] == first["base"]["fingerprint"]
                and [a["sha256"] for a in b.manifest["adapters"]] == [a["sha256"] for a in first["adapters"]])
        if not same:
            raise VlexportError(f"bundle '{b.path}' was built from another base or other adapters than '{bundles[0].path}'; "
                                "compare bundles of one model")
    model = merged_torch_model(first)
    theirs = TorchSide(model)
    rng = np.random.default_rng(0)
    n = prompt_tokens or bundles[0].num_image_tokens + 64
    sides = [BundleSide(b) for b in bundles]
    pixels = sides[0].pixels()
    ids = prompt_ids(bundles[0], n, rng)
    feats = bundles[0].image_features(pixels)
    embeds = bundles[0].embed(ids, feats)

    def cases(vision, prefill, decode):
        return ([("vision_ms", {"images": 1}, vision(pixels), warmup, repeats),
                 ("prefill_ms", {"prompt_tokens": int(ids.shape[1])}, prefill, 1, max(3, repeats // 2))]
                + [("decode_ms", {"context": c}, decode(c), warmup, 2 * repeats) for c in contexts])

    timings = []
    torch_cases = cases(theirs.vision, theirs.prefill(embeds), lambda c: theirs.decode(c, rng))
    with track(log, "bench: parts", total=(len(sides) + 1) * len(torch_cases)) as advance:
        def time_all(name, side_cases):
            out = []
            for metric, where, fn, w, r in side_cases:
                out.append(timed(fn, w, r))
                advance(1, " ".join([name, metric, *(f"{k} {v}" for k, v in where.items())]))
            return out

        for side in sides:  # bundles first, PyTorch last: ORT's spinning threads would otherwise slow PyTorch
            log(f"timing {side.b.path.name}")
            timings.append(time_all(side.b.path.name, cases(side.vision, side.prefill(ids, feats), side.decode)))
            time.sleep(1.0)
        log("timing PyTorch eager")
        torch_t = time_all("pytorch", torch_cases)
    bandwidth = measure_read_bandwidth(threads, megabytes=max(64, decoder_bytes(bundles[0].path, first) // 2**20))
    m = first["model"]
    rows = []
    for b, ts in zip(bundles, timings):
        weights = decoder_bytes(b.path, b.manifest)
        for (metric, where, *_), t, p in zip(torch_cases, ts, torch_t):
            row = {"metric": metric, **where, "bundle": b.path.name, "precision": label(b.manifest),
                   "ms": round(t.p50, 3), "p90": round(t.p90, 3), "pytorch": round(p.p50, 3),
                   "ratio": round(p.p50 / t.p50, 3)}
            if metric == "decode_ms":
                kv = 2 * m["num_layers"] * m["num_kv_heads"] * m["head_dim"] * where["context"] * 4
                floor = 1000 * (weights + kv) / bandwidth
                row.update(floor_ms=round(floor, 3), floor_ratio=round(t.p50 / floor, 3))
            rows.append(row)
    return {"bundles": [str(b.path) for b in bundles], "threads": threads, "machine": machine(),
            "read_bandwidth_gbs": round(bandwidth / 1e9, 2),
            "pytorch": "eager fp32, the bundles' merged weights, transformers' modules, same thread count",
            "rows": rows}


def markdown(result: dict) -> str:
    mach = result["machine"]
    lines = [f"{result['threads']} threads, {mach['cpu']} ({mach['cores']} cores), onnxruntime {mach['onnxruntime']}, "
             f"torch {mach['torch']}; read bandwidth {result['read_bandwidth_gbs']} GB/s. One run; ratio = PyTorch eager "
             "FP32 p50 / bundle p50.", "",
             "| metric | at | bundle | precision | p50 ms | p90 ms | PyTorch ms | ratio | floor ms | vs floor |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: (r["metric"], r.get("context", 0), r["bundle"])):
        at = f"context {r['context']}" if "context" in r else (f"{r['prompt_tokens']} tokens" if "prompt_tokens" in r else "1 image")
        lines.append(f"| {r['metric']} | {at} | {r['bundle']} | {r['precision']} | {r['ms']:.2f} | {r['p90']:.2f} | "
                     f"{r['pytorch']:.2f} | {r['ratio']:.2f}x | {r.get('floor_ms', '')} | "
                     f"{str(r['floor_ratio']) + 'x' if 'floor_ratio' in r else ''} |")
    return "\n".join(lines) + "\n"

"""Chunked prefill against one-shot prefill on long prompts, through the runtime's KV loop (Bundle.prefill with
Bundle.prefill_chunk set). Rounds interleave the settings; the median per setting is reported.

Usage: python bench/prefill_chunks.py BUNDLE OUT_STEM [--threads 2] [--tokens 1000] [--rounds 5]
Writes OUT_STEM.json and OUT_STEM.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import vlexport
from vlexport.bench.run import machine

CHUNKS = (None, 64, 128, 256, 512)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[300, 1000])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    bundle = vlexport.load(args.bundle, threads=args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for n in args.tokens:
        ids = rng.integers(3, bundle.image_token_id - 1, size=(1, n), dtype=np.int64)
        samples = {c: [] for c in CHUNKS}
        diffs = {c: 0.0 for c in CHUNKS}
        bundle.prefill_chunk = None
        reference = bundle.prefill(ids, None, capacity=n + 8).logits[0]
        for r in range(args.rounds + 1):  # round 0 warms up
            for chunk in (CHUNKS if r % 2 else CHUNKS[::-1]):
                bundle.prefill_chunk = chunk
                t = time.perf_counter()
                state = bundle.prefill(ids, None, capacity=n + 8)
                ms = 1000 * (time.perf_counter() - t)
                diffs[chunk] = max(diffs[chunk], float(np.abs(state.logits[0] - reference).max()))
                if r:
                    samples[chunk].append(ms)
        for chunk in CHUNKS:
            rows.append({"prompt_tokens": n, "chunk": chunk or "one-shot", "ms_p50": round(float(np.median(samples[chunk])), 2),
                         "ms_min": round(float(np.min(samples[chunk])), 2),
                         "max_abs_logit_diff_vs_one_shot": diffs[chunk] if chunk else 0.0})
        bundle.prefill_chunk = None
    result = {"bundle": str(args.bundle), "decoder_form": bundle.decoder_form(), "threads": args.threads,
              "rounds": args.rounds, "machine": machine(), "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [f"Prefill through Bundle.prefill, decoder form {result['decoder_form']}, {args.threads} threads, "
             f"{result['machine']['cpu']}; median of {args.rounds} interleaved rounds "
             f"(`python bench/prefill_chunks.py {args.bundle.name} ...`).", "",
             "| prompt tokens | chunk | p50 ms | min ms | max abs logit diff vs one-shot |", "|---|---|---|---|---|"]
    lines += [f"| {r['prompt_tokens']} | {r['chunk']} | {r['ms_p50']} | {r['ms_min']} | "
              f"{r['max_abs_logit_diff_vs_one_shot']:.2e} |" for r in rows]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Where `vlexport run`'s memory goes on a 7B-shaped INT4 bundle: one generate in a fresh process per variant, with
the process's RSS split into anonymous memory (ONNX Runtime's allocations: prepacked weights, arena, casts) and
file-backed pages (external data ONNX Runtime maps), after each part's session opens and at the end.

    python bench/int4_7b_memory.py BUNDLE IMAGE [--variants default,no-arena] [--threads 2] [--max-new-tokens 4]

Variants set ONNX Runtime session options on the bundle's runners before their sessions open:
  default      what vlexport.runtime opens (OrtRunner)
  no-arena     enable_cpu_mem_arena = False (no growing CPU arena for activations)
  no-arena-init  also session.use_device_allocator_for_initializers = 1 (initializers outside any arena)
  release-vision  the vision session is closed as soon as it has encoded the image (before the prefill)
  as-run       what `vlexport run` does: sessions open on first use, and generate(release_vision=True) closes the
               vision session before the decoder's opens
Prints one JSON object per variant.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) // 1024  # MiB
    return out


def probe(bundle_path: str, image: str, variant: str, threads: int, tokens: int) -> dict:
    import onnxruntime as ort

    from vlexport.runtime import Bundle

    bundle = Bundle(bundle_path, threads=threads)
    marks = {"bundle": _status()}
    if variant == "as-run":
        t = time.perf_counter()
        gen = bundle.generate(image, "What is in the image?", max_new_tokens=tokens, release_vision=True)
        marks["generate"] = {**_status(), "seconds": round(time.perf_counter() - t, 1), "tokens": len(gen.token_ids)}
        return {"variant": variant, "marks": marks}
    for name, runner in bundle.runners.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        if variant in ("no-arena", "no-arena-init"):
            opts.enable_cpu_mem_arena = False
        if variant == "no-arena-init":
            opts.add_session_config_entry("session.use_device_allocator_for_initializers", "1")
        if variant not in ("default", "no-arena", "no-arena-init", "release-vision"):  # as-run: above
            raise SystemExit(f"unknown variant {variant}")
        t = time.perf_counter()
        runner.__dict__["session"] = ort.InferenceSession(str(runner.onnx_path), sess_options=opts,
                                                           providers=["CPUExecutionProvider"])
        marks[f"{name} open"] = {**_status(), "seconds": round(time.perf_counter() - t, 1)}
    if variant == "release-vision":  # what a one-shot run could do: drop the vision session once it has run
        vision = bundle.runners["vision"]
        infer = vision.infer

        def infer_once(feed):
            out = infer(feed)
            vision.__dict__.pop("session", None)
            marks["vision released"] = _status()
            return out

        vision.infer = infer_once
    t = time.perf_counter()
    gen = bundle.generate(image, "What is in the image?", max_new_tokens=tokens)
    marks["generate"] = {**_status(), "seconds": round(time.perf_counter() - t, 1), "tokens": len(gen.token_ids)}
    return {"variant": variant, "marks": marks}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("image")
    ap.add_argument("--variants", default="default,no-arena")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=4)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(probe(args.bundle, args.image, args.child, args.threads, args.max_new_tokens)))
        return
    for variant in args.variants.split(","):
        out = subprocess.run([sys.executable, __file__, args.bundle, args.image, "--threads", str(args.threads),
                              "--max-new-tokens", str(args.max_new_tokens), "--child", variant],
                             capture_output=True, text=True)
        if out.returncode:
            print(json.dumps({"variant": variant, "error": out.stderr[-2000:]}))
        else:
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()

"""Decode speed of a 7B-shaped INT4 bundle against the INT4 bandwidth floor, without PyTorch.

`vlexport bench` times PyTorch eager FP32 on the bundle's merged weights in the same run: 28 GB for a 7B, which
the 24 GB bench machine cannot hold. This times only the bundle's decode step (the same BundleSide.decode and the
same floor as vlexport.bench.run: decoder bytes as stored plus the KV cache at the context, over ONNX Runtime's
matrix-vector read bandwidth measured on a working set of the decoder's size) and prints one JSON object.

    python bench/int4_7b_decode.py BUNDLE [--contexts 64,300] [--threads 2] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--contexts", default="64,300")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    from vlexport.bench.bandwidth import decode_bytes_per_token, measure_read_bandwidth
    from vlexport.bench.latency import BundleSide, timed
    from vlexport.bench.precision import decoder_bytes
    from vlexport.bench.run import machine
    from vlexport.runtime import Bundle

    t = time.perf_counter()
    bundle = Bundle(args.bundle, threads=args.threads)
    load_s = time.perf_counter() - t
    rss_loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    side = BundleSide(bundle)
    rows = []
    for context in [int(c) for c in args.contexts.split(",")]:
        timing = timed(side.decode(context), 2, 2 * args.repeats)
        rows.append({"context": context, "decode_ms_p50": round(timing.p50, 2), "decode_ms_p90": round(timing.p90, 2),
                     "tok_s": round(1000 / timing.p50, 3)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # kept even if the bandwidth probe fails
    rss_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    manifest = bundle.manifest
    weight_bytes = decoder_bytes(args.bundle, manifest)
    del bundle, side  # the bandwidth probe needs its own working set of the decoder's size
    # A working set of the decoder's size, up to 1.5 GiB: the probe is one initializer, which protobuf caps at
    # 2 GB (a 7B's 3.3 GB INT4 decoder failed there), and 1.5 GiB is far beyond any cache all the same.
    bandwidth = measure_read_bandwidth(args.threads, megabytes=min(1536, max(64, weight_bytes // 2**20)))
    m = manifest["model"]
    for r in rows:
        floor_ms = 1000 * decode_bytes_per_token(weight_bytes, 1, m["num_layers"], m["num_kv_heads"], m["head_dim"],
                                                 r["context"]) / bandwidth
        r.update(floor_ms=round(floor_ms, 2), floor_ratio=round(r["decode_ms_p50"] / floor_ms, 3))
    print(json.dumps({"bundle": str(args.bundle), "machine": machine(), "threads": args.threads,
                      "decoder_bytes": weight_bytes, "read_bandwidth_gb_s": round(bandwidth / 1e9, 2),
                      "session_load_s": round(load_s, 1), "rss_after_load_mb": round(rss_loaded_mb),
                      "rss_peak_mb": round(rss_peak_mb), "decode": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Decode ms/step of the decoder's ORT-native form against the portable graph, at several contexts, with the floor.

    python bench/ort_native.py --base SMALL_LLAVA_DIR --out bench/results/DATE-MACHINE/ort-native-decode

Both graphs are made from the same fp32 weights (the portable one with torch.onnx.export as `vlexport build` does for
TensorRT, the native one with vlexport.export.ort_native); `cpu-int8`'s ONNX Runtime form is dynamic INT8 with every
weight product quantized. Each is timed as the runtime drives it: the native graph through SharedKvBuffer (past and
present bound to one buffer), the portable graph with session.run, present fed back as the next past. A bank decoder
(bottleneck slots present, none fed) is timed against the same base without slots. The floor is the decoder's weight
bytes plus the KV cache at that context, read at the bandwidth vlexport.bench.bandwidth measures.
Results: OUT.json and OUT.md. Interleaved rounds; the median of every step of every round is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np


def graph_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + ".data")) if p.exists())


def make_graphs(base: Path, work: Path, log) -> dict[str, Path]:
    import onnx
    import torch

    from vlexport import slots as bottleneck
    from vlexport.export.onnx import add_slot_defaults, export_part, part_specs
    from vlexport.export.ort_native import write_native_decoder
    from vlexport.model import EXPORT_ATTENTION, facts_from_config, load_llava
    from vlexport.model import check_base_dir
    from vlexport.precision.int8 import quantize, weight_matmuls

    work.mkdir(parents=True, exist_ok=True)
    model = load_llava(base, dtype="float32", attention=EXPORT_ATTENTION["float32"])
    facts = facts_from_config(check_base_dir(base))
    L, H = facts.num_layers, facts.hidden_size
    graphs = {}
    for slots in (False, True):
        tag = "-slots" if slots else ""
        native = work / f"native{tag}.onnx"
        if not native.exists():
            write_native_decoder(model, native, slots)
            if slots:
                add_slot_defaults(native, bottleneck.empty_feed("decoder", L, H))
        graphs[f"native{tag}"] = native
        portable = work / f"portable{tag}.onnx"
        if not portable.exists():
            log(f"exporting the portable decoder{tag}")
            spec = next(s for s in part_specs(model, facts, frozenset({"decoder"} if slots else ())) if s.name == "decoder")
            with torch.no_grad():
                export_part(spec, portable)
            if slots:
                add_slot_defaults(portable, bottleneck.empty_feed("decoder", L, H))
        graphs[f"portable{tag}"] = portable
    for name in ("native", "portable", "native-slots", "portable-slots"):
        src, dst = graphs[name], work / f"{name}.int8.onnx"
        if not dst.exists():
            log(f"quantizing {name} (dynamic INT8, every weight product)")
            nodes = [m.node for m in weight_matmuls(onnx.load(str(src), load_external_data=False))]
            quantize(src, dst, "dynamic", nodes)
        graphs[f"{name}-int8"] = dst
    return graphs


class NativeDecode:
    def __init__(self, session, L, kv, hd, H, context, steps, rng):
        from vlexport.backends.ort_kv import SharedKvBuffer

        self.buf = SharedKvBuffer(session, L, kv, hd, rows=1, capacity=context + steps + 8)  # + the warm-up steps
        for a in self.buf.arrays:
            a[:, :, :context] = rng.standard_normal(a[:, :, :context].shape, dtype=np.float32)
        self.buf.lengths[:] = context
        self.context, self.H = context, H
        self.x = rng.standard_normal((1, 1, H), dtype=np.float32)

    def reset(self):
        self.buf.lengths[:] = self.context

    def step(self):
        self.buf.step(self.x, self.buf.lengths[:, None].copy(), {})


class PortableDecode:
    def __init__(self, session, L, kv, hd, H, context, steps, rng):
        self.session = session
        self.start = {f"past_key_values.{i}.{k}": rng.standard_normal((1, kv, context, hd), dtype=np.float32)
                      for i in range(L) for k in ("key", "value")}
        self.context = context
        self.x = rng.standard_normal((1, 1, H), dtype=np.float32)
        self.reset()

    def reset(self):
        self.past, self.n = self.start, self.context

    def step(self):
        feed = {"inputs_embeds": self.x, "attention_mask": np.ones((1, self.n + 1), np.int64),
                "position_ids": np.array([[self.n]], np.int64), **self.past}
        names = [o.name for o in self.session.get_outputs()]
        out = dict(zip(names, self.session.run(names, feed)))
        self.past = {k.replace("present.", "past_key_values."): v for k, v in out.items() if k.startswith("present.")}
        self.n += 1


def main(argv=None) -> int:
    import onnxruntime as ort

    from vlexport.bench.bandwidth import measure_read_bandwidth
    from vlexport.model import check_base_dir, facts_from_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path, help="results path without extension (.json and .md)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/vlexport-ort-native-bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", type=int, nargs="+", default=[300, 1000, 2000])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--graphs", nargs="+", default=None, help="subset of graph names to time")
    args = ap.parse_args(argv)

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    facts = facts_from_config(check_base_dir(args.base))
    L, kv, hd, H = facts.num_layers, facts.num_kv_heads, facts.head_dim, facts.hidden_size
    graphs = make_graphs(args.base, args.work, log)
    if args.graphs:
        graphs = {k: v for k, v in graphs.items() if k in args.graphs}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.log_severity_level = 3
    sessions = {name: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for name, p in graphs.items()}
    rng = np.random.default_rng(0)
    drivers = {(name, c): (NativeDecode if name.startswith("native") else PortableDecode)(
        sessions[name], L, kv, hd, H, c, args.steps, rng) for name in graphs for c in args.contexts}
    samples = {key: [] for key in drivers}
    for r in range(args.rounds):
        log(f"round {r + 1}/{args.rounds}")
        for key, driver in drivers.items():
            driver.reset()
            for _ in range(3):  # warm-up steps, not timed
                driver.step()
            for _ in range(args.steps):
                t = time.perf_counter()
                driver.step()
                samples[key].append(time.perf_counter() - t)
    bandwidth = measure_read_bandwidth(args.threads)
    rows = []
    for (name, c), times in samples.items():
        ms = 1e3 * float(np.median(times))
        bytes_read = graph_bytes(graphs[name]) + 2 * L * kv * hd * c * 4
        floor_ms = 1e3 * bytes_read / bandwidth
        rows.append({"graph": name, "context": c, "ms": ms, "floor_ms": floor_ms, "floor_ratio": ms / floor_ms,
                     "weight_bytes": graph_bytes(graphs[name])})
    by = {(r["graph"], r["context"]): r for r in rows}
    result = {"command": "python " + " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
              "machine": {"platform": platform.platform(), "processor": platform.processor(), "threads": args.threads,
                          "load_average_1_5_15min": list(os.getloadavg())},
              "onnxruntime": ort.__version__, "base": str(args.base), "bandwidth_gb_s": bandwidth / 1e9,
              "steps_per_round": args.steps, "rounds": args.rounds, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# ORT-native vs portable decoder, decode ms/step ({args.threads} threads)", "",
             f"`{result['command']}`", "", f"Read bandwidth {bandwidth / 1e9:.1f} GB/s; median of {args.rounds} "
             f"interleaved rounds of {args.steps} steps.", "",
             "| graph | " + " | ".join(f"ctx {c} ms (floor ratio)" for c in args.contexts) + " |",
             "|---|" + "---|" * len(args.contexts)]
    for name in graphs:
        lines.append(f"| {name} | " + " | ".join(f"{by[(name, c)]['ms']:.2f} ({by[(name, c)]['floor_ratio']:.2f}x)"
                                                 for c in args.contexts) + " |")
    pairs = [("native", "portable"), ("native-int8", "portable-int8"), ("native-slots", "native"),
             ("native-slots-int8", "native-int8"), ("portable-slots", "portable")]
    lines += ["", "| ratio | " + " | ".join(f"ctx {c}" for c in args.contexts) + " |", "|---|" + "---|" * len(args.contexts)]
    for a, b in pairs:
        if a in graphs and b in graphs:
            lines.append(f"| {a} / {b} | " + " | ".join(f"{by[(a, c)]['ms'] / by[(b, c)]['ms']:.3f}"
                                                       for c in args.contexts) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""ONNX Runtime CPU: resident bytes per weight byte, for each precision vlexport ships (the memory plan's factors).

A Llama-shaped stack of weight MatMuls (hidden 768, MLP 3072, 12 layers: the small fixture's decoder products,
~113M weights) is written in FP32 and lowered exactly as vlexport lowers parts: FP16 with onnxruntime's float16
converter (vlexport.precision.fp16), INT8 dynamic (quantize_dynamic, per channel: cpu-int8's decoder form) and INT8
weight-only / INT4 with MatMulNBitsQuantizer (accuracy level 4). Each graph is opened in a fresh process, one
inference is run (ORT allocates prepacked weights lazily), and the growth of the process's RSS is divided by the
weight bytes stored on disk for that graph.

    python bench/resident_memory.py [--out bench/results/2026-12-02-epyc-2core/resident-memory]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HIDDEN, MLP = 768, 3072
LAYERS = int(__import__("os").environ.get("RESIDENT_LAYERS", 12))


def _write_fp32(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(LAYERS):
        for j, (k, n) in enumerate([(HIDDEN, 3 * HIDDEN), (3 * HIDDEN, HIDDEN), (HIDDEN, 2 * MLP), (2 * MLP, HIDDEN)]):
            # The products chain through Slice-free reshapes: [*, k] x [k, n]; widths alternate so the chain is valid.
            w = (rng.standard_normal((k, n), dtype=np.float32) * 0.02)
            name = f"w{i}_{j}"
            inits.append(numpy_helper.from_array(w, name))
            out = f"h{i}_{j}"
            nodes.append(helper.make_node("MatMul", [x, name], [out], name=f"MatMul_{i}_{j}"))
            x = out
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", HIDDEN])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, "s", HIDDEN])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")


def _lowered(fp32: Path, precision: str) -> Path:
    from vlexport.precision.fp16 import to_fp16
    from vlexport.precision.int4 import Int4Options, quantize_int4
    from vlexport.precision.int8 import quantize, weight_matmuls
    import onnx

    dst = fp32.with_name(f"{precision}.onnx")
    nodes = [m.node for m in weight_matmuls(onnx.load(str(fp32), load_external_data=False))]
    if precision == "fp32":
        return fp32
    if precision == "fp16":
        to_fp16(fp32, dst)
    elif precision == "int8-dynamic":
        quantize(fp32, dst, "dynamic", nodes)
    elif precision == "int8-weight-only":
        quantize(fp32, dst, "weight-only", nodes)
    elif precision == "int4":
        quantize_int4(fp32, dst, "matmulnbits", Int4Options(), nodes, [], 32)
    return dst


def _measure_child(path: str) -> None:
    import resource

    import onnxruntime as ort

    def rss() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    before = rss()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.ones((1, 8, HIDDEN), np.float32)})
    after = rss()
    print(json.dumps({"rss_growth": after - before, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/2026-12-02-epyc-2core/resident-memory")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _measure_child(args.child)
        return
    rows = []
    with tempfile.TemporaryDirectory() as d:
        fp32 = Path(d) / "fp32.onnx"
        _write_fp32(fp32)
        for precision in ("fp32", "fp16", "int8-dynamic", "int8-weight-only", "int4"):
            path = _lowered(fp32, precision)
            stored = path.stat().st_size + (path.with_name(path.name + ".data").stat().st_size
                                            if path.with_name(path.name + ".data").exists() else 0)
            got = json.loads(subprocess.run([sys.executable, __file__, "--child", str(path)], check=True,
                                            capture_output=True, text=True).stdout.strip().splitlines()[-1])
            rows.append({"precision": precision, "stored_mb": round(stored / 1e6, 1),
                         "resident_growth_mb": round(got["rss_growth"] / 1e6, 1),
                         "resident_per_stored_byte": round(got["rss_growth"] / stored, 2)})
            print(rows[-1], flush=True)
    import platform

    import onnxruntime

    result = {"command": "python bench/resident_memory.py", "onnxruntime": onnxruntime.__version__,
              "machine": platform.processor() or platform.machine(), "model": f"{LAYERS}x4 MatMuls, hidden {HIDDEN}, "
              f"MLP {MLP} (the small fixture's decoder products)", "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["ONNX Runtime CPU resident bytes per stored weight byte (`python bench/resident_memory.py`; onnxruntime "
             f"{onnxruntime.__version__}, 2 threads; one session per fresh process, RSS growth after creating it and "
             "running one inference).", "", "| precision | stored MB | resident growth MB | resident / stored |",
             "|---|---|---|---|"]
    lines += [f"| {r['precision']} | {r['stored_mb']} | {r['resident_growth_mb']} | {r['resident_per_stored_byte']}x |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

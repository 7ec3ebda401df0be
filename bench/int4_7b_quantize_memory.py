"""Peak memory of the INT4 quantize step alone, lazy (one weight at a time) against the eager quantizer, on a
synthetic FP16 stack of weight MatMuls in external data (a 7B decoder's layer shapes, fewer layers).

    python bench/int4_7b_quantize_memory.py [--layers 4] [--dir /tmp/q4mem]

Each mode runs in a fresh process; the figure is the growth of the process's peak RSS (VmHWM) over its RSS
just before quantize_int4 is called, against the FP16 weight bytes on disk. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HIDDEN, MLP = 4096, 11008  # LLaVA-1.5-7B's decoder (Llama-2-7B)


def write_stack(path: Path, layers: int) -> int:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x, total = [], [], "x", 0
    for i in range(layers):
        for j, (k, n) in enumerate([(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, MLP), (HIDDEN, MLP), (MLP, HIDDEN)]):
            src = f"y{i}_5" if j == 6 else x  # down_proj reads up_proj's [*, MLP] output
            w = (rng.standard_normal((k, n)) * 0.02).astype(np.float16)
            inits.append(numpy_helper.from_array(w, f"w{i}_{j}"))
            total += w.nbytes
            out = f"y{i}_{j}"
            nodes.append(helper.make_node("MatMul", [src, f"w{i}_{j}"], [out], name=f"mm_{i}_{j}"))
            if n == HIDDEN:
                x = out
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, HIDDEN])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT16, [1, HIDDEN])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data")
    return total


def child(src: Path, dst: Path, lazy: bool) -> dict:
    import onnx

    from vlexport.precision.int4 import Int4Options, quantize_int4
    from vlexport.precision.int8 import weight_matmuls

    def status(key: str) -> int:  # MiB; VmHWM is this process's own peak (ru_maxrss keeps the forking parent's)
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
        return int(line.split()[1]) // 1024

    nodes = [m.node for m in weight_matmuls(onnx.load(str(src), load_external_data=False))]
    rss = status("VmRSS")
    quantize_int4(src, dst, "matmulnbits", Int4Options(block_size=128, fallback=False, awq=False), nodes, [], 128,
                  lazy=lazy)
    peak = status("VmHWM")
    return {"lazy": lazy, "rss_before_mb": rss, "peak_mb": peak, "growth_mb": peak - rss}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/q4mem"))
    ap.add_argument("--child", choices=["lazy", "eager"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    src = args.dir / "stack.onnx"
    if args.child:
        print(json.dumps(child(src, args.dir / args.child / "q.onnx", args.child == "lazy")))
        return
    weight_bytes = write_stack(src, args.layers)
    rows = []
    for mode in ("lazy", "eager"):
        out = subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--dir", str(args.dir),
                              "--child", mode], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"fp16_weight_mb": weight_bytes // 2**20, "layers": args.layers, "modes": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Decoder graphs alone, one decode step each on a shared KV buffer (past and present bound to one OrtValue, as
Bundle and onnxruntime-genai run them), timed in interleaved rounds in one process: the graph's own cost without
either runtime's loop. Usage: python bench/decoder_graph_ab.py OUT.md LABEL=DECODER.onnx ... (e.g. a bundle's
decoder.int4.onnx, or the peer's model.onnx that `vlexport bench --peer` builds)."""

import sys
import time

import numpy as np
import onnxruntime as ort


def session(path: str, context: int, threads: int = 2):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    s = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    io = s.io_binding()
    rng = np.random.default_rng(0)
    for i in s.get_inputs():
        if i.name == "inputs_embeds":
            io.bind_cpu_input(i.name, rng.standard_normal((1, 1, i.shape[2])).astype(np.float32))
        elif i.name == "input_ids":
            io.bind_cpu_input(i.name, np.array([[5]], np.int64))
        elif i.name == "attention_mask":
            io.bind_cpu_input(i.name, np.ones((1, context + 1), np.int64))
        elif i.name == "position_ids":
            io.bind_cpu_input(i.name, np.array([[context]], np.int64))
        else:  # past_key_values.N.key|value: [1, kv, capacity, head_dim], shared with present.N.*
            kv, hd = i.shape[1], i.shape[3] if isinstance(i.shape[3], int) else 64
            buf = ort.OrtValue.ortvalue_from_numpy(rng.standard_normal((1, kv, context + 64, hd)).astype(np.float32))
            io.bind_ortvalue_input(i.name, buf)
            io.bind_ortvalue_output(i.name.replace("past_key_values", "present"), buf)
    io.bind_output("logits")
    return s, io


def main(out: str, graphs: dict, contexts=(64, 300, 1000), rounds: int = 5, steps: int = 50):
    rows = []
    for context in contexts:
        sessions = {label: session(path, context) for label, path in graphs.items()}
        times = {label: [] for label in graphs}
        for _ in range(rounds):
            for label, (s, io) in sessions.items():
                for _ in range(10):
                    s.run_with_iobinding(io)
                t = time.perf_counter()
                for _ in range(steps):
                    s.run_with_iobinding(io)
                times[label].append(1000 * (time.perf_counter() - t) / steps)
        rows.append((context, {label: float(np.median(v)) for label, v in times.items()}))
    lines = ["| context | " + " | ".join(f"{label} ms" for label in graphs) + " |",
             "|---|" + "---|" * len(graphs)]
    lines += [f"| {c} | " + " | ".join(f"{v[label]:.3f}" for label in graphs) + " |" for c, v in rows]
    text = (f"Decoder graphs alone, 2 threads, median of {rounds} interleaved rounds of {steps} steps, onnxruntime "
            f"{ort.__version__}.\n\n" + "\n".join(lines) + "\n")
    print(text)
    with open(out, "w") as f:
        f.write(text + "\n" + "\n".join(f"- {label}: {path}" for label, path in graphs.items()) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], dict(arg.split("=", 1) for arg in sys.argv[2:]))

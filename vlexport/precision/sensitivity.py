"""Sensitivity fallback: rank the quantized matrix products by their error, keep the worst in higher precision until the
gate holds (INT8 parts keep them in FP32; INT4 parts at INT8 or FP32, see precision/int4.py).

Ranking: each weight MatMul's input is captured from the FP32 part on the calibration set, and the product is
quantized the way the chosen form does it, in NumPy: the error that node alone adds, relative to its output. Cheap
(one FP32 run), and it finds the products whose inputs carry outliers.

Gate: the candidate INT8 part replaces the FP32 one on the calibration set and is held to the target's
[parity.int8] thresholds (vision feature cosine; teacher-forced top-1 and KL for the decoder) against the FP32 part,
with headroom: half the allowed error, since verify judges on other data.
Kept nodes grow 0, 1, 2, 4, ... until the gate holds, then a bisection finds the fewest that suffice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .int8 import WeightMatMul, emulated_error


def rank(fp32_path: Path, matmuls: list[WeightMatMul], feeds: list[dict], form) -> dict[str, float]:
    """node name -> emulated relative error over the feeds. `form` is an INT8 form's name, or a function
    (x, w) -> (squared error, squared reference) that quantizes the way another precision does (INT4)."""
    emulate = form if callable(form) else (lambda x, w: emulated_error(x, w, form))
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(fp32_path))
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name in {m.weight for m in matmuls}}
    by_input: dict[str, list[WeightMatMul]] = {}
    inputs = {n.name: n.input[0] for n in model.graph.node}
    for m in matmuls:
        by_input.setdefault(inputs[m.node], []).append(m)
    # The same graph with each product's input as an extra output, saved beside the part so its external data resolves.
    probe = onnx.load(str(fp32_path), load_external_data=False)
    existing = {o.name for o in probe.graph.output}
    for name in by_input:
        if name not in existing:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probe_path = fp32_path.with_name(f".probe.{fp32_path.name}")
    onnx.save(probe, str(probe_path))
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every probed tensor
        session = ort.InferenceSession(str(probe_path), opts, providers=["CPUExecutionProvider"])
        names = list(by_input)
        sums = {m.node: [0.0, 0.0] for m in matmuls}
        for feed in feeds:
            for name, x in zip(names, session.run(names, feed)):
                for m in by_input[name]:
                    num, den = emulate(x, weights[m.weight])
                    sums[m.node][0] += num
                    sums[m.node][1] += den
    finally:
        probe_path.unlink(missing_ok=True)
    return {node: float(np.sqrt(num / den)) if den else 0.0 for node, (num, den) in sums.items()}


def fallback_search(ranked: list[str], try_keeping: Callable[[list[str]], bool], enabled: bool) -> tuple[list[str], list[dict]]:
    """The fewest of the worst-ranked nodes to keep in FP32 for try_keeping(kept) to pass; returns (kept, tries)."""
    tries: list[dict] = []

    def attempt(k: int) -> bool:
        passed = try_keeping(ranked[:k])
        tries.append({"kept": k, "passed": passed})
        return passed

    if attempt(0) or not enabled or not ranked:
        return [], tries
    lo, hi = 0, 1
    while not attempt(hi):
        if hi == len(ranked):
            return ranked, tries
        lo, hi = hi, min(2 * hi, len(ranked))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if attempt(mid):
            hi = mid
        else:
            lo = mid
    if tries[-1]["kept"] != hi:  # leave the chosen candidate as the last one written
        try_keeping(ranked[:hi])
        tries.append({"kept": hi, "passed": True})
    return ranked[:hi], tries

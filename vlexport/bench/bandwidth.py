"""This machine's memory read bandwidth as ONNX Runtime sees it, and the decode floor it implies.

Batch-1 decode reads every decoder weight once per token (plus the KV cache), so decode time can go no lower than
bytes read / bandwidth. The bandwidth is measured on the kind of work decode does: a matrix-vector product over a
matrix far larger than the caches, on ONNX Runtime with the same thread count.
"""

from __future__ import annotations

import time

import numpy as np


def measure_read_bandwidth(threads: int, megabytes: int = 512, repeats: int = 15) -> float:
    """Bytes per second read by an fp32 MatMul [1,K] x [K,N] on ONNX Runtime (median of `repeats`)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    n = 4096
    k = megabytes * 1024 * 1024 // (4 * n)
    weight = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matvec",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    x = np.ones((1, k), np.float32)
    session.run(None, {"x": x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - t)
    return weight.nbytes / float(np.median(times))


def decode_bytes_per_token(decoder_params: int, bytes_per_param: float, num_layers: int, kv_heads: int,
                           head_dim: int, context: int, kv_bytes: int = 4) -> int:
    """Weights read once, plus the whole KV cache at this context."""
    return int(decoder_params * bytes_per_param + 2 * num_layers * kv_heads * head_dim * context * kv_bytes)

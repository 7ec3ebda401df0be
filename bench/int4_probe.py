"""All-INT4 MatMulNBits decoders made from one FP32 decoder (lm_head left FP32): KL and top-1 of the last position
against FP32 on 4 random 48-token prompts, and prefill time, for symmetric / zero points and accuracy level 4 / 0.

    python bench/int4_probe.py DIR   # DIR: decoder.onnx (+ .data) and embed.onnx of a build, FP32
"""
import sys, time, numpy as np, onnx, onnxruntime as ort
from onnxruntime.quantization import QuantFormat
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer, DefaultWeightOnlyQuantConfig
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from vlexport.precision.int8 import weight_matmuls
D = sys.argv[1].rstrip("/") + "/"  # holds the FP32 decoder.onnx and embed.onnx of a build
src = onnx.load(D + "decoder.onnx")
nodes = [m.node for m in weight_matmuls(src)]
head = [n for n in nodes if "lm_head" in n]
emb = ort.InferenceSession(D + "embed.onnx", providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
def feeds(sess):
    out = []
    for _ in range(4):
        ids = rng.integers(3, 30000, (1, 48)).astype(np.int64)
        e = emb.run(None, {"input_ids": ids, "image_features": np.zeros((0, 768), np.float32)})[0]
        f = {"inputs_embeds": e, "attention_mask": np.ones((1, 48), np.int64), "position_ids": np.arange(48)[None]}
        for i in sess.get_inputs():
            if i.name.startswith("past"):
                f[i.name] = np.zeros((1, 12, 0, 64), np.float32)
        out.append(f)
    return out
ref = ort.InferenceSession(D + "decoder.onnx", providers=["CPUExecutionProvider"])
F = feeds(ref)
R = [ref.run(["logits"], f)[0][0, -1] for f in F]
def kl(a, b):
    p = np.exp(a - a.max()); p /= p.sum(); q = np.exp(b - b.max()); q /= q.sum()
    return float((p * (np.log(p + 1e-30) - np.log(q + 1e-30))).sum()), int(a.argmax() == b.argmax())
for name, sym, level, block in [("sym L4 b32", True, 4, 32), ("asym L4 b32", False, 4, 32), ("sym L0 b32", True, 0, 32), ("asym L0 b32", False, 0, 32)]:
    m = onnx.load(D + "decoder.onnx")
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=sym, accuracy_level=level or None, bits=4, op_types_to_quantize=("MatMul",))
    q = MatMulNBitsQuantizer(m, bits=4, block_size=block, is_symmetric=sym, accuracy_level=level or None, nodes_to_exclude=head, op_types_to_quantize=("MatMul",), algo_config=cfg)
    q.process()
    s = ort.InferenceSession(q.model.model.SerializeToString(), providers=["CPUExecutionProvider"])
    res = [kl(r, s.run(["logits"], f)[0][0, -1]) for r, f in zip(R, F)]
    f0 = F[0]
    t = time.perf_counter(); [s.run(["logits"], f0) for _ in range(3)]; dt = (time.perf_counter() - t) / 3
    print(name, "KL", np.mean([r[0] for r in res]), "top1", np.mean([r[1] for r in res]), f"prefill48 {dt*1000:.0f} ms", flush=True)

"""Pre-quantized checkpoints: an AutoAWQ GEMM LLaVA is dequantized, built at cpu-int4 with the re-quantization
error reported; GPTQ and other AWQ packings are refused by name."""

import json
import re
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from vlexport.cli import app

AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's WQLinear_GEMM.from_linear order_map


def awq_gemm_tensors(weight: np.ndarray, group: int):
    """What AutoAWQ's WQLinear_GEMM.from_linear stores for a linear weight [out, in]: asymmetric 4-bit per group of
    input channels (scale (max - min) / 15, zero round(-min / scale)), packed eight to an int32 in its order.
    Written here from AutoAWQ's algorithm, independently of vlexport's unpacker. Returns the tensors and the
    exact dequantized weight [out, in]."""
    out_f, in_f = weight.shape
    w = weight.astype(np.float32).reshape(out_f, in_f // group, group)
    lo, hi = w.min(axis=2), w.max(axis=2)
    scales = np.maximum(hi - lo, 1e-5) / 15  # [out, groups]
    zeros = np.clip(np.round(-lo / scales), 0, 15)
    q = np.clip(np.round(w / scales[..., None]) + zeros[..., None], 0, 15).astype(np.int64)  # [out, groups, group]
    scales16 = scales.astype(np.float16)
    dequant = ((q - zeros[..., None]) * scales16.astype(np.float32)[..., None]).reshape(out_f, in_f)
    intweight = q.reshape(out_f, in_f).T  # [in, out]
    intzeros = zeros.T.astype(np.int64)  # [groups, out]

    def pack(x):
        packed = np.zeros((x.shape[0], x.shape[1] // 8), dtype=np.int64)
        for col in range(x.shape[1] // 8):
            for i in range(8):
                packed[:, col] |= x[:, col * 8 + AWQ_PACK_ORDER[i]] << (i * 4)
        return packed.astype(np.uint32).view(np.int32)

    return {"qweight": pack(intweight), "qzeros": pack(intzeros), "scales": scales16.T.copy()}, dequant


def test_awq_gemm_unpacks_exactly():
    from vlexport.prequantized import unpack_awq_gemm

    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    t, dequant = awq_gemm_tensors(w, 128)
    got = unpack_awq_gemm(t["qweight"], t["qzeros"], t["scales"], 128)
    assert got.shape == (48, 256) and np.array_equal(got, dequant)
    assert 0 < np.abs(got - w).max() < 0.5  # 4-bit: near the weights, not equal to them


def write_awq_llava(src, dst, group=32, config_extra=None):
    """The fixture's base as an AutoAWQ GEMM checkpoint: every decoder-layer linear replaced by its AWQ tensors."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    dequantized = {}
    for f in dst.glob("*.safetensors"):
        tensors = load_file(str(f))
        out = {}
        for name, value in tensors.items():
            m = re.fullmatch(r"(.*language_model.*layers\.\d+\.(?:self_attn|mlp)\.\w+_proj)\.weight", name)
            if m:
                t, dequantized[m.group(1)] = awq_gemm_tensors(value, group)
                out.update({f"{m.group(1)}.{k}": v for k, v in t.items()})
            else:
                out[name] = value
        save_file(out, str(f), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group,
                                     "zero_point": True, **(config_extra or {})}
    (dst / "config.json").write_text(json.dumps(config))
    return dequantized


def test_awq_checkpoint_builds_at_cpu_int4_with_the_requantization_error(tiny_base, tmp_path, monkeypatch):
    from safetensors.numpy import load_file

    monkeypatch.setenv("VLEXPORT_CACHE", str(tmp_path / "cache"))
    awq = tmp_path / "llava-awq"
    dequantized = write_awq_llava(tiny_base, awq)
    out = tmp_path / "bundle"
    # The checkpoint's own layout (zero points, block = its group of 32): re-quantizing gives its INT4 values back.
    r = CliRunner().invoke(app, ["build", "--base", str(awq), "--target", "cpu-int4", "-o", str(out),
                                 "--int4", "symmetric=false,block_size=32,awq=false"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    pre = m["base"]["prequantized"]
    assert pre["format"] == "autoawq-gemm" and pre["group_size"] == 32 and pre["linears"] == len(dequantized) == 14
    assert pre["requantization"]["max_rel_error"] < 1e-2 and m["parity"]["passed"]
    assert m["parts"]["decoder"]["precision"] == "int4"
    # The base the bundle was built and verified from is the dequantized checkpoint, tensor for tensor.
    weights = {}
    for f in sorted(__import__("pathlib").Path(m["base"]["path"]).glob("*.safetensors")):
        weights.update(load_file(str(f)))
    for prefix, w in dequantized.items():
        assert np.allclose(weights[prefix + ".weight"].astype(np.float32), w, atol=1e-3), prefix
    # Another block or symmetric INT4 moves the weights, and the report says by how much.
    from vlexport.prequantized import import_awq

    _, report = import_awq(awq, 32, True, lambda m: None)
    assert report["requantization"]["max_rel_error"] > 10 * pre["requantization"]["max_rel_error"]


@pytest.mark.parametrize("quant, words", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}, "GPTQ checkpoint"),
    ({"quant_method": "awq", "version": "gemv", "bits": 4, "group_size": 128}, "version 'gemv'"),
    ({"quant_method": "awq", "version": "gemm", "bits": 8, "group_size": 128}, "bits=8"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes'"),
])
def test_other_prequantized_formats_are_refused_by_name(tiny_base, tmp_path, quant, words):
    base = tmp_path / "q"
    shutil.copytree(tiny_base, base)
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = quant
    (base / "config.json").write_text(json.dumps(config))
    r = CliRunner().invoke(app, ["build", "--base", str(base), "--target", "cpu-int4", "-o", str(tmp_path / "out")])
    assert r.exit_code == 2 and words in " ".join(r.output.split()), r.output
    assert not (tmp_path / "out").exists()

"""AWQ-style activation-aware scales for INT4 weight-only decoders (Lin et al. 2024, "AWQ"), folded before export.

INT4 rounds every weight of a block by the block's own step. A weight column whose input channel carries large
activations matters more than the others, so its rounding error costs more. AWQ scales such columns up by s_j
(and their inputs down by s_j) before quantizing: the same function in exact arithmetic, but the salient weights
get finer steps. s = mean|x|^r, with r searched per group on a grid, picking the one that minimises the INT4 output
error on the calibration activations (r = 0 is plain round-to-nearest, so the search never does worse there).

The scales are folded into the operation in front of each group, so the exported FP32 graph is the same function
and has no extra operation (as SmoothQuant's, precision/smoothquant.py):
  input_layernorm          -> q/k/v_proj          (norm weight / s, columns * s)
  post_attention_layernorm -> gate/up_proj
  v_proj                   -> o_proj              (v_proj rows / s; only when v feeds o one to one, no GQA)
  up_proj                  -> down_proj           (up_proj rows / s: the input of down_proj is act(gate) * up)
  norm                     -> lm_head             (searched at lm_head's own precision, INT4 or INT8)
The error searched is the kernel's: MatMulNBits at accuracy level 4 quantizes the activations too (INT8 per row and
block), so an outlier channel costs twice, and dividing it by s helps both.
Row scaling never changes a row's INT4 error (blocks run along the input channels), so the groups are independent
and all are searched on the activations of the unscaled model.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Callable

import numpy as np

from .int4 import dequantized, quantized_activations

GRID = 20  # ratios 0, 0.05, ..., 0.95 as in AWQ's auto_scale
SAMPLE_ROWS = 512  # activation rows kept per group for the search
CACHE_VERSION = "awq-2"


def _groups(model) -> list[tuple[str, object, str, list]]:
    """(name, module in front, how to fold into it, [linears fed]) for every decoder group."""
    out = []
    for i, layer in enumerate(model.model.language_model.layers):
        p = f"language_model.layers.{i}"
        attn, mlp = layer.self_attn, layer.mlp
        out.append((f"{p}.input_layernorm", layer.input_layernorm, "norm", [attn.q_proj, attn.k_proj, attn.v_proj]))
        out.append((f"{p}.post_attention_layernorm", layer.post_attention_layernorm, "norm", [mlp.gate_proj, mlp.up_proj]))
        if attn.v_proj.out_features == attn.o_proj.in_features:
            out.append((f"{p}.self_attn.v_proj", attn.v_proj, "rows", [attn.o_proj]))
        out.append((f"{p}.mlp.up_proj", mlp.up_proj, "rows", [mlp.down_proj]))
    out.append(("language_model.norm", model.model.language_model.norm, "norm", [model.lm_head]))
    return out


def collect(model, processor, cases, texts: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """Per group: mean |x| per input channel and a seeded sample of input rows, over the calibration cases."""
    import torch

    stats: dict[str, dict] = {}
    rng = np.random.default_rng(0)
    hooks = []
    for name, _front, _how, linears in _groups(model):
        def hook(_module, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = stats.setdefault(name, {"sum": torch.zeros(x.shape[1]), "n": 0, "rows": []})
            s["sum"] += x.abs().sum(dim=0)
            s["n"] += x.shape[0]
            take = rng.choice(x.shape[0], size=min(x.shape[0], SAMPLE_ROWS // max(1, len(cases))), replace=False)
            s["rows"].append(x[take].numpy())
        hooks.append(linears[0].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for case, text in zip(cases, texts):
                model(**processor(images=case.image.convert("RGB"), text=text, return_tensors="pt"))
    finally:
        for h in hooks:
            h.remove()
    return {k: {"mean": (v["sum"] / v["n"]).numpy().astype(np.float32), "rows": np.concatenate(v["rows"])}
            for k, v in stats.items()}


def search(model, stats: dict, block: int, symmetric: bool, lm_head_bits: int = 4,
           int8_activations: bool = True) -> dict[str, np.ndarray]:
    """Per group, the scale s (one per input channel of its linears) with the smallest quantized output error."""
    import torch

    scales = {}
    for name, _front, _how, linears in _groups(model):
        if name not in stats:
            continue
        x = stats[name]["rows"].astype(np.float32)
        mean = np.maximum(stats[name]["mean"].astype(np.float64), 1e-8)
        with torch.no_grad():
            ws = [lin.weight.detach().float().numpy().T for lin in linears]  # [in, out] = [K, N]
        refs = [x @ w for w in ws]
        bits = lm_head_bits if name == "language_model.norm" else 4
        best, best_err = np.ones_like(mean), None
        for r in np.arange(GRID) / GRID:
            s = mean ** r
            s = (s / np.sqrt(s.max() * s.min())).astype(np.float32)  # float32 throughout: the search's cost
            xs = x / s
            xq = quantized_activations(xs, block if bits == 4 else 32).astype(np.float32) if int8_activations else xs
            err = 0.0
            for w, ref in zip(ws, refs):
                wq = dequantized(w * s[:, None], block if bits == 4 else 32, symmetric or bits == 8, bits)
                err += float(np.square(xq @ wq.astype(np.float32) - ref).sum())
            if best_err is None or err < best_err:
                best, best_err = s, err
        scales[name] = best.astype(np.float32)
    return scales


def fold(model, scales: dict[str, np.ndarray], record: dict | None = None) -> int:
    """Fold the scales into the model in place (the function is unchanged); returns the number of groups. record,
    if given, gets {linear module: (input scale or None, output scale or None)}: a linear's input is now x / s_in,
    its output y / s_out (LoRA slots fed on it follow)."""
    import torch

    n = 0
    with torch.no_grad():
        for name, front, how, linears in _groups(model):
            if name not in scales:
                continue
            s = torch.from_numpy(np.asarray(scales[name])).to(linears[0].weight.dtype)
            if how == "norm":
                front.weight.div_(s)
                if getattr(front, "bias", None) is not None:
                    front.bias.div_(s)
            else:  # the previous linear's output rows feed these linears' input channels
                front.weight.div_(s[:, None])
                if front.bias is not None:
                    front.bias.div_(s)
                if record is not None:
                    s_in, _ = record.get(front, (None, None))
                    record[front] = (s_in, s.float().numpy())
            for lin in linears:
                lin.weight.mul_(s)
                if record is not None:
                    _, s_out = record.get(lin, (None, None))
                    record[lin] = (s.float().numpy(), s_out)
            n += 1
    return n


def search_cached(model, base: Path, adapters, calib, assets: dict, block: int, symmetric: bool,
                  log: Callable[[str], None], lm_head_bits: int = 4, int8_activations: bool = True) -> dict:
    """The scales for this base, adapters, calibration set and INT4 layout, from the cache or searched now."""
    from ..files import atomic_write_bytes
    from ..model import fingerprint
    from ..progress import track
    from . import calibration

    key = hashlib.sha256("|".join([CACHE_VERSION, fingerprint(base), *[a.sha256 for a in adapters],
                                   calibration.calib_fingerprint(calib), str(block), str(symmetric),
                                   str(lm_head_bits), str(int8_activations)]).encode()).hexdigest()[:24]
    path = calibration.cache_root() / "awq" / f"{key}.npz"
    if path.exists():
        try:
            with np.load(path) as cached:
                scales = {k: cached[k] for k in cached.files}
            log(f"AWQ: reusing scales from {path}")
            return {"scales": scales, "block_size": block, "symmetric": symmetric}
        except (OSError, ValueError, EOFError) as e:
            log(f"AWQ: the cache {path} is unreadable ({type(e).__name__}); searching again")
    from transformers import AutoProcessor

    from ..runtime import render_chat_prompt

    cases = calibration.calib_cases(calib)
    texts = [calibration.prompt_text(c, lambda p: render_chat_prompt(assets["chat_template"], p, assets["bos_token"],
                                                                     assets["eos_token"])) for c in cases]
    with track(log, "AWQ: calibration activations"):
        stats = collect(model, AutoProcessor.from_pretrained(str(base)), cases, texts)
    with track(log, "AWQ: scale search"):
        scales = search(model, stats, block, symmetric, lm_head_bits, int8_activations)
    buffer = io.BytesIO()
    np.savez(buffer, **scales)
    atomic_write_bytes(path, buffer.getvalue())
    log(f"AWQ: scales searched on {len(cases)} calibration cases for {len(scales)} groups, saved to {path}")
    return {"scales": scales, "block_size": block, "symmetric": symmetric}

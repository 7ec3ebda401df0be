"""Golden data for AdapterHub (`adapters` 1.3.0) PREFIX TUNING on a tiny Llama language model (GQA).

Runs ONLY in its own virtual environment: `adapters` 1.3.0 pins transformers 4.57 and cannot be imported next to
the transformers 5 that vlexport uses. Create the venv outside the repository, then run this file from the
repository root:

    python3.11 -m venv /tmp/ah-venv
    /tmp/ah-venv/bin/pip install torch==2.13.0          # first, pinned: the CPU build; unpinned pulls CUDA wheels
    /tmp/ah-venv/bin/pip install adapters==1.3.0        # brings transformers 4.57.x (4.57.6 was used) + safetensors
    /tmp/ah-venv/bin/python tests/golden/make_adapterhub_prefix_golden.py

It (re)writes tests/data/adapterhub_prefix/ (SEMANTICS.md there is hand-written and left alone):

* base_model.safetensors / config.json: a seeded LlamaForCausalLM (hidden 64, 2 layers, 4 query heads, 2 KV heads,
  intermediate 128, vocab 128; the same config and seed as tests/data/adapterhub/llama, so the same weights),
  eager attention.
* inputs.safetensors: input_ids [2, 8] (int64, seed 7) and attention_mask [2, 8] (int64, all ones).
* base_outputs.safetensors: logits [2, 8, 128] of the plain model (no adapters library involved).
* one folder per adapter (prefix_mlp: MLP reparametrisation, prefix_length 5; prefix_flat: flat=True,
  prefix_length 3) with what `model.save_adapter(dir, name, with_head=False)` writes (adapter_config.json,
  pytorch_adapter.bin, untouched), outputs.safetensors (logits with the adapter active) and kv.safetensors: the
  key/value tensors the library actually concatenated in front of each layer's keys/values at run time
  (captured with forward hooks on every `self_attn.prefix_tuning` layer), named past_key_values.{i}.key|value,
  shape [num_key_value_heads, prefix_length, head_dim] (batch dimension dropped; both batch rows are identical).
* manifest.json: shapes, seeds, key names, observed library behaviour and all error numbers.

It then checks SEMANTICS.md with an independent re-implementation that reads only the files written here:
(1) kv tensors from the saved adapter weights in plain torch (float64), compared with kv.safetensors (< 1e-5);
(2) logits from a plain transformers LlamaForCausalLM (float64) loaded from base_model.safetensors, with those kv
tensors placed in a DynamicCache, real tokens at positions 0..L-1 (explicit position_ids), cache_position
P..P+L-1 and an all-ones attention mask of length P+L, compared with outputs.safetensors (< 1e-4).
Negative controls (other plausible semantics) are recorded to show the check discriminates. Exit 1 on failure.
"""

from __future__ import annotations

import json
import math
import platform
import re
import shutil
import sys
from pathlib import Path

import torch

try:
    import adapters
    import transformers
    from adapters import PrefixTuningConfig
    from adapters.methods.prefix_tuning import PrefixTuningLayer, PrefixTuningPool
except ImportError as exc:  # pragma: no cover - only meaningful outside the venv
    sys.exit(f"run this inside the adapters venv (see the docstring): {exc}")

from safetensors.torch import load_file, save_file
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

if not transformers.__version__.startswith("4.57") or adapters.__version__ != "1.3.0":
    sys.exit(f"expected adapters 1.3.0 + transformers 4.57.x, got {adapters.__version__} + {transformers.__version__}")

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "tests" / "data" / "adapterhub_prefix"
TOL_KV, TOL_LOGITS = 1e-5, 1e-4
MAX_BYTES = 500_000
torch.set_num_threads(1)  # bit-stable CPU reductions

LLAMA_CFG = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
    vocab_size=128, max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
)
SEED_LLAMA, SEED_INPUTS = 1234, 7

# (folder / adapter name, PrefixTuningConfig kwargs, seed for the adapter weights, description)
CASES = [
    ("prefix_mlp", dict(prefix_length=5, bottleneck_size=32), 2001,
     "PrefixTuningConfig(prefix_length=5, bottleneck_size=32): MLP reparametrisation wte -> Linear -> tanh -> "
     "Linear (the default non_linearity 'tanh'; bottleneck 32 instead of the default 512 keeps the file small)"),
    ("prefix_flat", dict(prefix_length=3, flat=True), 2002,
     "PrefixTuningConfig(prefix_length=3, flat=True): one flat parameter vector control_trans"),
]


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


def randomize_base_(model: torch.nn.Module, seed: int) -> None:
    """Seeded O(1)-scale base weights (same recipe and seed as make_adapterhub_golden.py's Llama tower)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            shape = tuple(p.shape)
            if name.endswith("bias"):
                v = 0.1 * torch.randn(shape, generator=g)
            elif p.ndim == 1 and "norm" in name:
                v = 1.0 + 0.1 * torch.randn(shape, generator=g)
            elif p.ndim == 1 or "embed" in name:
                v = 0.5 * torch.randn(shape, generator=g)
            else:
                v = 0.7 * torch.randn(shape, generator=g) / math.sqrt(p[0].numel())
            p.copy_(v)


def randomize_prefix_(model: torch.nn.Module, name: str, seed: int) -> None:
    """Seeded non-trivial values for the prefix parameters of adapter `name` (each shared tensor once)."""
    g = torch.Generator().manual_seed(seed)
    pool = model.model.prefix_tuning
    with torch.no_grad():
        for pname, p in sorted(pool.prefix_tunings[name].named_parameters()):
            shape = tuple(p.shape)
            if pname.endswith("wte.weight"):
                v = torch.randn(shape, generator=g)
            elif pname.endswith("bias"):
                v = 0.3 * torch.randn(shape, generator=g)
            elif pname.endswith("control_trans"):  # flat: the kv values themselves
                v = torch.randn(shape, generator=g)
            else:  # control_trans.0/2.weight
                v = 1.2 * torch.randn(shape, generator=g) / math.sqrt(shape[1])
            p.copy_(v)


def make_llama(attn: str = "eager") -> LlamaForCausalLM:
    torch.manual_seed(SEED_LLAMA)
    cfg = LlamaConfig(**LLAMA_CFG, attn_implementation=attn)
    m = LlamaForCausalLM(cfg).eval()
    randomize_base_(m, SEED_LLAMA)
    return m


def logits_of(model, input_ids, attention_mask) -> torch.Tensor:
    with torch.no_grad():
        o = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True)
    return o.logits.detach().contiguous().clone()


def with_prefix(name: str, conf: dict, seed: int, attn: str = "eager") -> LlamaForCausalLM:
    model = make_llama(attn)
    adapters.init(model)
    model.add_adapter(name, config=PrefixTuningConfig(**conf))
    randomize_prefix_(model, name, seed)
    model.set_active_adapters(name)
    return model


class Capture:
    """Forward hooks: what each PrefixTuningLayer returns (keys/values with the prefix in front, extended mask),
    what it received, and the pool's output (the per-layer prefix tensors before they are injected)."""

    def __init__(self, model):
        self.layer_in, self.layer_out, self.pool_out, self.handles = {}, {}, [], []
        for i, layer in enumerate(model.model.layers):
            pt = layer.self_attn.prefix_tuning
            assert isinstance(pt, PrefixTuningLayer)
            self.handles.append(pt.register_forward_hook(self._layer_hook(i)))
        pool = model.model.prefix_tuning
        assert isinstance(pool, PrefixTuningPool)
        self.handles.append(pool.register_forward_hook(lambda mod, a, out: self.pool_out.append(out)))

    def _layer_hook(self, i):
        def hook(mod, args, out):
            self.layer_in[i] = tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args)
            self.layer_out[i] = tuple(t.detach().clone() if torch.is_tensor(t) else t for t in out)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------------------------------------------
# Independent re-implementation (torch + plain transformers; reads only the files written below)
# ----------------------------------------------------------------------------------------------------------------


def load_prefix_weights(d: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json + the canonical pool copy `[model.]prefix_tuning.prefix_tunings.<name>.self_prefix.*`.
    The same tensors also appear under every `layers.N.self_attn.prefix_tuning.pool.` alias; check they agree."""
    meta = json.loads((d / "adapter_config.json").read_text())
    name = meta["name"]
    sd = torch.load(d / "pytorch_adapter.bin", map_location="cpu", weights_only=True)
    canon = re.compile(r"^(?:model\.)?prefix_tuning\.prefix_tunings\.(?P<n>[^.]+)\.self_prefix\.(?P<p>.+)$")
    alias = re.compile(r"^(?:model\.)?layers\.\d+\.self_attn\.prefix_tuning\.pool\.prefix_tunings\."
                       r"(?P<n>[^.]+)\.self_prefix\.(?P<p>.+)$")
    W: dict[str, torch.Tensor] = {}
    aliases: list[tuple[str, torch.Tensor]] = []
    for k, v in sd.items():
        if m := canon.match(k):
            assert m["n"] == name, k
            W[m["p"]] = v.double()
        elif m := alias.match(k):
            aliases.append((m["p"], v.double()))
        else:
            raise AssertionError(f"unexpected key {k}")
    for p, v in aliases:
        assert torch.equal(W[p], v), p
    return meta, W


def ref_prefix_kv(meta: dict, W: dict, mcfg: dict, layout: str = "P,L,2,H,D") -> dict[str, torch.Tensor]:
    """Per-layer prefix key/value [kv_heads, P, head_dim] from the saved weights (SEMANTICS.md, 'The math')."""
    c = meta["config"]
    P, L = c["prefix_length"], mcfg["num_hidden_layers"]
    H = mcfg["num_key_value_heads"]
    D = mcfg["hidden_size"] // mcfg["num_attention_heads"]
    if c["flat"]:
        y = W["control_trans"]
    else:
        assert c["non_linearity"].lower() == "tanh"
        e = W["wte.weight"]  # = wte(arange(P)): the embedding table itself
        y = torch.tanh(e @ W["control_trans.0.weight"].T + W["control_trans.0.bias"])
        y = y @ W["control_trans.2.weight"].T + W["control_trans.2.bias"]
    if layout == "P,L,2,H,D":  # the library's view
        y = y.reshape(P, L, 2, H, D)
    else:  # negative control: key/value outermost
        y = y.reshape(P, 2, L, H, D).transpose(1, 2)
    out = {}
    for i in range(L):
        out[f"past_key_values.{i}.key"] = y[:, i, 0].permute(1, 0, 2).contiguous()
        out[f"past_key_values.{i}.value"] = y[:, i, 1].permute(1, 0, 2).contiguous()
    return out


def rope_rotate(k: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama RoPE (rotate_half convention) of k [..., T, D] at the given positions (negative control only)."""
    D = k.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    ang = positions.double()[:, None] * inv[None]
    ang = torch.cat([ang, ang], dim=-1)
    k1, k2 = k[..., : D // 2], k[..., D // 2:]
    return k * ang.cos() + torch.cat([-k2, k1], dim=-1) * ang.sin()


def plain_llama(d: Path) -> LlamaForCausalLM:
    """transformers' own LlamaForCausalLM (no adapters.init) from the saved config + weights, in float64."""
    cfg = LlamaConfig.from_json_file(str(d / "config.json"))
    cfg._attn_implementation = "eager"
    m = LlamaForCausalLM(cfg).eval()
    m.load_state_dict(load_file(str(d / "base_model.safetensors")), strict=True)
    m = m.double()
    attn_cls = type(m.model.layers[0].self_attn)
    assert attn_cls.__module__ == "transformers.models.llama.modeling_llama", attn_cls  # not the adapters subclass
    return m


def ref_logits(model: LlamaForCausalLM, input_ids, kv: dict | None, real_pos0: bool = True,
               rotate_prefix: bool = False, mask: torch.Tensor | None = None,
               mask4d: torch.Tensor | None = None) -> torch.Tensor:
    """Run the plain model with the prefix kv in a DynamicCache. Library semantics: real_pos0=True (real tokens at
    positions 0..L-1 whatever the padding), rotate_prefix=False (prefix keys enter attention as produced, no RoPE),
    2-D mask = [ones(P), the real tokens' mask] (prefix always visible, causal over the real tokens).
    mask4d replaces the mask by an explicit additive [B, 1, L, P+L] one (used to explain the sdpa probe)."""
    B, S = input_ids.shape
    if mask is None:
        mask = torch.ones(B, S, dtype=torch.long)
    if kv is None:
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    n_layers = model.config.num_hidden_layers
    P = kv["past_key_values.0.key"].shape[1]
    cache = DynamicCache(config=model.config)
    for i in range(n_layers):
        k = kv[f"past_key_values.{i}.key"].double()
        if rotate_prefix:
            k = rope_rotate(k, torch.arange(P), model.config.rope_theta)
        v = kv[f"past_key_values.{i}.value"].double()
        cache.update(k[None].expand(B, -1, -1, -1).contiguous(), v[None].expand(B, -1, -1, -1).contiguous(), i)
    full = torch.cat([torch.ones(B, P, dtype=mask.dtype), mask], dim=1) if mask4d is None else mask4d.double()
    kwargs = dict(attention_mask=full, past_key_values=cache, use_cache=True)
    if real_pos0:
        kwargs.update(position_ids=torch.arange(S)[None].expand(B, -1), cache_position=torch.arange(P, P + S))
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a.detach().double() - b.detach().double()).abs().max())


# ----------------------------------------------------------------------------------------------------------------
# Library behaviour probes (recorded in manifest.json, nothing saved)
# ----------------------------------------------------------------------------------------------------------------


def probes(input_ids, attention_mask, eager_logits: dict[str, torch.Tensor], ref_model, kv_saved: dict) -> dict:
    found: dict = {}
    name, conf, seed, _ = CASES[0]
    B, S = input_ids.shape
    P = conf["prefix_length"]

    # 1. use_cache=True: is the prefix (or anything) written to the returned cache?
    m = with_prefix(name, conf, seed)
    with torch.no_grad():
        o = m(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    found["use_cache_true_returned_cache_seq_length"] = o.past_key_values.get_seq_length()
    found["use_cache_true_logits_vs_golden_max_abs"] = max_abs(o.logits, eager_logits[name])

    # 2. sdpa attention (transformers' default) instead of eager
    ms = with_prefix(name, conf, seed, attn="sdpa")
    sdpa_ones = logits_of(ms, input_ids, attention_mask)
    found["sdpa_all_ones_mask_logits_vs_eager_max_abs"] = max_abs(sdpa_ones, eager_logits[name])
    # explanation: mask skipped -> SDPA is_causal=True with L queries and P+L keys = TOP-LEFT causal: query i sees
    # key columns 0..i of [prefix, real] (prefix rows 0..i, real tokens 0..i-P), not "all prefix + real 0..i"
    top_left = torch.full((S, P + S), float("-inf"), dtype=torch.float64).triu(1)
    found["sdpa_all_ones_mask_vs_ref_with_top_left_causal_mask_max_abs"] = max_abs(
        ref_logits(ref_model, input_ids, kv_saved, mask4d=top_left.expand(B, 1, S, P + S)), sdpa_ones)
    padded = attention_mask.clone()
    padded[1, :2] = 0
    with_pad = logits_of(ms, input_ids, padded)
    ms.set_active_adapters(None)
    without = logits_of(ms, input_ids, padded)
    found["sdpa_padded_mask_logits_with_prefix_vs_without_prefix_max_abs"] = max_abs(with_pad, without)
    me = with_prefix(name, conf, seed)
    eager_pad = logits_of(me, input_ids, padded)
    found["eager_left_padded_mask_vs_ref_max_abs (prefix visible, real positions still 0..L-1)"] = max_abs(
        ref_logits(ref_model, input_ids, kv_saved, mask=padded), eager_pad)

    # 3. save_adapter(use_safetensors=True)
    tmp = OUT / "_probe_tmp"
    try:
        m.save_adapter(str(tmp), name, with_head=False, use_safetensors=True)
        found["save_adapter_use_safetensors"] = "works"
    except Exception as exc:  # noqa: BLE001 - recorded
        found["save_adapter_use_safetensors"] = f"{type(exc).__name__}: {str(exc).strip()[:120]}..."
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    # 4. eject_prefix_tuning (MLP -> flat) with GQA
    try:
        m.eject_prefix_tuning(name)
        found["eject_prefix_tuning_with_gqa"] = "works"
    except Exception as exc:  # noqa: BLE001 - recorded
        found["eject_prefix_tuning_with_gqa"] = f"{type(exc).__name__}: {exc}"

    # 5. leave_out=[0]: parameter count and which layer gets which slice
    ml = make_llama()
    adapters.init(ml)
    ml.add_adapter("lo", config=PrefixTuningConfig(prefix_length=2, flat=True, leave_out=[0]))
    ml.set_active_adapters("lo")
    cap = Capture(ml)
    logits_of(ml, input_ids, attention_mask)
    cap.remove()
    flat = ml.model.prefix_tuning.prefix_tunings["lo"]["self_prefix"].control_trans.detach()
    kvh, hd = LLAMA_CFG["num_key_value_heads"], LLAMA_CFG["hidden_size"] // LLAMA_CFG["num_attention_heads"]
    y = flat.view(2, 1, 2, kvh, hd)
    found["leave_out_[0]"] = {
        "control_trans_numel": flat.numel(),
        "expected_P*(layers_not_left_out)*2*kv_heads*head_dim": 2 * 1 * 2 * kvh * hd,
        "layer0_calls_prefix_layer": 0 in cap.layer_out,
        "layer1_key_len": cap.layer_out[1][0].shape[2],
        "layer1_prefix_key_is_slice_0_max_abs": max_abs(cap.layer_out[1][0][0, :, :2], y[:, 0, 0].permute(1, 0, 2)),
    }
    if 0 in cap.layer_out:
        found["leave_out_[0]"]["layer0_key_len"] = cap.layer_out[0][0].shape[2]

    # 6. use_gating (shared_gating True / False): gate = mean over positions of sigmoid(Linear(x_normed))
    for shared in (True, False):
        mg = make_llama()
        adapters.init(mg)
        mg.add_adapter("g", config=PrefixTuningConfig(prefix_length=2, flat=True, use_gating=True,
                                                      shared_gating=shared))
        mg.set_active_adapters("g")
        cap = Capture(mg)
        logits_of(mg, input_ids, attention_mask)
        cap.remove()
        raw = cap.pool_out[0]["g"]["self_prefix"]
        errs, gshape = [], None
        for i, layer in enumerate(mg.model.layers):
            gate = layer.self_attn.prefix_tuning.prefix_gates["g"]
            gshape = list(gate.weight.shape)
            x = cap.layer_in[i][2]  # residual_input = the attention input (after input_layernorm)
            gt = torch.sigmoid(x @ gate.weight.detach().T + gate.bias.detach()).mean(dim=1)  # [B, 1|2]
            errs.append(max_abs(cap.layer_out[i][0][:, :, :2], raw[i][0] * gt[:, 0].view(-1, 1, 1, 1)))
            errs.append(max_abs(cap.layer_out[i][1][:, :, :2], raw[i][1] * gt[:, -1].view(-1, 1, 1, 1)))
        sd_keys = sorted(k for k in mg.state_dict() if "prefix_gates" in k)
        found[f"use_gating_shared_{shared}"] = {"gate_weight_shape": gshape, "gate_keys": sd_keys,
                                                "formula_max_abs_err": max(errs)}
    return found


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def files_of(d: Path) -> dict[str, int]:
    return {str(p.relative_to(OUT)): p.stat().st_size for p in sorted(d.iterdir()) if p.is_file()}


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for p in OUT.iterdir():  # keep the hand-written SEMANTICS.md
        if p.name == "SEMANTICS.md":
            continue
        shutil.rmtree(p) if p.is_dir() else p.unlink()

    g = torch.Generator().manual_seed(SEED_INPUTS)
    input_ids = torch.randint(0, LLAMA_CFG["vocab_size"], (2, 8), generator=g)
    attention_mask = torch.ones_like(input_ids)
    B, S = input_ids.shape

    base = make_llama()
    save_file({k: v.detach().contiguous().clone() for k, v in base.state_dict().items()},
              str(OUT / "base_model.safetensors"))
    base.config.to_json_file(str(OUT / "config.json"))
    save_file({"input_ids": input_ids.contiguous(), "attention_mask": attention_mask.contiguous()},
              str(OUT / "inputs.safetensors"))
    base_logits = logits_of(base, input_ids, attention_mask)
    save_file({"logits": base_logits}, str(OUT / "base_outputs.safetensors"))
    other = ROOT / "tests" / "data" / "adapterhub" / "llama" / "base_model.safetensors"
    same_as_other = None
    if other.exists():
        a, b = load_file(str(other)), load_file(str(OUT / "base_model.safetensors"))
        same_as_other = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    mcfg = json.loads((OUT / "config.json").read_text())
    hd = mcfg["hidden_size"] // mcfg["num_attention_heads"]
    ref_model = plain_llama(OUT)
    errors: dict[str, float] = {"base/logits": max_abs(ref_logits(ref_model, input_ids, None), base_logits)}

    manifest: dict = {
        "description": "AdapterHub prefix tuning on a tiny seeded LlamaForCausalLM with GQA; see SEMANTICS.md",
        "generator": "tests/golden/make_adapterhub_prefix_golden.py",
        "versions": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                     "torch": torch.__version__, "python": platform.python_version()},
        "dtype": "float32 everywhere (weights, outputs); inputs int64",
        "tolerance": {"kv": TOL_KV, "logits": TOL_LOGITS},
        "model": {
            "model_class": "LlamaForCausalLM", "config": LLAMA_CFG, "attn_implementation": "eager",
            "head_dim": hd, "seed": SEED_LLAMA, "base_weights": "base_model.safetensors",
            "identical_to_tests/data/adapterhub/llama/base_model.safetensors": same_as_other,
            "config_json": "config.json",
            "inputs": {"inputs.safetensors": {"input_ids": [B, S], "attention_mask": [B, S]}, "seed": SEED_INPUTS,
                       "attention_mask_note": "all ones"},
            "base_outputs": {"base_outputs.safetensors": {"logits": list(base_logits.shape)}},
        },
        "cases": [],
    }

    eager_logits: dict[str, torch.Tensor] = {}
    for name, conf, seed, desc in CASES:
        cdir = OUT / name
        model = with_prefix(name, conf, seed)
        cap = Capture(model)
        out_logits = logits_of(model, input_ids, attention_mask)
        cap.remove()
        eager_logits[name] = out_logits
        model.set_active_adapters(None)
        off_err = max_abs(logits_of(model, input_ids, attention_mask), base_logits)
        model.set_active_adapters(name)

        P = conf["prefix_length"]
        pool_states = cap.pool_out[0][name]["self_prefix"]  # tuple over layers of [2, B, kv_heads, P, hd]
        kv, checks = {}, {}
        for i in range(mcfg["num_hidden_layers"]):
            k_in, v_in, _, mask_in = cap.layer_in[i][:4]
            k_out, v_out, mask_out = cap.layer_out[i]
            assert k_out.shape == (B, mcfg["num_key_value_heads"], P + S, hd), k_out.shape
            # prefix in front, then the layer's own (already RoPE-rotated) keys/values unchanged
            assert torch.equal(k_out[:, :, P:], k_in) and torch.equal(v_out[:, :, P:], v_in)
            # the injected prefix equals the pool output bit for bit: no RoPE, no other transform
            assert torch.equal(k_out[:, :, :P], pool_states[i][0]) and torch.equal(v_out[:, :, :P], pool_states[i][1])
            assert torch.equal(k_out[0, :, :P], k_out[1, :, :P]) and torch.equal(v_out[0, :, :P], v_out[1, :, :P])
            kv[f"past_key_values.{i}.key"] = k_out[0, :, :P].contiguous()
            kv[f"past_key_values.{i}.value"] = v_out[0, :, :P].contiguous()
            # mask: additive float [B, 1, S, S] -> [B, 1, S, P + S] with zeros (= attend) in front
            assert mask_in.shape == (B, 1, S, S) and mask_out.shape == (B, 1, S, P + S)
            assert torch.equal(mask_out[..., P:], mask_in) and bool((mask_out[..., :P] == 0).all())
            checks[f"layer{i}"] = {"mask_in": [list(mask_in.shape), str(mask_in.dtype)],
                                   "mask_out": list(mask_out.shape), "prefix_mask_value": 0.0}

        model.save_adapter(str(cdir), name, with_head=False)
        save_file({"logits": out_logits}, str(cdir / "outputs.safetensors"))
        save_file(kv, str(cdir / "kv.safetensors"))

        # --- independent check from the files alone
        meta, W = load_prefix_weights(cdir)
        kv_saved = load_file(str(cdir / "kv.safetensors"))
        kv_ref = ref_prefix_kv(meta, W, mcfg)
        assert set(kv_ref) == set(kv_saved)
        kv_err = max(max_abs(kv_ref[k], kv_saved[k]) for k in kv_saved)
        lib_logits = load_file(str(cdir / "outputs.safetensors"))["logits"]
        log_err = max_abs(ref_logits(ref_model, input_ids, kv_saved), lib_logits)
        log_err_from_weights = max_abs(ref_logits(ref_model, input_ids, kv_ref), lib_logits)
        errors[f"{name}/kv"] = kv_err
        errors[f"{name}/logits"] = log_err
        errors[f"{name}/logits_from_weights"] = log_err_from_weights
        controls = {
            "real_tokens_at_positions_P..P+L-1 (DynamicCache default, no position_ids)":
                max_abs(ref_logits(ref_model, input_ids, kv_saved, real_pos0=False), lib_logits),
            "prefix_keys_rotated_at_positions_0..P-1":
                max_abs(ref_logits(ref_model, input_ids, kv_saved, rotate_prefix=True), lib_logits),
            "layout_(P,2,L,H,D)_kv_vs_saved":
                max(max_abs(a, kv_saved[k]) for k, a in ref_prefix_kv(meta, W, mcfg, layout="P,2,L,H,D").items()),
            "no_prefix_at_all": max_abs(base_logits, lib_logits),
        }
        sd_keys = sorted(torch.load(cdir / "pytorch_adapter.bin", weights_only=True))
        manifest["cases"].append({
            "case": name, "adapter_name": name, "overrides": conf, "description": desc, "dir": name,
            "files": files_of(cdir), "adapter_weights_seed": seed,
            "adapter_keys_in_file": sd_keys,
            "canonical_keys": {f"model.prefix_tuning.prefix_tunings.{name}.self_prefix.{k}": list(v.shape)
                               for k, v in sorted(W.items())},
            "full_config": meta["config"],
            "kv": {k: list(v.shape) for k, v in kv.items()},
            "outputs": {"logits": list(out_logits.shape)},
            "runtime_checks": checks,
            "no_adapter_output_equals_base_max_abs_err": off_err,
            "max_abs_change_vs_base": max_abs(out_logits, base_logits),
            "ref_vs_library_max_abs_err": {"kv": kv_err, "logits_with_saved_kv": log_err,
                                           "logits_with_kv_from_weights": log_err_from_weights},
            "negative_controls_max_abs_err": controls,
        })
        print(f"{name:12s} kv err {kv_err:.2e}  logits err {log_err:.2e} (from weights {log_err_from_weights:.2e})"
              f"  effect {max_abs(out_logits, base_logits):.3f}  controls "
              + ", ".join(f"{v:.3f}" for v in controls.values()))

    manifest["library_behaviour"] = probes(input_ids, attention_mask, eager_logits, ref_model,
                                           load_file(str(OUT / CASES[0][0] / "kv.safetensors")))
    manifest["max_abs_err_summary"] = errors
    ok = True
    for k, v in errors.items():
        tol = TOL_KV if k.endswith("/kv") else TOL_LOGITS
        if not v <= tol:
            print(f"FAIL {k}: {v:.3e} > {tol}")
            ok = False
    for c in manifest["cases"]:
        for label, v in c["negative_controls_max_abs_err"].items():
            if v < 1e-2:
                print(f"FAIL {c['case']}: negative control '{label}' does not discriminate ({v:.3e})")
                ok = False
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file() and p.suffix != ".md"
                and p.name != "manifest.json")
    manifest["total_bytes_without_manifest_and_md"] = total
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total_all = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    if total_all > MAX_BYTES:
        print(f"FAIL data too large: {total_all} bytes > {MAX_BYTES}")
        ok = False
    print(json.dumps(manifest["library_behaviour"], indent=1))
    print("max errors: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    print(f"data {total_all} bytes in {OUT}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

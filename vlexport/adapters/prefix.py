"""Prefix tuning (PEFT and AdapterHub): compiled at build time into per-layer key/value tensors, a pack the
runtime feeds.

PEFT saves only `prompt_embeddings` [P, L*2*token_dim], already after its optional projection MLP, with
token_dim = num_key_value_heads * head_dim. Viewed as [P, 2L, kv, hd] and permuted, slot 2l is layer l's keys and
2l+1 its values, each [kv, P, hd]; the keys are not rotated. The prefix is not merged into any weight: it seeds the
KV cache, so one base graph serves every prefix task. Real tokens (image tokens included) take RoPE positions
from P, as PEFT's forward gives them (the cache already holds P positions), and the attention mask gets P ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import VlexportError
from ..files import read_json, sha256_file
from .io import check_finite, read_tensors


@dataclass
class PrefixAdapter:
    path: Path
    weights_file: Path
    config: dict
    embeddings: object  # torch tensor [P, L*2*token_dim]
    format: str = "peft-prefix"  # or "adapterhub-prefix"
    kind: str = "prefix"

    @property
    def num_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.embeddings.numel()) * 4

    @property
    def position_offset(self) -> int:
        """First RoPE position of the real tokens: PEFT continues after the prefix, AdapterHub starts at 0."""
        return 0 if self.format == "adapterhub-prefix" else self.num_tokens

    @property
    def sha256(self) -> str:
        return sha256_file(self.weights_file)

    def describe(self) -> dict:
        return {"kind": self.kind, "format": self.format, "path": str(self.path), "sha256": self.sha256,
                "prefix_tokens": self.num_tokens, "position_offset": self.position_offset,
                "projection": bool(self.config.get("prefix_projection")), "merged": False}

    def key_values(self, num_layers: int, num_kv_heads: int, head_dim: int) -> dict:
        """{'past_key_values.{i}.key|value': [kv, P, hd] float32 numpy}; refuses a geometry that does not fit."""
        P, width = self.embeddings.shape
        want = num_layers * 2 * num_kv_heads * head_dim
        if width != want:
            raise VlexportError(
                f"prefix adapter '{self.path}': prompt_embeddings has width {width} but this base needs "
                f"{want} (= {num_layers} layers x 2 x {num_kv_heads} KV heads x {head_dim} head dim); it was trained "
                "for another model: check --base"
            )
        kv = self.embeddings.float().reshape(P, 2 * num_layers, num_kv_heads, head_dim).permute(1, 2, 0, 3)
        out = {}
        for i in range(num_layers):
            out[f"past_key_values.{i}.key"] = kv[2 * i].contiguous().numpy()
            out[f"past_key_values.{i}.value"] = kv[2 * i + 1].contiguous().numpy()
        return out

    def validate(self, model) -> None:
        cfg = model.config.text_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.key_values(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim)

    def without_text_layers_from(self, num_layers: int) -> "PrefixAdapter":
        raise VlexportError("few-layer parity (--layers) does not support prefix tasks yet; verify them in full")


def read_peft_prefix(path: Path) -> PrefixAdapter:
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = read_json(folder / "adapter_config.json")
    weights = path if path.is_file() else next(
        (folder / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (folder / n).exists()), None)
    if weights is None:
        raise VlexportError(f"prefix adapter directory '{path}' has no adapter_model.safetensors or adapter_model.bin")
    state = read_tensors(weights)
    check_finite(state, weights)
    if set(state) != {"prompt_embeddings"}:
        raise VlexportError(
            f"prefix adapter '{weights}' should hold only 'prompt_embeddings' (PEFT prefix tuning); found "
            f"{sorted(state)[:5]}"
        )
    emb = state["prompt_embeddings"]
    if emb.dim() != 2 or emb.shape[0] != config.get("num_virtual_tokens", emb.shape[0]):
        raise VlexportError(
            f"prefix adapter '{weights}': prompt_embeddings has shape {tuple(emb.shape)}, expected "
            f"[num_virtual_tokens={config.get('num_virtual_tokens')}, layers*2*kv_dim]"
        )
    return PrefixAdapter(path=path, weights_file=weights, config=config, embeddings=emb)


_ACTIVATIONS = {"tanh": "tanh", "relu": "relu", "gelu": "gelu", "swish": "silu", "silu": "silu"}


def read_adapterhub_prefix(path: Path) -> PrefixAdapter:
    import torch

    path = Path(path)
    folder = path if path.is_dir() else path.parent
    meta = read_json(folder / "adapter_config.json")
    config = meta.get("config") or {}
    if meta.get("model_class") not in ("LlamaForCausalLM", "LlamaModel"):
        raise VlexportError(
            f"AdapterHub prefix adapter '{path}': model_class {meta.get('model_class')!r}; vlexport reads prefixes "
            "trained on the language model (LlamaForCausalLM or LlamaModel)"
        )
    for option, why in (("use_gating", "its gate averages over the whole sequence, which a KV cache cannot replay"),):
        if config.get(option):
            raise VlexportError(f"AdapterHub prefix adapter '{path}': option {option}=True is not supported ({why})")
    if config.get("leave_out"):
        raise VlexportError(
            f"AdapterHub prefix adapter '{path}': option leave_out={config['leave_out']} is not supported (every "
            "decoder layer gets the same prefix length in vlexport's cache)"
        )
    act = _ACTIVATIONS.get(str(config.get("non_linearity", "tanh")).lower())
    if act is None:
        raise VlexportError(f"AdapterHub prefix adapter '{path}': non_linearity {config.get('non_linearity')!r} is "
                            f"not supported ({', '.join(sorted(_ACTIVATIONS))})")
    weights = folder / "pytorch_adapter.bin"
    state = read_tensors(weights)
    check_finite(state, weights)
    # save_adapter also writes per-layer aliases of the one shared pool; read the pool's own copy.
    own = {k.split(".self_prefix.", 1)[1]: v for k, v in state.items()
           if k.startswith("model.prefix_tuning.prefix_tunings.") or k.startswith("prefix_tuning.prefix_tunings.")}
    P = int(config.get("prefix_length", 0))
    if config.get("flat"):
        if set(own) != {"control_trans"}:
            raise VlexportError(f"AdapterHub flat prefix '{weights}' should hold one control_trans tensor; found {sorted(own)}")
        emb = own["control_trans"].float().reshape(P, -1)
    else:
        need = {"wte.weight", "control_trans.0.weight", "control_trans.0.bias", "control_trans.2.weight", "control_trans.2.bias"}
        if not need <= set(own):
            raise VlexportError(f"AdapterHub prefix '{weights}' lacks {sorted(need - set(own))}")
        fn = getattr(torch.nn.functional, act) if act in ("gelu", "silu", "relu") else torch.tanh
        with torch.no_grad():
            hidden = fn(own["wte.weight"].float() @ own["control_trans.0.weight"].float().T + own["control_trans.0.bias"].float())
            emb = hidden @ own["control_trans.2.weight"].float().T + own["control_trans.2.bias"].float()
    if emb.shape[0] != P:
        raise VlexportError(f"AdapterHub prefix '{weights}': {emb.shape[0]} prefix rows but prefix_length is {P}")
    return PrefixAdapter(path=path, weights_file=weights, config=config, embeddings=emb, format="adapterhub-prefix")

"""Prefix tuning (PEFT): compiled at build time into per-layer key/value tensors, a pack the runtime feeds.

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
    format: str = "peft-prefix"
    kind: str = "prefix"

    @property
    def num_tokens(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.embeddings.numel()) * 4

    @property
    def position_offset(self) -> int:
        """First RoPE position of the real tokens: PEFT continues after the prefix."""
        return self.num_tokens

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

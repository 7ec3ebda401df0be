"""A trained-size PEFT LoRA for the 7B-shaped fixture, written without loading the base.

vlexport.fixture.make_lora builds the model in FP32 to let PEFT wrap it: 28 GB for the 7B shape, which does not fit
on the 24 GB bench machine. This writes the same files PEFT writes for make_lora(base, out, scale=0.02, r=16,
lora_alpha=32, target_modules=q,k,v,o,gate,up,down) (same key names, shapes, FP32, A and B ~ N(0, 0.02^2)), from
config.json alone. The key names were read off make_lora's output on the tiny preset (peft 0.21, transformers 4.5x).

    python bench/int4_7b_lora.py BASE_DIR OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """module path -> (in_features, out_features) for every module PEFT's suffix match picks."""
    t, v = config["text_config"], config["vision_config"]
    h, inter = t["hidden_size"], t["intermediate_size"]
    heads = t["num_attention_heads"]
    kv = t.get("num_key_value_heads") or heads
    hd = t.get("head_dim") or h // heads
    out = {}
    for i in range(t["num_hidden_layers"]):
        p = f"model.language_model.layers.{i}"
        out |= {f"{p}.self_attn.q_proj": (h, heads * hd), f"{p}.self_attn.k_proj": (h, kv * hd),
                f"{p}.self_attn.v_proj": (h, kv * hd), f"{p}.self_attn.o_proj": (heads * hd, h),
                f"{p}.mlp.gate_proj": (h, inter), f"{p}.mlp.up_proj": (h, inter), f"{p}.mlp.down_proj": (inter, h)}
    vh = v["hidden_size"]
    for i in range(v["num_hidden_layers"]):  # CLIP's attention has q/k/v_proj too (its output is out_proj)
        p = f"model.vision_tower.encoder.layers.{i}.self_attn"
        out |= {f"{p}.{m}": (vh, vh) for m in ("q_proj", "k_proj", "v_proj")}
    return out


def write_lora(base: Path, out: Path, rank: int = 16, alpha: int = 32, scale: float = 0.02, seed: int = 1) -> int:
    from safetensors.numpy import save_file

    config = json.loads((base / "config.json").read_text())
    rng = np.random.default_rng(seed)
    tensors = {}
    for module, (k, n) in lora_shapes(config).items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = (scale * rng.standard_normal((rank, k))).astype(np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = (scale * rng.standard_normal((n, rank))).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    adapter_config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": str(base), "r": rank,
                      "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                      "target_modules": TARGETS, "modules_to_save": None, "use_dora": False, "use_rslora": False,
                      "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
                      "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True}
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return sum(t.size for t in tensors.values())


if __name__ == "__main__":
    n = write_lora(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"wrote {n / 1e6:.1f} M LoRA parameters to {sys.argv[2]}")

"""Bottleneck adapter slots: the graph inputs through which adapters are fed at run time (no torch here).

Per part (vision, decoder) one stacked tensor per field, [layers, 2 sites, ...]: site 0 is the residual add after
attention, site 1 the one after the MLP. The bottleneck width r is a dynamic dimension; r = 0 means no adapter.
  down_weight [L,2,r,d]  down_bias [L,2,r]  up_weight [L,2,d,r]  up_bias [L,2,d]
  mix [L,2,3] = (a, b, s)   activation [L,2,len(ACTIVATIONS)] one-hot
The graph computes x + h + s * up(act(down(a*x + b*h))) at each site (export/parts.py: bottleneck_slot).
"""

from __future__ import annotations

import numpy as np

FIELDS = ("down_weight", "down_bias", "up_weight", "up_bias", "mix", "activation")
ACTIVATIONS = ("relu", "silu", "gelu", "tanh")


def input_names(part: str) -> list[str]:
    return [f"{part}_adapter.{f}" for f in FIELDS]


def empty_feed(part: str, layers: int, dim: int) -> dict[str, np.ndarray]:
    """The feed meaning "no adapter": width 0, zero up-bias, zero scale."""
    act = np.zeros((layers, 2, len(ACTIVATIONS)), np.float32)
    act[..., 0] = 1.0
    fields = {
        "down_weight": np.zeros((layers, 2, 0, dim), np.float32),
        "down_bias": np.zeros((layers, 2, 0), np.float32),
        "up_weight": np.zeros((layers, 2, dim, 0), np.float32),
        "up_bias": np.zeros((layers, 2, dim), np.float32),
        "mix": np.zeros((layers, 2, 3), np.float32),
        "activation": act,
    }
    return {f"{part}_adapter.{k}": v for k, v in fields.items()}

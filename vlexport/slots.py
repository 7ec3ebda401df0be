"""Bottleneck adapter slots: the graph inputs through which adapters are fed at run time (no torch here).

Per part (vision, decoder) one stacked tensor per field, [layers, 2 sites, N rows, ...]: site 0 is the residual add
after attention, site 1 the one after the MLP. The bottleneck width r is a dynamic dimension; r = 0 means no adapter.
N is the batch's row count (row i runs its own adapter: mixed batches); the ORT-native decoder also takes N = 1
(every row the same), which the portable graphs need repeated (lora_slots.py).
  down_weight [L,2,N,r,d]  down_bias [L,2,N,r]  up_weight [L,2,N,d,r]  up_bias [L,2,N,d]
  mix [L,2,N,3] = (a, b, s)   activation [L,2,N,len(ACTIVATIONS)] one-hot
The graph computes x + h + s * up(act(down(a*x + b*h))) at each site (export/parts.py: bottleneck_slot).
"""

from __future__ import annotations

import numpy as np

FIELDS = ("down_weight", "down_bias", "up_weight", "up_bias", "mix", "activation")
ACTIVATIONS = ("relu", "silu", "gelu", "tanh")


def input_names(part: str) -> list[str]:
    return [f"{part}_adapter.{f}" for f in FIELDS]


ROW_AXIS = 2
# The axis of each field that is the bottleneck width (zero-padded when rows of different widths stack).
WIDTH_AXES = {"down_weight": 3, "down_bias": 3, "up_weight": 4}


def empty_feed(part: str, layers: int, dim: int) -> dict[str, np.ndarray]:
    """The feed meaning "no adapter": width 0, zero up-bias, zero scale, one row shared by the batch."""
    act = np.zeros((layers, 2, 1, len(ACTIVATIONS)), np.float32)
    act[..., 0] = 1.0
    fields = {
        "down_weight": np.zeros((layers, 2, 1, 0, dim), np.float32),
        "down_bias": np.zeros((layers, 2, 1, 0), np.float32),
        "up_weight": np.zeros((layers, 2, 1, dim, 0), np.float32),
        "up_bias": np.zeros((layers, 2, 1, dim), np.float32),
        "mix": np.zeros((layers, 2, 1, 3), np.float32),
        "activation": act,
    }
    return {f"{part}_adapter.{k}": v for k, v in fields.items()}


def width_axis(name: str) -> int | None:
    return WIDTH_AXES.get(name.rsplit(".", 1)[-1])


def sample_feed(part: str, layers: int, dim: int, width: int, rng: np.random.Generator, rows: int = 1,
                mix=(1.0, 1.0, 1.0), act: int = 0) -> dict[str, np.ndarray]:
    """Random slot weights (export checks): `rows` rows of width `width`, every row its own values."""
    if width == 0:
        feed = empty_feed(part, layers, dim)
        return {k: np.repeat(v, rows, axis=ROW_AXIS) for k, v in feed.items()}
    activation = np.zeros((layers, 2, rows, len(ACTIVATIONS)), np.float32)
    activation[..., act] = 1.0
    fields = {
        "down_weight": 0.1 * rng.standard_normal((layers, 2, rows, width, dim)),
        "down_bias": 0.1 * rng.standard_normal((layers, 2, rows, width)),
        "up_weight": 0.1 * rng.standard_normal((layers, 2, rows, dim, width)),
        "up_bias": 0.1 * rng.standard_normal((layers, 2, rows, dim)),
        "mix": np.broadcast_to(np.asarray(mix, np.float64), (layers, 2, rows, 3)),
        "activation": activation,
    }
    return {f"{part}_adapter.{k}": np.ascontiguousarray(v, np.float32) for k, v in fields.items()}

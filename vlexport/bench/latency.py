"""Latency of the bundle (ONNX Runtime) and of PyTorch eager, measured in one process at one thread count.

PyTorch runs the bundle's own merged weights through transformers' modules, as a user running the model in
PyTorch would: vision through `get_image_features` (all CLIP layers, as HF computes them), decode through the
language model with a DynamicCache. Ratios are PyTorch / bundle, so > 1 means vlexport is faster.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Timing:
    samples: list = field(default_factory=list)

    @property
    def p50(self) -> float:
        return float(np.percentile(self.samples, 50))

    @property
    def p90(self) -> float:
        return float(np.percentile(self.samples, 90))


def timed(fn, warmup: int, repeats: int) -> Timing:
    for _ in range(warmup):
        fn()
    t = Timing()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        t.samples.append(1000 * (time.perf_counter() - start))
    return t


class BundleSide:
    """Callables over the bundle's ONNX Runtime sessions."""

    def __init__(self, bundle, seed: int = 0):
        self.b = bundle
        self.rng = np.random.default_rng(seed)
        m = bundle.manifest["model"]
        self.hidden, self.vocab = m["hidden_size"], m["vocab_size"]

    def pixels(self) -> np.ndarray:
        s = self.b.image_spec.crop_height
        return self.rng.standard_normal((1, 3, s, s), dtype=np.float32)

    def vision(self, pixels):
        return lambda: self.b.image_features(pixels)

    def ttft(self, pixels, ids: np.ndarray):
        def run():
            self.b.prefill(ids, self.b.image_features(pixels))
        return run

    def prefill(self, ids: np.ndarray, feats: np.ndarray):
        return lambda: self.b.prefill(ids, feats)

    def context_state(self, context: int, task: str | None = None):
        """A one-row state holding `context` tokens (random ids, no image; a task's prefix comes on top), with room
        for DECODE_ROOM more."""
        ids = self.rng.integers(3, self.b.image_token_id - 1, size=(1, context), dtype=np.int64)
        return self.b.prefill(ids, None, task, capacity=self.b.prefix(task)[1] + context + DECODE_ROOM)

    def decode(self, context: int, task: str | None = None):
        """One decode step at `context` tokens: the step is taken back after each call (as PyTorch's cache.crop)."""
        b, state = self.b, self.context_state(context, task)
        token = [int(self.rng.integers(3, self.b.image_token_id - 1))]

        def run():
            b.step(state, token)
            state.rewind(1)
        return run


DECODE_ROOM = 128  # steps a decode state may take past its context (bench rounds)


class TorchSide:
    """The same computations in PyTorch eager on the merged model."""

    def __init__(self, model):
        self.model = model
        self.cfg = model.config

    def vision(self, pixels):
        import torch

        pv = torch.from_numpy(pixels)

        def run():
            with torch.no_grad():
                self.model.model.get_image_features(
                    pixel_values=pv, vision_feature_layer=self.cfg.vision_feature_layer,
                    vision_feature_select_strategy=self.cfg.vision_feature_select_strategy)
        return run

    def ttft(self, pixels, ids: np.ndarray):
        import torch

        pv, t_ids = torch.from_numpy(pixels), torch.from_numpy(ids)

        def run():
            with torch.no_grad():
                self.model(input_ids=t_ids, pixel_values=pv, attention_mask=torch.ones_like(t_ids), use_cache=True,
                           logits_to_keep=1)
        return run

    def prefill(self, embeds: np.ndarray):
        import torch

        x = torch.from_numpy(embeds)
        lm = self.model.model.language_model

        def run():
            with torch.no_grad():
                out = lm(inputs_embeds=x, use_cache=True)
                self.model.lm_head(out.last_hidden_state[:, -1:])
        return run

    def decode(self, context: int, rng):
        import torch
        from transformers import DynamicCache

        tc = self.cfg.text_config
        hd = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        cache = DynamicCache(config=tc)
        for i in range(tc.num_hidden_layers):
            k = torch.from_numpy(rng.standard_normal((1, tc.num_key_value_heads, context, hd), dtype=np.float32))
            cache.update(k, k.clone(), i)
        x = torch.from_numpy(rng.standard_normal((1, 1, tc.hidden_size), dtype=np.float32))
        pos = torch.tensor([[context]])
        lm = self.model.model.language_model

        def run():
            with torch.no_grad():
                out = lm(inputs_embeds=x, position_ids=pos, cache=cache, use_cache=True)
                self.model.lm_head(out.last_hidden_state)
            cache.crop(-1)  # drop the token just appended: every call decodes at the same context
        return run


def prompt_ids(bundle, length: int, rng) -> np.ndarray:
    """A prompt of `length` tokens holding one image's tokens (as LLaVA's processor makes them)."""
    n_img = bundle.num_image_tokens
    text = max(length - n_img, 2)
    ids = rng.integers(3, bundle.image_token_id - 1, size=(1, text + n_img), dtype=np.int64)
    ids[0, 1 : 1 + n_img] = bundle.image_token_id
    ids[0, 0] = 1
    return ids

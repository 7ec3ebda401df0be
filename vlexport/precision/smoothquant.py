"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before W8A8 quantization.

A linear layer fed by a norm computes (norm(x) * g) W^T. For a per-channel s > 0, (norm(x) * g / s) (W * s)^T is the
same function, but the activation channel j shrinks by s_j and the weight column j grows by it. With
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) both become easy to quantize. The scales are folded into the norm's weight
(and bias), so the exported graph has no extra operation and stays exact in FP32.

Only linears right after a norm are smoothed (q/k/v, gate/up, lm_head; CLIP q/k/v and fc1), as in the paper. An outlier
in the input of a down projection or an output projection has nowhere to fold; the sensitivity fallback keeps such
layers in higher precision instead.
"""

from __future__ import annotations

import numpy as np

# (norm, [linears fed by it]) per layer, relative to the layer module
DECODER_GROUPS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                  ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
VISION_GROUPS = (("layer_norm1", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                 ("layer_norm2", ("mlp.fc1",)))


def _groups(model, parts: set) -> list[tuple[str, object, list[tuple[str, object]]]]:
    """(name, norm module, [(name, linear)]) for every smoothable group in the given parts."""
    from ..export.parts import feature_indices

    out = []
    if "decoder" in parts:
        lm = model.model.language_model
        for i, layer in enumerate(lm.layers):
            for norm, linears in DECODER_GROUPS:
                out.append((f"language_model.layers.{i}.{norm}", layer.get_submodule(norm),
                            [(f"language_model.layers.{i}.{n}", layer.get_submodule(n)) for n in linears]))
        out.append(("language_model.norm", lm.norm, [("lm_head", model.lm_head)]))
    if "vision" in parts:
        tower = model.model.vision_tower
        used = max(feature_indices(model.config.vision_feature_layer, len(tower.encoder.layers)))
        for i, layer in enumerate(tower.encoder.layers[:used]):
            for norm, linears in VISION_GROUPS:
                out.append((f"vision_tower.layers.{i}.{norm}", layer.get_submodule(norm),
                            [(f"vision_tower.layers.{i}.{n}", layer.get_submodule(n)) for n in linears]))
    return out


def activation_maxima(model, processor, cases, texts: list[str], parts: set) -> dict[str, np.ndarray]:
    """Per-channel max |input| of each smoothable group over the calibration cases (one forward pass each)."""
    import torch

    maxima: dict[str, torch.Tensor] = {}
    hooks = []
    for name, _norm, linears in _groups(model, parts):
        def hook(_module, args, name=name):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0)
            maxima[name] = torch.maximum(maxima[name], x) if name in maxima else x
        hooks.append(linears[0][1].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for case, text in zip(cases, texts):
                inputs = processor(images=case.image.convert("RGB"), text=text, return_tensors="pt")
                model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return {k: v.numpy().astype(np.float32) for k, v in maxima.items()}


def smooth(model, maxima: dict[str, np.ndarray], alpha: float, parts: set, record: dict | None = None) -> int:
    """Fold the smoothing scales into the model in place; returns the number of groups smoothed. record, if given,
    gets {linear module: (input scale s, None)}: its input is now x / s (LoRA slots fed on it follow)."""
    import torch

    n = 0
    with torch.no_grad():
        for name, norm, linears in _groups(model, parts):
            if name not in maxima:
                continue
            act = torch.from_numpy(maxima[name]).clamp(min=1e-5)
            weight = torch.stack([lin.weight.abs().amax(dim=0) for _, lin in linears]).amax(dim=0).clamp(min=1e-5)
            s = (act.pow(alpha) / weight.pow(1 - alpha)).clamp(min=1e-5)
            norm.weight.div_(s)
            if getattr(norm, "bias", None) is not None:
                norm.bias.div_(s)
            for _, lin in linears:
                lin.weight.mul_(s)
                if record is not None:
                    record[lin] = (s.float().numpy(), None)
            n += 1
    return n

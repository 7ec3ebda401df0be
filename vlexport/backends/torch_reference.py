"""The PyTorch reference: the base with its adapters applied unmerged, as they were trained.

LoRA goes through PEFT itself (keys rewritten to transformers 5's layout first, since PEFT silently drops old-layout
projector keys). A BitFit dump is the trained values of the model's own bias parameters, so it is loaded into them.
PEFT BEFT goes through PEFT when it is the only PEFT kind; next to LoRA (PEFT cannot stack both types in one model)
its delta is added to the bias, which is exactly BEFT's forward (output + beft_bias).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..adapters import Adapter
from ..adapters.bitfit import BitFitAdapter
from ..adapters.lora import LoraAdapter
from ..adapters.prefix import PrefixAdapter
from ..model import load_llava


def build_reference(base: Path, adapters: list[Adapter], num_text_layers: int | None = None):
    """num_text_layers keeps only the first decoder layers, and the adapter entries that live in them.

    A prefix adapter goes through PEFT's forward() (never its generate(), which drops the prefix with
    transformers 5); next to LoRA/BEFT, which PEFT cannot stack with it, PrefixReference re-implements it."""
    prefixes = [a for a in adapters if isinstance(a, PrefixAdapter)]
    bottlenecks = [a for a in adapters if a.kind == "bottleneck"]
    adapters = [a for a in adapters if a.kind in ("lora", "bitfit")]
    model = _merged_kinds_reference(base, adapters, num_text_layers)
    for a in bottlenecks:
        llava = model.get_base_model() if hasattr(model, "get_base_model") else model
        if a.part == "vision":
            layers, dim = len(llava.model.vision_tower.encoder.layers), llava.config.vision_config.hidden_size
        else:
            layers, dim = len(llava.model.language_model.layers), llava.config.text_config.hidden_size
        attach_bottleneck(model, a.part, a.slot_feed(layers, dim))
    if not prefixes:
        return model
    if len(prefixes) > 1:
        raise ValueError("one prefix per reference")
    if hasattr(model, "peft_config") or prefixes[0].format != "peft-prefix":
        return PrefixReference(model, prefixes[0])
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(_folder(prefixes[0].path))).eval()


def _folder(path: Path) -> Path:
    return path if path.is_dir() else path.parent


class PrefixReference(torch.nn.Module):
    """Prefix tuning's forward, re-implemented on any model: the prefix keys/values fill the cache first and the
    attention mask gets P ones in front. Positions follow the library that trained it: PEFT continues after the
    prefix (HF derives that from the cache), AdapterHub starts the real tokens at 0."""

    def __init__(self, model, prefix: PrefixAdapter):
        super().__init__()
        self.model = model
        cfg = (model.get_base_model() if hasattr(model, "get_base_model") else model).config.text_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.text_config = cfg
        self.kv = {k: torch.from_numpy(v) for k, v in prefix.key_values(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim).items()}
        self.num_tokens = prefix.num_tokens
        self.position_offset = prefix.position_offset

    def get_base_model(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
        from transformers import DynamicCache

        batch = input_ids.shape[0]
        cache = DynamicCache(config=self.text_config)
        for i in range(self.text_config.num_hidden_layers):
            k = self.kv[f"past_key_values.{i}.key"][None].expand(batch, -1, -1, -1)
            v = self.kv[f"past_key_values.{i}.value"][None].expand(batch, -1, -1, -1)
            cache.update(k, v, i)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = torch.cat([torch.ones(batch, self.num_tokens, dtype=attention_mask.dtype), attention_mask], dim=1)
        if self.position_offset != self.num_tokens and "position_ids" not in kwargs:
            kwargs["position_ids"] = (self.position_offset + torch.arange(input_ids.shape[1])).expand(batch, -1)
        return self.model(input_ids=input_ids, pixel_values=pixel_values, attention_mask=mask, cache=cache, **kwargs)


# (layer-norm module before the site, sub-block whose output h the adapter sees) for sites 0 and 1.
_SITES = {
    "vision": (("layer_norm1", "self_attn"), ("layer_norm2", "mlp")),
    "decoder": (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp")),
}


def attach_bottleneck(model, part: str, feed: dict) -> list:
    """Bottleneck adapters on the HF model, unmerged: at each residual add x + h, h becomes h + s*f(a*x + b*h).

    x is captured by a pre-hook on the sub-block's layer norm (its input is the residual stream), h by a hook on
    the sub-block's output. `feed` holds the slot arrays (vlexport/slots.py). Returns the hook handles."""
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = llava.model.vision_tower.encoder.layers if part == "vision" else llava.model.language_model.layers
    return attach_bottleneck_to_layers(layers, part, feed)


def attach_bottleneck_to_layers(layers, part: str, feed: dict) -> list:
    """attach_bottleneck on any list of CLIP encoder or Llama decoder layers."""
    t = {k.split(".", 1)[1]: torch.from_numpy(v) for k, v in feed.items()}
    handles = []
    for i in range(t["mix"].shape[0]):
        for site, (norm_name, sub_name) in enumerate(_SITES[part]):
            if t["down_weight"].shape[2] == 0 and not t["up_bias"][i, site].any():
                continue
            seen: dict = {}
            norm, sub = getattr(layers[i], norm_name), getattr(layers[i], sub_name)
            handles.append(norm.register_forward_pre_hook(lambda _m, args, seen=seen: seen.update(x=args[0])))
            handles.append(sub.register_forward_hook(_adapter_hook(t, i, site, seen)))
    return handles


def _adapter_hook(t: dict, i: int, site: int, seen: dict):
    from ..slots import ACTIVATIONS

    functions = {"relu": torch.relu, "silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh}
    act = functions[ACTIVATIONS[int(t["activation"][i, site].argmax())]]
    a, b, s = (float(v) for v in t["mix"][i, site])

    def hook(_module, _args, output):
        h = output[0] if isinstance(output, tuple) else output
        z = a * seen["x"] + b * h
        y = act(z @ t["down_weight"][i, site].T + t["down_bias"][i, site]) @ t["up_weight"][i, site].T + t["up_bias"][i, site]
        h = h + s * y
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return hook


def _merged_kinds_reference(base: Path, adapters: list[Adapter], num_text_layers: int | None):
    model = load_llava(base, num_text_layers)
    if num_text_layers is not None:
        adapters = [a.without_text_layers_from(num_text_layers) for a in adapters]
    loras = [a for a in adapters if isinstance(a, LoraAdapter)]
    befts = [a for a in adapters if isinstance(a, BitFitAdapter) and not a.absolute]
    for a in adapters:
        a.validate(model)
        if isinstance(a, BitFitAdapter) and (a.absolute or loras):
            a.merge_into(model)
    peft_adapters = loras or befts
    if not peft_adapters:
        return model
    from peft import PeftModel

    names = [f"adapter{i}" for i in range(len(peft_adapters))]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [_peft_dir(a, Path(tmp) / n) for a, n in zip(peft_adapters, names)]
        model = PeftModel.from_pretrained(model, str(dirs[0]), adapter_name=names[0])
        for d, n in zip(dirs[1:], names[1:]):
            model.load_adapter(str(d), adapter_name=n)
    if len(names) > 1:
        model.base_model.set_adapter(names)
    return model.eval()


def _peft_dir(adapter: Adapter, out: Path) -> Path:
    if isinstance(adapter, LoraAdapter):
        return adapter.write_peft_dir(out)
    return adapter.path if adapter.path.is_dir() else adapter.path.parent


def reference_generate(model, processor, image, text: str, max_new_tokens: int) -> list[int]:
    """Greedy tokens (new tokens only): HF generate, or, for prefix tuning, a greedy loop over full forward passes."""
    inputs = processor(images=image, text=text, return_tensors="pt")
    if _has_prefix(model):
        return _greedy_by_forward(model, inputs, max_new_tokens)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _has_prefix(model) -> bool:
    if isinstance(model, PrefixReference):
        return True
    config = getattr(model, "peft_config", {}).get("default")
    return getattr(config, "peft_type", None) is not None and str(config.peft_type).endswith("PREFIX_TUNING")


def _greedy_by_forward(model, inputs, max_new_tokens: int) -> list[int]:
    """Each step recomputes the whole sequence: slow, but it uses only forward(), which is right for prefixes."""
    eos = model.get_base_model().generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    ids = inputs["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        while len(new) < max_new_tokens:
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], attention_mask=torch.ones_like(ids)).logits
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token in eos:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new

"""The PyTorch reference: the base with its adapters applied unmerged, as they were trained.

LoRA goes through PEFT itself (keys rewritten to transformers 5's layout first, since PEFT silently drops old-layout
projector keys). A BitFit dump is the trained values of the model's own bias parameters, so it is loaded into them,
by PyTorch name, from the file's own keys (set_biases_by_name: never through vlexport's merge code or key map).
PEFT BEFT goes through PEFT when it is the only PEFT kind; next to LoRA (PEFT cannot stack both types in one model)
its delta is added to the bias the same way, which is exactly BEFT's forward (output + beft_bias).
PEFT's other methods (IA3, VeRA, LoHa, ...) go through PEFT too, unmerged; adapters of different types nest in the
order given (_peft_groups), each PEFT model wrapping the layers of the one before.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..adapters import Adapter
from ..adapters.bitfit import BitFitAdapter
from ..adapters.lora import LoraAdapter
from ..adapters.peft_methods import PeftMethodAdapter
from ..adapters.prefix import PrefixAdapter
from ..errors import VlexportError
from ..model import load_llava


def build_reference(base: Path, adapters: list[Adapter], num_text_layers: int | None = None, dtype=torch.float32):
    """num_text_layers keeps only the first decoder layers, and the adapter entries that live in them.

    dtype is the dtype of the whole reference: the base, PEFT's adapter layers, BitFit biases, the bottleneck
    hooks' tensors and a prefix's keys/values (torch.float64 gives the oracle that verify compares against).

    A prefix adapter goes through PEFT's forward() (never its generate(), which drops the prefix with
    transformers 5); next to LoRA/BEFT, which PEFT cannot stack with it, PrefixReference re-implements it."""
    prefixes = [a for a in adapters if isinstance(a, PrefixAdapter)]
    bottlenecks = [a for a in adapters if a.kind == "bottleneck"]
    adapters = [a for a in adapters if a.kind in ("lora", "bitfit", "peft")]
    model = _merged_kinds_reference(base, adapters, num_text_layers, dtype)
    for a in bottlenecks:
        a.validate(model.get_base_model() if hasattr(model, "get_base_model") else model)
        attach_bottleneck_adapter(_tower_layers(model, a.part), a, dtype=dtype)
    if not prefixes:
        return model
    if len(prefixes) > 1:
        raise ValueError("one prefix per reference")
    if hasattr(model, "peft_config") or prefixes[0].format != "peft-prefix":
        return PrefixReference(model, prefixes[0], dtype=dtype)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(_folder(prefixes[0].path))).to(dtype).eval()


def _folder(path: Path) -> Path:
    return path if path.is_dir() else path.parent


class PrefixReference(torch.nn.Module):
    """Prefix tuning's forward, re-implemented on any model: the prefix keys/values fill the cache first and the
    attention mask gets P ones in front. Positions follow the library that trained it: PEFT continues after the
    prefix (HF derives that from the cache), AdapterHub starts the real tokens at 0."""

    def __init__(self, model, prefix: PrefixAdapter, dtype=torch.float32):
        super().__init__()
        self.model = model
        cfg = (model.get_base_model() if hasattr(model, "get_base_model") else model).config.text_config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.text_config = cfg
        self.kv = {k: torch.from_numpy(v).to(dtype) for k, v in prefix.key_values(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim).items()}
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


def _tower_layers(model, part: str):
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    return llava.model.vision_tower.encoder.layers if part == "vision" else llava.model.language_model.layers


_FUNCTIONS = {"relu": torch.relu, "silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh}


def attach_bottleneck_adapter(layers, adapter, dtype=torch.float32) -> list:
    """A bottleneck adapter on a list of CLIP encoder or Llama decoder layers, unmerged, from the adapter's own
    per-layer weights (no slot arrays: the reference must not share the exported slots' packing). At each residual
    add x + h, h becomes h + s*f(a*x + b*h). Adapters in layers the model does not run are left out, as in the
    graph. Returns the hook handles."""
    a, b, s = (float(v) for v in adapter.mix)
    act = _FUNCTIONS[adapter.activation]
    handles = []
    for (i, site), (down_w, down_b, up_w, up_b) in sorted(adapter.weights.items()):
        if i >= len(layers):
            continue
        w = [torch.as_tensor(v).to(dtype) for v in (down_w, down_b, up_w, up_b)]
        handles += _hook_site(layers[i], adapter.part, site, lambda z, w=w: act(z @ w[0].T + w[1]) @ w[2].T + w[3], a, b, s)
    return handles


def _hook_site(layer, part: str, site: int, f, a: float, b: float, s: float) -> list:
    """x from a pre-hook on the sub-block's layer norm (its input is the residual stream), h from a hook on the
    sub-block's output, which becomes h + s*f(a*x + b*h)."""
    norm_name, sub_name = _SITES[part][site]
    seen: dict = {}

    def hook(_module, _args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h + s * f(a * seen["x"] + b * h)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return [getattr(layer, norm_name).register_forward_pre_hook(lambda _m, args: seen.update(x=args[0])),
            getattr(layer, sub_name).register_forward_hook(hook)]


def attach_bottleneck(model, part: str, feed: dict, dtype=torch.float32) -> list:
    """Bottleneck slot arrays (vlexport/slots.py) on the HF model as hooks: what the exported slots compute, for
    tests of the slot packing. The reference itself uses attach_bottleneck_adapter. Returns the hook handles."""
    return attach_bottleneck_to_layers(_tower_layers(model, part), part, feed, dtype=dtype)


def attach_bottleneck_to_layers(layers, part: str, feed: dict, dtype=torch.float32) -> list:
    """attach_bottleneck on any list of CLIP encoder or Llama decoder layers; the hooks compute in `dtype`."""
    from ..slots import ACTIVATIONS

    # One row (slots.ROW_AXIS): the hooks apply the same adapter to every row.
    t = {k.split(".", 1)[1]: torch.from_numpy(v).to(dtype)[:, :, 0] for k, v in feed.items()}
    handles = []
    for i in range(t["mix"].shape[0]):
        for site in range(2):
            if t["down_weight"].shape[2] == 0 and not t["up_bias"][i, site].any():
                continue
            act = _FUNCTIONS[ACTIVATIONS[int(t["activation"][i, site].argmax())]]
            w = [t[k][i, site] for k in ("down_weight", "down_bias", "up_weight", "up_bias")]
            a, b, s = (float(v) for v in t["mix"][i, site])
            handles += _hook_site(layers[i], part, site, lambda z, w=w, act=act: act(z @ w[0].T + w[1]) @ w[2].T + w[3], a, b, s)
    return handles


def _merged_kinds_reference(base: Path, adapters: list[Adapter], num_text_layers: int | None, dtype=torch.float32):
    model = load_llava(base, num_text_layers, dtype=str(dtype).removeprefix("torch."))
    if num_text_layers is not None:
        adapters = [a.without_text_layers_from(num_text_layers) for a in adapters]
    loras = [a for a in adapters if isinstance(a, (LoraAdapter, PeftMethodAdapter))]
    befts = [a for a in adapters if isinstance(a, BitFitAdapter) and not a.absolute]
    for a in adapters:
        a.validate(model)
        if isinstance(a, BitFitAdapter) and (a.absolute or loras):
            set_biases_by_name(model, a, dtype)
    groups = _peft_groups(loras) if loras else ([befts] if befts else [])
    if not groups:
        return model
    from peft import PeftModel

    names, peft_model = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for group in groups:
            group_names = [f"adapter{len(names) + i}" for i in range(len(group))]
            dirs = [_peft_dir(a, Path(tmp) / n) for a, n in zip(group, group_names)]
            # A later group wraps the layers PEFT put in for the earlier ones, so it sees each module as the
            # earlier adapters left it: merging them one after the other, unmerged.
            inner = model if peft_model is None else peft_model.base_model.model
            try:
                peft_model = PeftModel.from_pretrained(inner, str(dirs[0]), adapter_name=group_names[0])
            except ValueError:
                # Some methods (VeRA sizes its shared matrices from plain nn.Linear targets) refuse to wrap
                # another method's layers: PEFT itself merges the earlier ones first, which is the same composition.
                if peft_model is None or _has_adapter(inner, group_names[0]):
                    raise
                inner = peft_model.merge_and_unload()
                peft_model = PeftModel.from_pretrained(inner, str(dirs[0]), adapter_name=group_names[0])
            for d, n in zip(dirs[1:], group_names[1:]):
                peft_model.load_adapter(str(d), adapter_name=n)
            if len(group_names) > 1:
                peft_model.base_model.set_adapter(group_names)
            names += group_names
    if len(groups) > 1:
        _activate_own_adapters(peft_model, names)
    return peft_model.to(dtype).eval()


def _peft_groups(adapters: list) -> list[list]:
    """Adapters in the order given, as PEFT models to nest: consecutive LoRAs stack in one PEFT model (PEFT adds
    their deltas, as merging them in turn does); every other PEFT method gets its own, since PEFT cannot stack
    different types (e.g. LoRA and IA3) on one module."""
    groups: list[list] = []
    for a in adapters:
        if groups and isinstance(a, LoraAdapter) and all(isinstance(g, LoraAdapter) for g in groups[-1]):
            groups[-1].append(a)
        else:
            groups.append([a])
    return groups


def _has_adapter(model, name: str) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) and name in m._all_available_adapter_names() for m in model.modules())


def _activate_own_adapters(peft_model, names: list[str]) -> None:
    """Each PEFT model's set_adapter re-activates, by name, every layer of its tuner class in the whole model,
    the earlier models' layers included (AdaLoRA's layers are LoRA layers); give every layer back the adapters
    it holds."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in peft_model.modules():
        if isinstance(module, BaseTunerLayer):
            own = set(module._all_available_adapter_names())
            module.set_adapter([n for n in names if n in own], inference_mode=True)


# Containers that name the same module differently across transformers versions and PEFT's wrapper. Dropping them
# (and a repeated one, as in the LLaVA repo's vision_tower.vision_tower) gives a name every layout agrees on, e.g.
# vision_tower.encoder.layers.0.mlp.fc1 or layers.0.self_attn.o_proj.
_CONTAINERS = {"base_model", "model", "language_model", "vision_model"}
_BIAS_SUFFIXES = (".beft_bias.default", ".beft_bias", ".bias")


def _canonical(name: str) -> str:
    parts = [p for p in name.split(".") if p not in _CONTAINERS]
    return ".".join(p for i, p in enumerate(parts) if i == 0 or p != parts[i - 1])


def model_names_by_canonical(model) -> dict[str, str]:
    """{canonical name: the model's own module name}, derived from the model's modules alone (no vlexport key
    map), so that a mapping bug in the build's reader cannot hide in the reference too."""
    out: dict[str, str] = {}
    for name, module in model.named_modules():
        if not hasattr(module, "weight"):
            continue
        key = _canonical(name)
        if key in out:
            raise VlexportError(f"reference: modules '{out[key]}' and '{name}' have the same canonical name '{key}'")
        out[key] = name
    return out


def set_biases_by_name(model, adapter: BitFitAdapter, dtype=torch.float32) -> list[str]:
    """A BitFit dump (absolute biases) or BEFT (deltas on the layer output, i.e. on its bias), applied to the
    model's own bias parameters found by PyTorch name from the file's raw keys. A module without a bias (a Llama
    linear) gets a real nn.Parameter bias registered on it. Returns the module names set."""
    from ..adapters.io import read_tensors

    state = read_tensors(adapter.weights_file)
    names = model_names_by_canonical(model)
    layers = model.config.text_config.num_hidden_layers
    done = []
    with torch.no_grad():
        for key, value in state.items():
            stem = next((key[: -len(s)] for s in _BIAS_SUFFIXES if key.endswith(s)), None)
            if stem is None:
                raise VlexportError(f"reference: '{adapter.weights_file}' tensor '{key}' is not a bias")
            canonical = _canonical(stem)
            if canonical.startswith("layers.") and int(canonical.split(".")[1]) >= layers:
                continue  # few-layer reference: a decoder layer this model does not have
            if canonical not in names:
                raise VlexportError(f"reference: '{adapter.weights_file}' tensor '{key}' names no module of the model")
            name = names[canonical]
            module = model.get_submodule(name)
            value = value.to(dtype).reshape(-1)
            bias = getattr(module, "bias", None)
            if bias is None:
                module.register_parameter("bias", torch.nn.Parameter(value.clone()))
            elif adapter.absolute:
                bias.copy_(value)
            else:
                bias.copy_(bias + value)
            done.append(name)
    return done


def _peft_dir(adapter: Adapter, out: Path) -> Path:
    if isinstance(adapter, (LoraAdapter, PeftMethodAdapter)):
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
            logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], attention_mask=torch.ones_like(ids),
                           **_image_sizes(inputs)).logits
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token in eos:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


# -- the reference's outputs, as verify compares them -----------------------------------------------------------
def oracle_inputs(inputs):
    """The processor's output for the float64 oracle: pixel values widened exactly (float32 -> float64), so the
    oracle sees the very input the bundle and PyTorch FP32 see and measures arithmetic error alone."""
    return {k: v.to(torch.float64) if k == "pixel_values" else v for k, v in inputs.items()}


def _image_sizes(inputs) -> dict:
    """LLaVA-NeXT's processor output has image_sizes, which its model needs to unpad and pack the tiles."""
    return {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}


def reference_features(model, pixel_values, image_sizes=None):
    """Image features [num_images * tokens, hidden] as LLaVA's language model receives them (numpy): for
    LLaVA-NeXT (image_sizes given) packed by HF's own LlavaNextModel.get_image_features."""
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = llava.config
    with torch.no_grad():
        out = llava.model.get_image_features(
            pixel_values=pixel_values,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            **({"image_sizes": image_sizes} if image_sizes is not None else {}),
        )
    return torch.cat(list(out.pooler_output), dim=0).numpy()


def reference_logits(model, inputs, continuation: list[int]):
    """Logits that predict each continuation token, from one forward pass over prompt + continuation (numpy)."""
    ids = torch.cat([inputs["input_ids"], torch.tensor([continuation[:-1]], dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=inputs["pixel_values"], attention_mask=torch.ones_like(ids),
                       **_image_sizes(inputs)).logits
    start = inputs["input_ids"].shape[1] - 1
    return logits[0, start : start + len(continuation)].numpy()


def reference_embeds_and_kv(model, inputs, num_layers: int):
    """(inputs_embeds with the image features written in, the features, present.{i}.key|value of the first
    num_layers layers), all numpy: what `verify --layers` compares the cut decoder graph with."""
    llava = model.get_base_model() if hasattr(model, "get_base_model") else model
    feats = reference_features(model, inputs["pixel_values"], inputs.get("image_sizes"))
    with torch.no_grad():
        ids = inputs["input_ids"]
        embeds = llava.model.get_input_embeddings()(ids)
        mask = (ids == llava.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, torch.from_numpy(feats).to(embeds.dtype))
    return embeds.numpy(), feats, reference_kv(model, embeds, num_layers)


def reference_kv(model, embeds, num_layers: int) -> dict:
    """present.{i}.key|value [1, kv, S, hd] (numpy) of the first num_layers layers, over inputs_embeds."""
    with torch.no_grad():
        out = model(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long), use_cache=True)
    kv = {}
    for i in range(num_layers):
        kv[f"present.{i}.key"] = out.cache.layers[i].keys.numpy()
        kv[f"present.{i}.value"] = out.cache.layers[i].values.numpy()
    return kv

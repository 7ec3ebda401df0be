"""AdapterHub (`adapters` 1.3) bottleneck adapters: SeqBn (Pfeiffer), DoubleSeqBn (Houlsby), ParBn.

Not merged: each becomes slot weights fed at run time (vlexport/slots.py), so one base graph serves every task.
The library is not imported (it pins transformers 4.57); its files are read. Its semantics in pre-LN Llama/CLIP
blocks, checked against golden outputs of the library itself (tests/data/adapterhub/SEMANTICS.md), with x the
sub-block's residual input, h its output and f(z) = up(act(down(z))):
  sequential   z = (x if original_ln_before) + h;  out = s*f(z) + (h if residual_before_ln else z) + (x if original_ln_after)
  parallel     out = h + s*f(x) + (x if original_ln_after)
at the attention site (mh_adapter) and/or the MLP site (output_adapter). Every supported combination is
x + h + s*f(a*x + b*h); the others (and gating, adapter layer norms, learned scaling) are refused by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import VlexportError
from ..files import read_json, sha256_file
from ..slots import ACTIVATIONS, FIELDS
from .io import check_finite, read_tensors

# non_linearity names -> our slot activations (exact functions: gelu is erf-based, swish/silu is x*sigmoid(x)).
_ACTIVATION = {"relu": "relu", "swish": "silu", "silu": "silu", "gelu": "gelu", "tanh": "tanh"}
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(attention|output)_adapters\.adapters\.([^.]+)\.adapter_(down\.0|up)\.(weight|bias)$")
_VISION_CLASSES = ("CLIPVisionModel", "CLIPVisionModelWithProjection")
_TEXT_CLASSES = ("LlamaForCausalLM", "LlamaModel")


@dataclass
class BottleneckAdapter:
    path: Path
    weights_file: Path
    config: dict  # the inner "config" of adapter_config.json
    part: str  # "vision" | "decoder"
    weights: dict = field(default_factory=dict)  # (layer, site) -> (down_w [r,d], down_b [r], up_w [d,r], up_b [d])
    mix: tuple = (1.0, 1.0, 1.0)
    activation: str = "relu"
    preset: str = "bottleneck"
    kind: str = "bottleneck"

    @property
    def format(self) -> str:
        return "vlexport-plain" if self.preset == "plain" else f"adapterhub-{self.preset}"

    @property
    def sha256(self) -> str:
        return sha256_file(self.weights_file)

    @property
    def nbytes(self) -> int:
        return sum(sum(t.nbytes for t in w) for w in self.weights.values())

    def describe(self) -> dict:
        widths = sorted({w[0].shape[0] for w in self.weights.values()})
        sites = sorted({("attention", "mlp")[s] for _, s in self.weights})
        return {"kind": self.kind, "format": self.format, "path": str(self.path), "sha256": self.sha256,
                "part": self.part, "sites": sites, "widths": widths, "activation": self.activation,
                "mix": list(self.mix), "layers": sorted({l for l, _ in self.weights}), "merged": False}

    def slot_feed(self, layers: int, dim: int) -> dict:
        """Stacked slot arrays for a part with `layers` layers of width `dim`, padded to the widest bottleneck.

        Adapters in layers the part does not run (CLIP layers after LLaVA's feature layer) change nothing
        downstream and are left out."""
        used = {k: v for k, v in self.weights.items() if k[0] < layers}
        for (layer, _site), (down_w, *_rest) in used.items():
            if down_w.shape[1] != dim:
                raise VlexportError(
                    f"bottleneck adapter '{self.path}': layer {layer} works on width {down_w.shape[1]} but the "
                    f"{self.part} tower is {dim} wide; it was trained for another model: check --base"
                )
        width = max((w[0].shape[0] for w in used.values()), default=0)
        out = {  # one row (slots.ROW_AXIS), broadcast over the batch; mixed batches stack rows at run time
            "down_weight": np.zeros((layers, 2, 1, width, dim), np.float32),
            "down_bias": np.zeros((layers, 2, 1, width), np.float32),
            "up_weight": np.zeros((layers, 2, 1, dim, width), np.float32),
            "up_bias": np.zeros((layers, 2, 1, dim), np.float32),
            "mix": np.zeros((layers, 2, 1, 3), np.float32),
            "activation": np.zeros((layers, 2, 1, len(ACTIVATIONS)), np.float32),
        }
        out["activation"][..., ACTIVATIONS.index(self.activation)] = 1.0
        for (layer, site), (down_w, down_b, up_w, up_b) in used.items():
            r = down_w.shape[0]  # narrower bottlenecks are zero-padded: the padding adds exactly 0
            out["down_weight"][layer, site, 0, :r] = down_w
            out["down_bias"][layer, site, 0, :r] = down_b
            out["up_weight"][layer, site, 0, :, :r] = up_w
            out["up_bias"][layer, site, 0] = up_b
            out["mix"][layer, site, 0] = self.mix
        assert tuple(out) == FIELDS
        return {f"{self.part}_adapter.{k}": v for k, v in out.items()}

    def validate(self, model) -> None:
        cfg = model.config.vision_config if self.part == "vision" else model.config.text_config
        layer_count = cfg.num_hidden_layers
        beyond = sorted({l for l, _ in self.weights if l >= layer_count})
        if beyond:
            raise VlexportError(
                f"bottleneck adapter '{self.path}' has weights for layer(s) {beyond} but the {self.part} tower has "
                f"{layer_count} layers; it was trained for another model: check --base"
            )
        self.slot_feed(layer_count, cfg.hidden_size)

    def without_text_layers_from(self, num_layers: int) -> "BottleneckAdapter":
        raise VlexportError("few-layer parity (--layers) does not support bottleneck tasks yet; verify them in full")


PLAIN_FORMAT = "vlexport-bottleneck"
_PLAIN_KEY = re.compile(r"^layers\.(\d+)\.(attention|mlp)\.(down|up)\.(weight|bias)$")
_SITE_NAMES = ("attention", "mlp")


def save_plain(adapter: "BottleneckAdapter", path: Path) -> Path:
    """Write `adapter` in vlexport's plain bottleneck layout (README: "A plain bottleneck file"):
    one .safetensors, tensors layers.N.attention|mlp.down|up.weight|bias, and header metadata format, part,
    mix "a,b", scaling and activation."""
    from safetensors.numpy import save_file

    tensors = {}
    for (layer, site), (down_w, down_b, up_w, up_b) in adapter.weights.items():
        key = f"layers.{layer}.{_SITE_NAMES[site]}"
        tensors.update({f"{key}.down.weight": down_w, f"{key}.down.bias": down_b,
                        f"{key}.up.weight": up_w, f"{key}.up.bias": up_b})
    meta = {"format": PLAIN_FORMAT, "part": adapter.part, "mix": f"{adapter.mix[0]:g},{adapter.mix[1]:g}",
            "scaling": repr(float(adapter.mix[2])), "activation": adapter.activation}
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(path), metadata=meta)
    return Path(path)


def is_plain_bottleneck(path: Path) -> bool:
    if Path(path).suffix != ".safetensors" or not Path(path).is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            return (f.metadata() or {}).get("format") == PLAIN_FORMAT
    except Exception:  # not a readable safetensors file: the regular readers report it with their own message
        return False


def read_plain_bottleneck(path: Path) -> "BottleneckAdapter":
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise VlexportError(
            f"plain bottleneck file '{path}' is not a readable safetensors file ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); it may be truncated: copy or write it again"
        ) from None
    check_finite(state, path)
    for field_name in ("part", "mix", "scaling", "activation"):
        if field_name not in meta:
            raise VlexportError(f"plain bottleneck file '{path}' has no '{field_name}' in its header metadata")
    if meta["part"] not in ("vision", "decoder"):
        raise VlexportError(f"plain bottleneck file '{path}': part {meta['part']!r} must be vision or decoder")
    if meta["activation"] not in ACTIVATIONS:
        raise VlexportError(f"plain bottleneck file '{path}': activation {meta['activation']!r} is not one of {ACTIVATIONS}")
    try:
        a, b = (float(v) for v in meta["mix"].split(","))
        scaling = float(meta["scaling"])
    except ValueError:
        raise VlexportError(f"plain bottleneck file '{path}': mix must be 'a,b' and scaling a number") from None
    grouped: dict = {}
    for key, value in state.items():
        m = _PLAIN_KEY.match(key)
        if not m:
            raise VlexportError(f"plain bottleneck file '{path}': tensor '{key}' is not layers.N.attention|mlp.down|up.weight|bias")
        layer, site, proj, leaf = m.groups()
        grouped.setdefault((int(layer), _SITE_NAMES.index(site)), {})[f"{proj}.{leaf}"] = value.float().numpy()
    weights = {}
    for (layer, site), t in sorted(grouped.items()):
        stem = f"layers.{layer}.{_SITE_NAMES[site]}"
        for name in ("down.weight", "down.bias", "up.weight", "up.bias"):
            if name not in t:
                raise VlexportError(
                    f"plain bottleneck file '{path}' lacks tensor '{stem}.{name}' (it has {', '.join(sorted(f'{stem}.{n}' for n in t))}); "
                    "each adapted site needs down.weight [r, d], down.bias [r], up.weight [d, r] and up.bias [d]: "
                    "write the file again (vlexport.adapters.bottleneck.save_plain)"
                )
        down_w, down_b, up_w, up_b = t["down.weight"], t["down.bias"], t["up.weight"], t["up.bias"]
        r, d = down_w.shape if down_w.ndim == 2 else (None, None)
        want = {"down.weight": (r, d), "down.bias": (r,), "up.weight": (d, r), "up.bias": (d,)}
        for name, value in zip(want, (down_w, down_b, up_w, up_b)):
            if r is None or value.shape != want[name]:
                raise VlexportError(
                    f"plain bottleneck file '{path}': tensor '{stem}.{name}' has shape {tuple(value.shape)}, expected "
                    f"{want[name] if r is not None else '[r, d]'} for '{stem}.down.weight' {tuple(down_w.shape)}"
                )
        weights[(layer, site)] = (down_w, down_b, up_w, up_b)
    return BottleneckAdapter(path=path, weights_file=path, config=dict(meta), part=meta["part"], weights=weights,
                             mix=(a, b, scaling), activation=meta["activation"], preset="plain")


def _refuse(path: Path, option: str, value, why: str) -> VlexportError:
    return VlexportError(f"bottleneck adapter '{path}': option {option}={value!r} is not supported ({why})")


def _mix(config: dict, path: Path) -> tuple[float, float]:
    """(a, b) of x + h + s*f(a*x + b*h) for this configuration, or a refusal naming the option."""
    if not config.get("original_ln_after", True):
        raise _refuse(path, "original_ln_after", False, "the adapter output would replace the residual stream")
    if config.get("is_parallel"):
        return 1.0, 0.0
    before = bool(config.get("original_ln_before", True))
    if before and not config.get("residual_before_ln", True):
        raise _refuse(path, "residual_before_ln", False, "with original_ln_before it adds the residual stream twice")
    return (1.0 if before else 0.0), 1.0


def read_adapterhub_bottleneck(path: Path) -> BottleneckAdapter:
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    meta = read_json(folder / "adapter_config.json")
    config = meta.get("config") or {}
    if config.get("architecture", "bottleneck") not in (None, "bottleneck"):
        raise VlexportError(f"'{path}' is an AdapterHub {config.get('architecture')} adapter, not a bottleneck adapter")
    model_class = meta.get("model_class", "")
    if model_class in _VISION_CLASSES:
        part = "vision"
    elif model_class in _TEXT_CLASSES:
        part = "decoder"
    else:
        raise VlexportError(
            f"bottleneck adapter '{path}': model_class {model_class!r} is not a tower vlexport knows; LLaVA tasks "
            f"come as one adapter per tower, trained on {' or '.join(_VISION_CLASSES + _TEXT_CLASSES)}"
        )
    for option, bad, why in (
        ("use_gating", True, "its gate averages over the whole sequence, which a KV-cached decoder cannot do"),
        ("ln_before", True, "adapter-internal layer norms are not built yet"),
        ("ln_after", True, "adapter-internal layer norms are not built yet"),
        ("phm_layer", True, "PHM (hypercomplex) adapters are not built yet"),
    ):
        if config.get(option) == bad:
            raise _refuse(path, option, bad, why)
    scaling = config.get("scaling", 1.0)
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise _refuse(path, "scaling", scaling, "only a constant scale is supported")
    activation = _ACTIVATION.get(str(config.get("non_linearity", "relu")).lower())
    if activation is None:
        raise _refuse(path, "non_linearity", config.get("non_linearity"),
                      f"supported: {', '.join(sorted(_ACTIVATION))}")
    a, b = _mix(config, path)

    weights_file = next((folder / n for n in ("adapter.safetensors", "pytorch_adapter.bin") if (folder / n).exists()), None)
    if weights_file is None:
        raise VlexportError(f"bottleneck adapter directory '{path}' has no adapter.safetensors or pytorch_adapter.bin")
    state = read_tensors(weights_file)
    check_finite(state, weights_file)
    grouped: dict = {}
    for key, tensor in state.items():
        m = _KEY.search(key)
        if not m:
            raise VlexportError(
                f"bottleneck adapter '{weights_file}': tensor '{key}' is not a bottleneck adapter weight "
                "(expected ...layers.N.attention_adapters|output_adapters.adapters.NAME.adapter_down.0|adapter_up...)"
            )
        layer, where, _name, proj, leaf = m.groups()
        site = 0 if where == "attention" else 1
        grouped.setdefault((int(layer), site), {})[f"{proj}.{leaf}"] = tensor.float().numpy()
    weights = {}
    for (layer, site), t in grouped.items():
        try:
            down_w, down_b, up_w, up_b = t["down.0.weight"], t["down.0.bias"], t["up.weight"], t["up.bias"]
        except KeyError as e:
            raise VlexportError(f"bottleneck adapter '{weights_file}': layer {layer} lacks adapter tensor {e}") from None
        if up_w.shape != (down_w.shape[1], down_w.shape[0]):
            raise VlexportError(
                f"bottleneck adapter '{weights_file}': layer {layer} adapter_up.weight has shape {up_w.shape}, "
                f"expected {(down_w.shape[1], down_w.shape[0])} for its adapter_down.0.weight {down_w.shape}"
            )
        weights[(layer, site)] = (down_w, down_b, up_w, up_b)
    preset = "parbn" if config.get("is_parallel") else ("double_seqbn" if config.get("mh_adapter") else "seqbn")
    return BottleneckAdapter(path=path, weights_file=weights_file, config=config, part=part, weights=weights,
                             mix=(a, b, float(scaling)), activation=activation, preset=preset)

"""LoRA (incl. DoRA, rsLoRA, patterns, lora_bias, modules_to_save, trainable tokens): read and merge.

Merging follows PEFT's math (../shared/notes/adapter-formats.md), in fp32, driven by the keys present in the file,
not by target_modules.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VlexportError
from ..files import read_json, sha256_file
from .io import check_finite, peft_weights_file, read_tensors
from .keymap import PEFT_PREFIX, keeps_text_layer, normalize_key

# LoraConfig options whose non-default values we merge exactly.
SUPPORTED_OPTIONS = {
    "r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "lora_bias", "bias",
    "modules_to_save", "trainable_token_indices", "target_modules", "exclude_modules", "layers_to_transform",
    "layers_pattern", "lora_dropout", "init_lora_weights", "peft_type", "peft_version", "task_type",
    "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "fan_in_fan_out",
    "ensure_weight_tying", "megatron_core",
}
# init_lora_weights values that mutate the base weights during training (the base must be converted first).
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")


@dataclass
class LoraModule:
    module: str  # transformers 5 module name
    layer: str  # "linear" | "embedding" | "conv"
    A: object
    B: object
    scaling: float
    magnitude: object = None  # DoRA
    bias: object = None  # lora_B.bias (lora_bias=True)


@dataclass
class LoraAdapter:
    path: Path
    weights_file: Path
    format: str  # "peft" | "llava-repo"
    config: dict
    modules: list[LoraModule] = field(default_factory=list)
    replacements: dict = field(default_factory=dict)  # param name -> absolute value
    token_rows: dict = field(default_factory=dict)  # embedding param -> (indices, rows)
    source_keys: dict = field(default_factory=dict)  # normalized name -> key in the file, for messages
    extra_files: list = field(default_factory=list)  # e.g. the LLaVA repo's non_lora_trainables.bin
    kind: str = "lora"
    lora_alpha_given: float | None = None  # --lora-alpha, for a single file that does not record its alpha
    swappable: bool = False  # a named task's LoRA fed through LoRA slots (tasks.load_bank), not merged

    @property
    def nbytes(self) -> int:
        """A and B at fp32, as the LoRA slot pack holds them."""
        return sum(4 * (m.A.numel() + m.B.numel()) for m in self.modules)

    @property
    def sha256(self) -> str:
        """Of the weights file, or, with extra files, of every file's sha256 in order."""
        if not self.extra_files:
            return sha256_file(self.weights_file)
        import hashlib

        return hashlib.sha256("".join(sha256_file(f) for f in [self.weights_file, *self.extra_files]).encode()).hexdigest()

    def describe(self) -> dict:
        parts = sorted({_part(m.module) for m in self.modules} | {_part(k) for k in self.replacements}
                       | {_part(k) for k in self.token_rows})
        return {
            "kind": self.kind,
            "format": self.format,
            "path": str(self.path),
            "sha256": self.sha256,
            "modules": len(self.modules),
            "replaced_tensors": sorted(self.replacements),
            "trainable_tokens": {k: len(v[0]) for k, v in self.token_rows.items()},
            "dora": any(m.magnitude is not None for m in self.modules),
            "rslora": bool(self.config.get("use_rslora")),
            "ranks": sorted({int(m.A.shape[0]) for m in self.modules}),
            "parts": parts,
            "merged": not self.swappable,
            **({"slots": "lora"} if self.swappable else {}),
            **({"lora_alpha_given": self.lora_alpha_given} if self.lora_alpha_given is not None else {}),
        }

    def without_text_layers_from(self, num_layers: int) -> "LoraAdapter":
        """The same adapter without entries in decoder layers >= num_layers (for few-layer parity)."""
        return dataclasses.replace(
            self,
            modules=[m for m in self.modules if keeps_text_layer(m.module, num_layers)],
            replacements={k: v for k, v in self.replacements.items() if keeps_text_layer(k, num_layers)},
        )

    # -- validation ---------------------------------------------------------------------------------------------
    def validate(self, model) -> None:
        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        for m in self.modules:
            mod = modules.get(m.module)
            if mod is None:
                raise _unmapped(self, self.source_keys.get(m.module, m.module))
            weight = mod.weight
            if m.layer == "linear":
                want_a, want_b = (m.A.shape[0], weight.shape[1]), (weight.shape[0], m.A.shape[0])
            elif m.layer == "embedding":
                want_a, want_b = (m.A.shape[0], weight.shape[0]), (weight.shape[1], m.A.shape[0])
            else:
                want_a = (m.A.shape[0], weight.shape[1], *weight.shape[2:])
                want_b = (weight.shape[0], m.A.shape[0], 1, 1)
            for name, t, want in (("lora_A", m.A, want_a), ("lora_B", m.B, want_b)):
                if tuple(t.shape) != tuple(want):
                    raise _shape_error(self, f"{self.source_keys.get(m.module, m.module)} {name}", t.shape, want)
            if m.magnitude is not None and m.magnitude.numel() != (weight.shape[1] if m.layer == "embedding" else weight.shape[0]):
                raise _shape_error(self, f"{m.module}.lora_magnitude_vector", m.magnitude.shape, (weight.shape[0],))
        for name, t in self.replacements.items():
            if name not in params:
                raise _unmapped(self, self.source_keys.get(name, name))
            if tuple(t.shape) != tuple(params[name].shape):
                raise _shape_error(self, self.source_keys.get(name, name), t.shape, params[name].shape)
        for name, (idx, rows) in self.token_rows.items():
            if name not in params:
                raise _unmapped(self, name)
            p = params[name]
            if rows.shape[1] != p.shape[1] or max(idx) >= p.shape[0] or len(idx) != rows.shape[0]:
                raise _shape_error(self, f"{name} trainable tokens", rows.shape, (len(idx), p.shape[1]))

    # -- merge --------------------------------------------------------------------------------------------------
    def merge_into(self, model, on_module=None) -> None:
        """Fold the adapter into `model`'s fp32 weights: full replacements first, then deltas (PEFT's order).
        on_module(name) is called after each module is merged (the build's progress bar)."""
        import torch

        modules = dict(model.named_modules())
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.replacements.items():
                params[name].copy_(value.to(params[name].dtype))
            for name, (idx, rows) in self.token_rows.items():
                params[name][torch.tensor(idx)] = rows.to(params[name].dtype)
            for m in self.modules:
                mod = modules[m.module]
                W = mod.weight.detach().float()
                A, B = m.A.float(), m.B.float()
                if m.layer == "linear":
                    V = W + m.scaling * (B @ A)
                    if m.magnitude is not None:
                        V = V * (m.magnitude.float().view(-1) / V.norm(p=2, dim=1))[:, None]
                elif m.layer == "embedding":
                    V = W + m.scaling * (B @ A).T
                    if m.magnitude is not None:
                        V = V * (m.magnitude.float().view(-1) / V.norm(p=2, dim=0))[None, :]
                else:
                    V = W + m.scaling * (B.flatten(1) @ A.flatten(1)).view(W.shape)
                    if m.magnitude is not None:
                        norm = V.norm(p=2, dim=tuple(range(1, V.dim())))
                        V = V * (m.magnitude.float().view(-1) / norm).view(-1, *([1] * (V.dim() - 1)))
                mod.weight.copy_(V.to(mod.weight.dtype))
                if m.bias is not None:
                    delta = m.scaling * m.bias.float()
                    if mod.bias is None:
                        mod.bias = torch.nn.Parameter(delta.to(mod.weight.dtype))
                    else:
                        mod.bias.copy_((mod.bias.float() + delta).to(mod.bias.dtype))
                if on_module is not None:
                    on_module(m.module)

    # -- slots (swappable LoRA) -----------------------------------------------------------------------------------
    def slot_reason(self) -> str | None:
        """Why this LoRA cannot be fed through LoRA slots (lora_slots.py), so that its task gets merged copies of
        the parts it changes instead; None when it can."""
        from ..lora_slots import locate

        if self.replacements or self.token_rows:
            return "it replaces whole tensors (modules_to_save or trainable tokens)"
        for m in self.modules:
            if m.layer != "linear":
                return f"module '{m.module}' is a LoRA on an {m.layer} layer"
            if m.bias is not None:
                return f"module '{m.module}' trains a LoRA bias (lora_bias=True)"
            if locate(m.module) is None:
                return f"module '{m.module}' is not a linear a LoRA slot serves"
        return None

    def slot_groups(self, model) -> dict:
        """{part: {group: {"in", "out", "scale"}}} for the slot groups this LoRA feeds (scale: DoRA there)."""
        from ..lora_slots import locate

        modules = dict(model.named_modules())
        out: dict = {}
        for m in self.modules:
            part, group, _layer = locate(m.module)
            w = modules[m.module].weight
            spec = out.setdefault(part, {}).setdefault(group, {"in": int(w.shape[1]), "out": int(w.shape[0]),
                                                               "scale": False})
            spec["scale"] = spec["scale"] or m.magnitude is not None
        return out

    def slot_tensors(self, model, geometry: dict) -> dict:
        """This LoRA as LoRA slot inputs (lora_slots.py), one row: a = A^T, b = (scaling B)^T, each group's ranks
        zero-padded to its largest; DoRA's per-output scale m / ||W + s B A|| from the weights it sits on (the
        base graph's). Modules in layers the part does not run (CLIP layers past LLaVA's feature layer) change
        nothing downstream and are left out."""
        import numpy as np
        import torch

        from ..lora_slots import locate

        modules = dict(model.named_modules())
        placed: dict = {}
        for m in self.modules:
            part, group, layer = locate(m.module)
            g = (geometry.get(part) or {}).get(group)
            if g is not None and layer < g["layers"]:
                placed.setdefault((part, group), []).append((layer, m))
        out = {}
        for (part, group), entries in placed.items():
            g = geometry[part][group]
            rank = max(int(m.A.shape[0]) for _, m in entries)
            a = np.zeros((g["layers"], 1, g["in"], rank), np.float32)
            b = np.zeros((g["layers"], 1, rank, g["out"]), np.float32)
            scale = np.ones((g["layers"], 1, g["out"]), np.float32)
            for layer, m in entries:
                A, B = m.A.float(), m.B.float()
                r = A.shape[0]
                a[layer, 0, :, :r] = A.T.numpy()
                b[layer, 0, :r] = (m.scaling * B).T.numpy()
                if m.magnitude is not None:
                    with torch.no_grad():
                        W = modules[m.module].weight.detach().float()
                        norm = (W + m.scaling * (B @ A)).norm(p=2, dim=1)
                        scale[layer, 0] = (m.magnitude.float().view(-1) / norm).numpy()
            out[f"{part}_lora.{group}.a"], out[f"{part}_lora.{group}.b"] = a, b
            if g["scale"]:
                out[f"{part}_lora.{group}.scale"] = scale
        return out

    # -- PyTorch reference ----------------------------------------------------------------------------------------
    def write_peft_dir(self, out: Path) -> Path:
        """The same adapter as a PEFT directory in transformers 5 key layout, so PEFT itself can apply it unmerged."""
        import json

        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        state = {}
        for m in self.modules:
            base = PEFT_PREFIX + m.module
            if m.layer == "embedding":
                state[base + ".lora_embedding_A"] = m.A
                state[base + ".lora_embedding_B"] = m.B
            else:
                state[base + ".lora_A.weight"] = m.A
                state[base + ".lora_B.weight"] = m.B
            if m.magnitude is not None:
                state[base + ".lora_magnitude_vector"] = m.magnitude
            if m.bias is not None:
                state[base + ".lora_B.bias"] = m.bias
        lora_modules = {m.module for m in self.modules}
        for name, value in self.replacements.items():
            owner, leaf = name.rsplit(".", 1)
            key = f"{owner}.base_layer.{leaf}" if owner in lora_modules else name
            state[PEFT_PREFIX + key] = value
        for name, (idx, rows) in self.token_rows.items():
            state[PEFT_PREFIX + name.rsplit(".", 1)[0] + ".token_adapter.trainable_tokens_delta"] = rows
        save_file({k: v.contiguous() for k, v in state.items()}, str(out / "adapter_model.safetensors"))
        config = dict(self.config)
        config["target_modules"] = sorted(lora_modules) or None
        config["base_model_name_or_path"] = None
        for opt in ("layers_to_transform", "layers_pattern", "exclude_modules"):
            config[opt] = None
        (out / "adapter_config.json").write_text(json.dumps(config))
        return out


def _part(name: str) -> str:
    from .keymap import part_of

    return part_of(name)


def _unmapped(adapter: LoraAdapter, key: str) -> VlexportError:
    return VlexportError(
        f"adapter '{adapter.path}': tensor '{key}' maps to no module of the base model; the adapter was trained for "
        "a different architecture or layout: check that --base is the model it was trained on"
    )


def _shape_error(adapter, key, got, want) -> VlexportError:
    return VlexportError(
        f"adapter '{adapter.path}': tensor '{key}' has shape {tuple(got)} but the base model needs "
        f"{tuple(want)}; the adapter was trained on a different model size: check --base"
    )


def _check_options(config: dict, source: Path) -> None:
    from peft import LoraConfig

    if config.get("peft_type", "LORA") != "LORA":
        raise VlexportError(f"'{source}' is a {config.get('peft_type')} adapter, not LoRA")
    init = str(config.get("init_lora_weights", True)).lower()
    if any(init.startswith(x) for x in _BASE_MUTATING_INITS):
        raise VlexportError(
            f"adapter '{source}': option init_lora_weights={config['init_lora_weights']!r} changes the base weights "
            "during training, so this adapter cannot be merged onto the original base; convert it to a plain LoRA "
            "first (PEFT: save_pretrained(..., path_initial_model_for_weight_conversion=...))"
        )
    if config.get("fan_in_fan_out"):
        raise VlexportError(
            f"adapter '{source}': option fan_in_fan_out=true is for GPT-2 style Conv1D layers, which LLaVA does not have"
        )
    defaults = LoraConfig()
    for key, value in config.items():
        if key in SUPPORTED_OPTIONS or not hasattr(defaults, key):
            continue
        default = getattr(defaults, key)
        if value in (None, {}, [], False) and default in (None, {}, [], False):
            continue
        if value != default:
            raise VlexportError(
                f"adapter '{source}': LoRA option {key}={value!r} is not supported by vlexport; retrain without it "
                "or merge it in PEFT first (merge_and_unload) and pass the merged model as --base"
            )


def _pattern_value(pattern: dict, module: str, default):
    """PEFT's lookup: the first key K with (.*\\.)?(K)$ matching the module name, else the exact name, else default."""
    from peft.utils.other import get_pattern_key

    if not pattern:
        return default
    return pattern.get(get_pattern_key(list(pattern), module), default)


def _scaling(config: dict, module: str, r: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def rewrite_patterns(config: dict, trained_names: dict[str, str]) -> dict:
    """The config with rank_pattern/alpha_pattern (and trainable_token_indices) keys rewritten to transformers 5
    module names, exactly as the state-dict keys are (normalize_key), so that PEFT and the merge resolve them
    against today's names as PEFT resolved them against the names at training time.

    trained_names maps each module's transformers 5 name to its name at training time (from the file's keys). A
    module whose pattern resolves differently after the key rewrite (a suffix pattern in the old layout, e.g.
    'vision_model.encoder.layers.0.mlp.fc1') gets an explicit full-name entry, first, with its training-time value."""
    out = dict(config)
    for option, default in (("alpha_pattern", config.get("lora_alpha", 8)), ("rank_pattern", config.get("r", 8))):
        pattern = config.get(option) or {}
        if not pattern:
            continue
        rewritten = {normalize_key(k): v for k, v in pattern.items()}
        explicit = {}
        for name, trained in sorted(trained_names.items()):
            want = _pattern_value(pattern, trained, default)
            if _pattern_value(rewritten, name, default) != want:
                explicit[re.escape(name)] = want
        out[option] = {**explicit, **rewritten}
    tokens = config.get("trainable_token_indices")
    if isinstance(tokens, dict):
        out["trainable_token_indices"] = {normalize_key(k): v for k, v in tokens.items()}
    return out


_ADAPTER_NAME = re.compile(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector|modules_to_save)\.default\b")


def parse_peft_state(state: dict, config: dict, adapter: LoraAdapter) -> None:
    """Fill `adapter` from a PEFT-style state dict with keys in any known layout. adapter.config becomes `config`
    with its pattern keys rewritten to transformers 5 names (rewrite_patterns)."""
    entries: dict[str, dict] = {}
    raw_keys: dict[str, dict] = {}  # module -> slot -> key in the file, for messages
    trained_names: dict[str, str] = {}  # module -> its name at training time
    for raw_key, tensor in state.items():
        key = _ADAPTER_NAME.sub(lambda m: "." + m.group(1), raw_key).replace(".modules_to_save.", ".")
        name = normalize_key(key)
        for suffix, slot in (
            (".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_B.bias", "bias"),
            (".lora_embedding_A", "eA"), (".lora_embedding_B", "eB"),
            (".lora_magnitude_vector.weight", "m"), (".lora_magnitude_vector", "m"),
            (".token_adapter.trainable_tokens_delta", "tokens"),
        ):
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                entries.setdefault(module, {})[slot] = tensor
                raw_keys.setdefault(module, {})[slot] = raw_key
                adapter.source_keys[module] = raw_key
                trained = key.removeprefix(PEFT_PREFIX)
                trained_names[module] = trained[: -len(suffix)] if trained.endswith(suffix) else module
                break
        else:
            name = name.replace(".base_layer.", ".")
            adapter.replacements[name] = tensor
            adapter.source_keys[name] = raw_key

    config = rewrite_patterns(config, {m: t for m, t in trained_names.items() if set(entries[m]) != {"tokens"}})
    adapter.config = config
    token_indices = config.get("trainable_token_indices") or {}
    for module, e in entries.items():
        if "tokens" in e:
            idx = token_indices if isinstance(token_indices, list) else _lookup(token_indices, module)
            if idx is None:
                raise VlexportError(
                    f"adapter '{adapter.path}': '{adapter.source_keys[module]}' has trainable token rows but "
                    "adapter_config.json has no trainable_token_indices for it"
                )
            adapter.token_rows[module + ".weight"] = (list(idx), e["tokens"])
            if set(e) == {"tokens"}:
                continue
        if "eA" in e or "eB" in e:
            A, B, layer, a_slot, b_slot = e.get("eA"), e.get("eB"), "embedding", "eA", "eB"
        else:
            A, B, a_slot, b_slot = e.get("A"), e.get("B"), "A", "B"
            layer = "conv" if A is not None and A.dim() == 4 else "linear"
        if A is None or B is None:
            missing = "lora_A" if A is None else "lora_B"
            raise VlexportError(
                f"adapter '{adapter.path}': module '{adapter.source_keys[module]}' has no {missing} tensor; the file is incomplete"
            )
        a_key, b_key = raw_keys[module][a_slot], raw_keys[module][b_slot]
        if A.dim() < 2 or B.dim() < 2 or A.shape[0] != B.shape[1]:
            raise VlexportError(
                f"adapter '{adapter.path}': tensors '{a_key}' {tuple(A.shape)} and '{b_key}' {tuple(B.shape)} disagree "
                f"on the LoRA rank ({A.shape[0] if A.dim() else '?'} vs {B.shape[1] if B.dim() > 1 else '?'}): "
                "lora_A is [r, in] and lora_B [out, r]; the file is corrupt or mixes two adapters: export it again"
            )
        r = A.shape[0]
        want_r = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", r))
        if want_r != r:
            raise VlexportError(
                f"adapter '{adapter.path}': tensor '{a_key}' has rank {r} but adapter_config.json gives this module "
                f"r={want_r} (r / rank_pattern); the config does not belong to these weights: use the training "
                "run's adapter_config.json"
            )
        adapter.modules.append(
            LoraModule(module, layer, A, B, _scaling(config, module, r), magnitude=e.get("m"), bias=e.get("bias"))
        )


def _lookup(patterns: dict, module: str):
    for key, idx in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return idx
    return None


def read_peft_lora(path: Path, weights: Path | None = None) -> LoraAdapter:
    """A PEFT LoRA directory, or a weights file with adapter_config.json beside it."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config_path = folder / "adapter_config.json"
    if weights is None:
        weights = peft_weights_file(path)
    if not config_path.exists():
        raise VlexportError(
            f"LoRA file '{weights}' has no adapter_config.json beside it: LoRA alpha cannot be read from the tensors; "
            "put the training run's adapter_config.json next to it"
        )
    config = read_json(config_path)
    _check_options(config, config_path)
    state = read_tensors(weights)
    check_finite(state, weights)
    adapter = LoraAdapter(path=path, weights_file=Path(weights), format="peft", config=config)
    parse_peft_state(state, config, adapter)
    if not adapter.modules and not adapter.replacements and not adapter.token_rows:
        raise VlexportError(f"adapter '{weights}' contains no LoRA tensors")
    return adapter


def read_llava_repo_lora(path: Path) -> LoraAdapter:
    """The original LLaVA repo's LoRA: adapter_model.bin + non_lora_trainables.bin (the projector, absolute)."""
    adapter = read_peft_lora(path)
    adapter.format = "llava-repo"
    extra_file = Path(path) / "non_lora_trainables.bin"
    extra = read_tensors(extra_file)
    check_finite(extra, extra_file)
    adapter.extra_files.append(extra_file)
    for key, value in extra.items():
        name = normalize_key(key)
        adapter.replacements[name] = value
        adapter.source_keys[name] = f"{extra_file.name}:{key}"
    return adapter

"""PEFT's other mergeable methods (AdaLoRA, VeRA, IA3, LoHa, LoKr, OFT, BOFT, ...): read, check and merge through
PEFT itself.

vlexport never re-implements these methods' math: the file's keys are rewritten to transformers 5's module names
(keymap.normalize_key, as for LoRA), the config is pinned to exactly the modules the file holds, and PEFT's own
layer `merge` folds each module into the fp32 weights, one module at a time (a module of an fp16 model is lifted to
fp32 for its merge and cast back once). The PyTorch reference loads the same rewritten directory with PEFT,
unmerged (backends/torch_reference.py).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VlexportError
from ..files import read_json, sha256_file
from .io import check_finite, peft_weights_file, read_tensors
from .keymap import PEFT_PREFIX, keeps_text_layer, normalize_key, part_of

# Every type whose merge into LLaVA's Linear layers (and Conv2d/Embedding where the method has them) is tested
# against PEFT's own merge_and_unload and unmerged forward (tests/test_peft_methods.py), with its display name.
SUPPORTED_TYPES = {
    "ADALORA": "AdaLoRA", "VERA": "VeRA", "IA3": "IA3", "LOHA": "LoHa", "LOKR": "LoKr", "OFT": "OFT",
    "BOFT": "BOFT", "FOURIERFT": "FourierFT", "C3A": "C3A", "HRA": "HRA", "RANDLORA": "RandLoRA", "MISS": "MiSS",
    "SHIRA": "SHiRA", "VBLORA": "VBLoRA", "ROAD": "RoAd", "DELORA": "DeLoRA", "GLORA": "GLoRA",
    "GRALORA": "GraLoRA", "HIRA": "HiRA", "PVERA": "PVeRA", "WAVEFT": "WaveFT", "TINYLORA": "TinyLoRA",
}
# Types PEFT has but that are not merged: why, for the refusal.
UNSUPPORTED_TYPES = {
    "LILY": "PEFT cannot merge Lily adapters",
    "FROD": "PEFT's FRoD fails on LLaVA's layers of different widths",
    "SHADOW": "a shadow network is a second model, not a change of the base's weights",
    "ADAMSS": "AdaMSS needs scikit-learn at load time and is not tested with vlexport",
    "OSF": "OSF rewrites the base weights as an SVD at load time",
    "PSOFT": "PSoFT rewrites the base weights as an SVD at load time",
    "PEANUT": "not tested with vlexport yet",
    "SUPERTUNING": "not tested with vlexport yet",
    "DEFT": "not tested with vlexport yet",
    "UNILORA": "not tested with vlexport yet",
    "LN_TUNING": "not tested with vlexport yet",
}
# Options that change the base during training, or that PEFT cannot merge exactly: refused by name with the reason.
_REFUSED_OPTIONS = {
    "fan_in_fan_out": "it is for GPT-2 style Conv1D layers, which LLaVA does not have",
    "target_parameters": "it adapts nn.Parameters directly (MoE experts), which vlexport does not merge yet",
    "layer_replication": "it duplicates base layers, so the merged model would not have the base's shape",
    "megatron_config": "Megatron tensor-parallel layers are not LLaVA's layers",
    "loftq_config": "LoftQ changes the base weights (quantized) during training",
    "use_dora": "PEFT has no DoRA for this method",
    "trainable_token_indices": "trainable tokens are read with PEFT LoRA adapters only",
}
# init_*_weights values that mutate the base weights during training.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq", "eva")
# Types whose unmerged forward is exactly a LoRA slot (lora_slots.py), with each module's own tensors (leaf names
# after the module's name) and the tensors shared by all modules: a named task of these is fed at run time.
SLOT_TENSORS = {"IA3": ({"ia3_l"}, set()), "VERA": ({"vera_lambda_b", "vera_lambda_d"}, {"vera_A", "vera_B"}),
                "ADALORA": ({"lora_A", "lora_B", "lora_E"}, set())}
_SLOT_ADAPTER = "vlexport_slot"  # the adapter name PEFT's layers hold the weights under while they are read


@dataclass
class PeftMethodAdapter:
    path: Path
    weights_file: Path
    peft_type: str  # PEFT's name, e.g. "IA3"
    config: dict  # pinned to transformers 5 module names (to_peft_config)
    state: dict  # key (transformers 5 layout, PEFT's base_model.model. prefix) -> tensor
    modules: list[str] = field(default_factory=list)  # transformers 5 names of the adapted modules
    source_keys: dict = field(default_factory=dict)  # rewritten key -> key in the file, for messages
    kind: str = "peft"
    swappable: bool = False  # a named task fed through LoRA slots (tasks.load_bank), not merged
    # (id of the model, {module: slot form}) read once from PEFT's layers (slot_forms)
    _slot_cache: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def sha256(self) -> str:
        return sha256_file(self.weights_file)

    @property
    def format(self) -> str:
        return f"peft-{self.peft_type.lower()}"

    @property
    def type_name(self) -> str:
        return SUPPORTED_TYPES[self.peft_type]

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "type": self.type_name,
            "format": self.format,
            "path": str(self.path),
            "sha256": self.sha256,
            "modules": len(self.modules),
            "targets": sorted({m.rsplit(".", 1)[-1] for m in self.modules}),
            "parameters": int(sum(t.numel() for t in self.state.values())),
            "bytes": int(sum(t.numel() * t.element_size() for t in self.state.values())),
            # every module a tensor belongs to: modules_to_save (e.g. lm_head) changes its part though it is no target
            "parts": sorted({part_of(m) for m in (_module_of(k, self.peft_type) for k in self.state) if m}),
            "ranks": self._ranks(),
            "merged": not self.swappable,
            **({"slots": "lora"} if self.swappable else {}),
        }

    # -- slots (swappable forms) ----------------------------------------------------------------------------------
    @property
    def additive(self) -> bool:
        """Whether the slot form only adds x a b (VeRA, AdaLoRA), so that it sums with another task adapter's in
        any order; IA3 multiplies."""
        return self.peft_type != "IA3"

    def _own_tensors(self, module: str) -> dict:
        """{leaf name: tensor} of one module's own tensors."""
        head = f"{PEFT_PREFIX}{module}."
        return {k[len(head):]: v for k, v in self.state.items() if k.startswith(head)}

    def _ranks(self) -> list[int]:
        """The LoRA slot ranks this adapter feeds (IA3: none, it feeds scales only)."""
        if self.peft_type == "VERA":
            return sorted({int(t.shape[0]) for k, t in self.state.items() if k.endswith(".vera_lambda_d")})
        if self.peft_type == "ADALORA":
            return sorted({int(t.shape[0]) for k, t in self.state.items() if k.endswith(".lora_A")})
        return []

    @property
    def nbytes(self) -> int:
        """The task's slot tensors at fp32: IA3's vectors; a and b of each module for VeRA (with the shared A's full
        width as `in`, an upper bound) and AdaLoRA."""
        total = 0
        for m in self.modules:
            own = self._own_tensors(m)
            if self.peft_type == "IA3":
                total += own["ia3_l"].numel()
            elif self.peft_type == "VERA":
                width = next((int(t.shape[1]) for k, t in self.state.items() if k.endswith("vera_A")), 0)
                total += own["vera_lambda_d"].numel() * (width + own["vera_lambda_b"].numel())
            else:
                total += own["lora_A"].numel() + own["lora_B"].numel()
        return 4 * total

    def slot_reason(self) -> str | None:
        """Why this adapter cannot be fed through LoRA slots (lora_slots.py), so that its task gets merged copies of
        the parts it changes instead; None when it can (IA3, VeRA, AdaLoRA on linears a slot serves)."""
        from ..lora_slots import locate

        if self.peft_type not in SLOT_TENSORS:
            return f"PEFT's {self.type_name} has no exact LoRA-slot form"
        own, shared = SLOT_TENSORS[self.peft_type]
        for key in self.state:
            module = _module_of(key, self.peft_type)
            leaf = key.rsplit(".", 1)[-1] if module is None else key[len(PEFT_PREFIX) + len(module) + 1:]
            if (module is None and leaf not in shared) or (module is not None and leaf not in own):
                return (f"it also trains '{self.source_keys.get(key, key)}' (modules_to_save or a bias), which "
                        "replaces a tensor of the base")
        for m in self.modules:
            if locate(m) is None:
                return f"module '{m}' is not a linear a LoRA slot serves"
        return None  # (VeRA saved without its projection: PEFT regenerates A and B, and slot_forms reads PEFT's)

    def slot_forms(self, model) -> dict:
        """{module: (a [in, r] or None, b [r, out] or None, in_scale [in] or None, out_scale [out] or None)}, fp32
        numpy: each module's unmerged forward as a LoRA slot, read from PEFT's own layers injected into `model` (and
        unloaded again, leaving it as it was), following PEFT 0.21's forwards exactly:
          IA3     feedforward: base(x * l) -> in_scale = l; otherwise base(x) * l, bias included -> out_scale = l
          VeRA    + lambda_b * ((lambda_d * (x A^T)) B^T), A and B the shared matrices sliced to the layer's in/out
                  -> a = A^T diag(lambda_d), b = B^T diag(lambda_b)
          AdaLoRA + (x (A * E)^T B^T) * scaling / (ranknum + 1e-5), PEFT's ranknum after the final rank allocation
                  -> a = (A * E)^T, b = B^T * scaling / (ranknum + 1e-5)"""
        if self._slot_cache is not None and self._slot_cache[0] == id(model):
            return self._slot_cache[1]
        import tempfile

        import torch
        from peft import PeftModel
        from torch import nn

        with tempfile.TemporaryDirectory() as tmp:
            try:
                peft_model = PeftModel.from_pretrained(model, str(self.write_peft_dir(Path(tmp) / "adapter")),
                                                       adapter_name=_SLOT_ADAPTER)
            except RuntimeError as e:  # load_state_dict's size mismatch, with the tensor's name
                raise VlexportError(
                    f"adapter '{self.path}': PEFT cannot load this {self.type_name} adapter onto the base "
                    f"({str(e).strip().splitlines()[-1].strip()}); the adapter was trained on a different model "
                    "size: check --base") from None
        forms = {}
        try:
            layers = dict(peft_model.base_model.model.named_modules())
            with torch.no_grad():
                for m in self.modules:
                    layer = layers[m]
                    if not isinstance(layer.get_base_layer(), nn.Linear):
                        raise VlexportError(
                            f"adapter '{self.path}': module '{m}' is a {type(layer.get_base_layer()).__name__}, "
                            "not a linear, so no LoRA slot serves it; build with --lora-mode merged")
                    forms[m] = _slot_form(self.peft_type, layer)
        finally:
            peft_model.base_model.unload()  # PEFT's layers replaced by their (untouched) base layers, in place
        self._slot_cache = (id(model), forms)
        return forms

    def slot_groups(self, model) -> dict:
        """{part: {group: {"in", "out", "scale", "in_scale", "out_scale"}}} for the slot groups this adapter feeds."""
        from ..lora_slots import locate

        modules = dict(model.named_modules())
        out: dict = {}
        for m, (_a, _b, s_in, s_out) in self.slot_forms(model).items():
            part, group, _layer = locate(m)
            w = modules[m].weight
            spec = out.setdefault(part, {}).setdefault(group, {"in": int(w.shape[1]), "out": int(w.shape[0]),
                                                               "scale": False, "in_scale": False, "out_scale": False})
            spec["in_scale"] = spec["in_scale"] or s_in is not None
            spec["out_scale"] = spec["out_scale"] or s_out is not None
        return out

    def slot_tensors(self, model, geometry: dict) -> dict:
        """This adapter as LoRA slot inputs (lora_slots.py), one row: a and b (each group's ranks zero-padded to its
        largest) where it adds a product, in_scale/out_scale where it scales; the fields it leaves out are "no
        adapter" at run time. Modules in layers the part does not run (CLIP layers past LLaVA's feature layer)
        change nothing downstream and are left out."""
        import numpy as np

        from ..lora_slots import locate

        placed: dict = {}
        for m, form in self.slot_forms(model).items():
            part, group, layer = locate(m)
            g = (geometry.get(part) or {}).get(group)
            if g is not None and layer < g["layers"]:
                placed.setdefault((part, group), []).append((layer, form))
        out = {}
        for (part, group), entries in placed.items():
            g, name = geometry[part][group], f"{part}_lora.{group}"
            ranks = [a.shape[1] for _, (a, _b, _i, _o) in entries if a is not None]
            if ranks:
                a_all = np.zeros((g["layers"], 1, g["in"], max(ranks)), np.float32)
                b_all = np.zeros((g["layers"], 1, max(ranks), g["out"]), np.float32)
                for layer, (a, b, _i, _o) in entries:
                    if a is not None:
                        a_all[layer, 0, :, : a.shape[1]], b_all[layer, 0, : a.shape[1]] = a, b
                out[f"{name}.a"], out[f"{name}.b"] = a_all, b_all
            for field_name, index, width in (("in_scale", 2, g["in"]), ("out_scale", 3, g["out"])):
                if any(form[index] is not None for _, form in entries):
                    values = np.ones((g["layers"], 1, width), np.float32)
                    for layer, form in entries:
                        if form[index] is not None:
                            values[layer, 0] = form[index]
                    out[f"{name}.{field_name}"] = values
        return out

    def without_text_layers_from(self, num_layers: int) -> "PeftMethodAdapter":
        """The same adapter without modules in decoder layers >= num_layers (for few-layer parity)."""
        keep = [m for m in self.modules if keeps_text_layer(m, num_layers)]
        dropped = set(self.modules) - set(keep)
        state = {k: v for k, v in self.state.items() if _module_of(k, self.peft_type) not in dropped}
        return dataclasses.replace(self, modules=keep, state=state, config=_pin_targets(self.config, keep))

    # -- validation ---------------------------------------------------------------------------------------------
    def validate(self, model) -> None:
        """Every module exists, and every tensor has the shape PEFT gives that module on this base. The shapes
        come from PEFT's own layers built on a meta-device copy of the model (no memory, no weights)."""
        import torch

        modules = dict(model.named_modules())
        for m in self.modules:
            if m not in modules:
                raise _unmapped(self, self._source(m))
        peft_config = self.peft_config()
        if self.peft_type == "ADALORA":
            peft_config.rank_pattern = None  # PEFT prunes by masks, which meta tensors cannot; _adalora_ranks does it
        config = getattr(model, "config", None)
        try:
            with torch.device("meta"):
                skeleton = type(model)(config)
            expected = _expected_shapes(skeleton, peft_config)
        except NotImplementedError:
            # A method whose init needs real values (SHiRA draws its sparse positions): PEFT checks the shapes when
            # it loads the tensors, at the start of the merge (merge_into names the tensor).
            return
        except (ValueError, TypeError, RuntimeError) as e:
            raise VlexportError(
                f"adapter '{self.path}': PEFT cannot apply this {self.type_name} adapter to the base "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check that --base is the model "
                "it was trained on"
            ) from None
        if self.peft_type == "ADALORA":
            _adalora_ranks(expected, self.config.get("rank_pattern"))
        for key, t in self.state.items():
            want = expected.get(key)
            if want is None:
                raise _unmapped(self, self.source_keys.get(key, key))
            if tuple(t.shape) != tuple(want):
                raise VlexportError(
                    f"adapter '{self.path}': tensor '{self.source_keys.get(key, key)}' has shape {tuple(t.shape)} but "
                    f"PEFT's {self.type_name} layer on this base needs {tuple(want)}; the adapter was trained on a "
                    "different model size: check --base"
                )
        missing = sorted(set(expected) - set(self.state))
        if missing:
            raise VlexportError(
                f"adapter '{self.path}': {len(missing)} tensor(s) PEFT needs are not in '{self.weights_file.name}', "
                f"e.g. '{missing[0]}'; the file is incomplete: save the adapter again with save_pretrained"
            )

    def _source(self, module: str) -> str:
        return next((self.source_keys[k] for k in self.state if _module_of(k, self.peft_type) == module), module)

    # -- PEFT -----------------------------------------------------------------------------------------------------
    def peft_config(self):
        return _config_object(self.config)

    def write_peft_dir(self, out: Path) -> Path:
        """The adapter as a PEFT directory in transformers 5 layout, targeting exactly its modules."""
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state.items()}, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps(self.config))
        return out

    def merge_into(self, model, on_module=None) -> None:
        """PEFT's own merge of each adapted module, in fp32: PEFT injects its layers, each layer's merge folds it into
        its base layer (lifted to fp32 first when the model is fp16, cast back once), then PEFT unloads its layers."""
        import tempfile

        import torch
        from peft import PeftModel
        from peft.tuners.tuners_utils import BaseTunerLayer

        with tempfile.TemporaryDirectory() as tmp:
            try:
                peft_model = PeftModel.from_pretrained(model, str(self.write_peft_dir(Path(tmp) / "adapter")),
                                                       adapter_name="vlexport")
            except RuntimeError as e:  # load_state_dict's size mismatch, with the tensor's name
                raise VlexportError(
                    f"adapter '{self.path}': PEFT cannot load this {self.type_name} adapter onto the base "
                    f"({str(e).strip().splitlines()[-1].strip()}); the adapter was trained on a different model size: "
                    "check --base") from None
        with torch.no_grad():
            for name, layer in list(peft_model.base_model.model.named_modules()):
                if not isinstance(layer, BaseTunerLayer) or layer.merged:
                    continue
                base = layer.get_base_layer()
                dtype = base.weight.dtype
                if dtype != torch.float32:
                    layer.float()  # the base layer and this module's adapter tensors, for the merge only
                layer.merge(safe_merge=True)
                if dtype != torch.float32:
                    base.to(dtype)
                if on_module is not None:
                    on_module(name)
        peft_model.base_model.unload()  # replaces PEFT's layers with their (now merged) base layers, in place


def _slot_form(peft_type: str, layer) -> tuple:
    """(a, b, in_scale, out_scale) of one PEFT layer (PeftMethodAdapter.slot_forms), fp32 numpy or None."""
    name = _SLOT_ADAPTER
    if peft_type == "IA3":
        scale = layer.ia3_l[name].detach().float().flatten().numpy()
        return (None, None, scale, None) if layer.is_feedforward else (None, None, None, scale)
    if peft_type == "VERA":
        A = layer.vera_A[name][:, : layer.in_features].float()  # the shared [r, max in] and [max out, r], sliced
        B = layer.vera_B[name][: layer.out_features, :].float()
        lambda_d, lambda_b = layer.vera_lambda_d[name].float(), layer.vera_lambda_b[name].float()
        return (A.T * lambda_d[None, :]).numpy(), (B * lambda_b[:, None]).T.numpy(), None, None
    A, B, E = layer.lora_A[name].float(), layer.lora_B[name].float(), layer.lora_E[name].float()
    factor = float(layer.scaling[name]) / (float(layer.ranknum[name]) + 1e-5)
    return (A * E).T.numpy(), (B * factor).T.numpy(), None, None


def _config_object(config: dict):
    """PEFT's config object for a config dict; keys this PEFT does not know (a newer PEFT's) are dropped, as PEFT's
    own from_pretrained drops them."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cls = PEFT_TYPE_TO_CONFIG_MAPPING[config["peft_type"]]
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in config.items() if k in known and k not in ("peft_type", "peft_version")})


def _module_of(key: str, peft_type: str) -> str | None:
    """The transformers 5 module a rewritten key belongs to, or None for a tensor shared by all modules
    (VeRA's vera_A/vera_B, VBLoRA's vector bank)."""
    if not key.startswith(PEFT_PREFIX):
        return None
    name = key[len(PEFT_PREFIX):]
    prefix = _tuner_prefix(peft_type)
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.startswith(prefix) or p in ("modules_to_save", "base_layer"):
            return ".".join(parts[:i]) or None
    return name.rsplit(".", 1)[0]


def _tuner_prefix(peft_type: str) -> str:
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    prefix = PEFT_TYPE_TO_TUNER_MAPPING[peft_type].prefix
    return "lora_" if peft_type == "ADALORA" else prefix.split("lambda_")[0]  # VeRA's "vera_lambda_" also owns vera_A


def _expected_shapes(skeleton, peft_config) -> dict:
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    peft_model = PeftModel(skeleton, peft_config, adapter_name="default", low_cpu_mem_usage=True)
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model, adapter_name="default").items()}


def _adalora_ranks(expected: dict, rank_pattern: dict | None) -> None:
    """AdaLoRA's saved tensors keep only the ranks its final allocation kept (rank_pattern masks)."""
    for name, mask in (rank_pattern or {}).items():
        module = name.rsplit(".", 1)[0]  # "...q_proj.lora_E" -> "...q_proj"
        r = int(sum(mask))
        for leaf, pick in (("lora_A", lambda s: (r, *s[1:])), ("lora_E", lambda s: (r, *s[1:])),
                           ("lora_B", lambda s: (s[0], r))):
            key = f"{PEFT_PREFIX}{module}.{leaf}"
            if key in expected:
                expected[key] = pick(expected[key])


def _unmapped(adapter: PeftMethodAdapter, key: str) -> VlexportError:
    return VlexportError(
        f"adapter '{adapter.path}': tensor '{key}' maps to no module of the base model; the adapter was trained for "
        "a different architecture or layout: check that --base is the model it was trained on"
    )


def _check_options(config: dict, source: Path, peft_type: str) -> None:
    from peft import PeftConfig

    name = SUPPORTED_TYPES[peft_type]
    defaults = PeftConfig.from_peft_type(peft_type=peft_type, **({"total_step": 1} if peft_type == "ADALORA" else {}))
    for option, why in _REFUSED_OPTIONS.items():
        value = config.get(option)
        if value in (None, False, {}, [], "") or value == getattr(defaults, option, None):
            continue
        raise VlexportError(f"adapter '{source}': {name} option {option}={value!r} is not supported: {why}; "
                            "retrain without it, or merge it in PEFT first (merge_and_unload) and pass the merged model as --base")
    for option in ("init_lora_weights", "init_weights"):
        value = str(config.get(option, "")).lower()
        if any(value.startswith(x) for x in _BASE_MUTATING_INITS):
            raise VlexportError(
                f"adapter '{source}': {name} option {option}={config[option]!r} changes the base weights during "
                "training, so this adapter cannot be merged onto the original base; convert it first")


def _trained_modules(state: dict, peft_type: str) -> dict[str, str]:
    """{transformers 5 module name: its name at training time} from the file's keys."""
    prefix = _tuner_prefix(peft_type)
    out = {}
    for key in state:
        trained = key.removeprefix(PEFT_PREFIX)
        parts = trained.split(".")
        for i, p in enumerate(parts):
            if p.startswith(prefix) and i > 0:
                module = ".".join(parts[:i])
                if key.startswith(PEFT_PREFIX):
                    out[normalize_key(module)] = module
                break
    return out


def _pin_targets(config: dict, modules: list[str]) -> dict:
    out = dict(config)
    out["target_modules"] = sorted(modules)
    if out.get("peft_type") == "IA3":
        ff = set(config.get("feedforward_modules") or [])
        out["feedforward_modules"] = sorted(m for m in modules if m in ff)
    return out


def to_peft_config(config: dict, trained: dict[str, str], peft_type: str) -> dict:
    """The config with its targets pinned to exactly the modules in the file (transformers 5 names), and every
    per-module option resolved as PEFT resolved it against the training-time names."""
    out = dict(config)
    for option in ("layers_to_transform", "layers_pattern", "exclude_modules", "base_model_name_or_path", "revision"):
        if option in out:
            out[option] = None
    out["inference_mode"] = True
    if peft_type == "IA3":
        from peft.tuners.ia3.model import IA3Model

        cfg = _config_object({**config, "peft_type": "IA3"})
        out["feedforward_modules"] = sorted(m for m, t in trained.items() if IA3Model._check_target_module_feedforward(cfg, t))
    for option in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(option) or {}
        if not pattern or peft_type == "ADALORA":
            continue
        # Resolved per module against the training-time name (PEFT's lookup), written as exact names; a module no
        # pattern matches keeps the config's own value.
        from peft.utils.other import get_pattern_key

        out[option] = {re.escape(m): pattern[get_pattern_key(list(pattern), t)] for m, t in sorted(trained.items())
                       if get_pattern_key(list(pattern), t) in pattern}
    if peft_type == "ADALORA" and config.get("rank_pattern"):
        out["rank_pattern"] = {normalize_key(k): v for k, v in config["rank_pattern"].items()}
    return _pin_targets(out, sorted(trained))


def read_peft_method(path: Path, peft_type: str) -> PeftMethodAdapter:
    """A PEFT adapter directory (or weights file with adapter_config.json beside it) of a SUPPORTED_TYPES type."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if peft_type not in SUPPORTED_TYPES:
        why = UNSUPPORTED_TYPES.get(peft_type, "this PEFT type is not merged by vlexport")
        raise VlexportError(f"'{path}' is a PEFT {peft_type} adapter, which vlexport does not read ({why}); supported: "
                            f"LoRA, BEFT, prefix tuning, {', '.join(SUPPORTED_TYPES.values())}")
    weights = peft_weights_file(path)
    config = read_json(folder / "adapter_config.json")
    _check_options(config, folder / "adapter_config.json", peft_type)
    raw = read_tensors(weights)
    # SHiRA stores the positions of its sparse entries as integers; every other tensor must be a finite float.
    check_finite({k: v for k, v in raw.items() if not (peft_type == "SHIRA" and k.endswith("shira_indices"))}, weights)
    state, source_keys = {}, {}
    for key, tensor in raw.items():
        # Old layouts: the module path after PEFT's prefix; tensors shared by all modules (base_model.vera_A) stay.
        new = PEFT_PREFIX + normalize_key(key) if key.startswith(PEFT_PREFIX) else key
        state[new] = tensor
        source_keys[new] = key
    trained = _trained_modules(raw, peft_type)
    if not trained:
        raise VlexportError(f"adapter '{weights}' contains no {SUPPORTED_TYPES[peft_type]} tensors")
    return PeftMethodAdapter(path=path, weights_file=Path(weights), peft_type=peft_type,
                             config=to_peft_config(config, trained, peft_type), state=state,
                             modules=sorted(trained), source_keys=source_keys)

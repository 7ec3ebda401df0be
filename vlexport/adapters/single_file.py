"""Single-file LoRA as people download it: kohya/sd-scripts, mlx-lm, and a bare PEFT-style safetensors.

Each is read into the same PEFT-style LoRA state and config (parse_peft_state), so merging, checking and the PyTorch
reference (PEFT's unmerged LoRA) are the ones PEFT LoRA adapters use. Layouts (../shared/notes/adapter-formats.md):

  kohya     <prefix><module path, dots as underscores>.lora_down.weight [r, in], .lora_up.weight [out, r], .alpha
            (a scalar; kohya's loader takes alpha = r where a module has none). Prefixes lora_unet_, lora_te_,
            lora_te1_, lora_te2_, lora_transformer_ or lora_; the module path in any LLaVA key layout, or a Llama's
            own (model.layers.N...: the language model).
  mlx-lm    adapters.safetensors (<module>.lora_a [in, r], .lora_b [r, out]) + adapter_config.json whose
            lora_parameters give rank and scale; the update is scale * lora_b.T @ lora_a.T.
  bare      PEFT's own keys (lora_A.weight [r, in], lora_B.weight [out, r]) without adapter_config.json; r comes
            from the shapes, alpha from the safetensors metadata (diffusers' lora_adapter_metadata JSON, or
            lora_alpha / ss_network_alpha), else from --lora-alpha.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from ..errors import VlexportError
from .io import check_finite, read_tensors
from .keymap import PEFT_PREFIX, normalize_key

MLX_WEIGHTS = "adapters.safetensors"
KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_", "lora_transformer_", "lora_")
# Module-path segments of LLaVA (CLIP + projector + Llama) in every key layout, for undoing kohya's dot mangling.
_SEGMENTS = {
    "base_model", "model", "language_model", "vision_tower", "vision_model", "multi_modal_projector", "mm_projector",
    "encoder", "layers", "self_attn", "mlp", "q_proj", "k_proj", "v_proj", "o_proj", "out_proj", "gate_proj",
    "up_proj", "down_proj", "fc1", "fc2", "linear_1", "linear_2", "lm_head", "embed_tokens", "embeddings",
    "patch_embedding", "position_embedding",
}
_LYCORIS = ("hada_w1_a", "lokr_w1", "oft_blocks", "oft_diag", "lora_mid", "dora_scale", "diff", "w_norm", "b_norm")


def is_mlx_adapter(path: Path) -> bool:
    """An mlx-lm adapter: adapters.safetensors with an adapter_config.json holding lora_parameters."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    config = folder / "adapter_config.json"
    if not config.is_file() or not (path.is_dir() and (folder / MLX_WEIGHTS).is_file() or path.name == MLX_WEIGHTS):
        return False
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError:
        return False
    return isinstance(data, dict) and "lora_parameters" in data and "peft_type" not in data


def is_kohya(keys) -> bool:
    return any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys)


def read_single_file_lora(path: Path, lora_alpha: float | None = None):
    """A kohya, mlx-lm or bare PEFT-style LoRA file (or an mlx-lm directory) as a LoraAdapter."""
    path = Path(path)
    if is_mlx_adapter(path):
        return read_mlx_lora(path, lora_alpha)
    state = read_tensors(path)
    if is_kohya(state):
        return read_kohya_lora(path, state, lora_alpha)
    return read_bare_lora(path, state, lora_alpha)


def _adapter(path: Path, weights: Path, fmt: str, modules: dict, source_keys: dict, lora_alpha_given=None):
    """modules: {transformers 5 name: (A [r, in], B [out, r], alpha)}, scaling alpha / r. The config pins every
    module's r and alpha by exact name, so PEFT (the reference) scales each as the format does."""
    from .lora import LoraAdapter, parse_peft_state

    if not modules:
        raise VlexportError(f"adapter '{weights}' contains no LoRA tensors")
    ranks = {m: int(a.shape[0]) for m, (a, _, _) in modules.items()}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alphas = {m: float(alpha) for m, (_, _, alpha) in modules.items()}
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(modules),
        "rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != alpha},
    }
    state = {}
    for m, (a, b, _) in modules.items():
        state[f"{PEFT_PREFIX}{m}.lora_A.weight"] = a
        state[f"{PEFT_PREFIX}{m}.lora_B.weight"] = b
    adapter = LoraAdapter(path=path, weights_file=weights, format=fmt, config=config, lora_alpha_given=lora_alpha_given)
    parse_peft_state(state, config, adapter)
    adapter.source_keys.update(source_keys)
    return adapter


def _check_rank(weights: Path, down_key: str, down, up_key: str, up, layout: str) -> None:
    if down.dim() < 2 or up.dim() < 2 or down.shape[0] != up.shape[1]:
        raise VlexportError(
            f"adapter '{weights}': tensors '{down_key}' {tuple(down.shape)} and '{up_key}' {tuple(up.shape)} disagree on "
            f"the LoRA rank; {layout}; the file is corrupt or mixes two adapters")


# -- kohya ----------------------------------------------------------------------------------------------------------
def kohya_module_name(stem: str) -> str | None:
    """'lora_unet_model_language_model_layers_0_self_attn_q_proj' -> 'model.language_model.layers.0.self_attn.q_proj'
    (transformers 5 name), or None when the path is not made of LLaVA's module names."""
    for prefix in KOHYA_PREFIXES:
        if stem.startswith(prefix):
            stem = stem[len(prefix):]
            break
    words, out, i = stem.split("_"), [], 0
    while i < len(words):
        for n in (3, 2, 1):  # the longest segment first: multi_modal_projector before model
            candidate = "_".join(words[i:i + n])
            if len(words[i:i + n]) == n and (candidate in _SEGMENTS or (n == 1 and candidate.isdigit())):
                out.append(candidate)
                i += n
                break
        else:
            return None
    return normalize_key(".".join(out))


def read_kohya_lora(path: Path, state: dict | None = None, lora_alpha: float | None = None):
    state = read_tensors(path) if state is None else state
    check_finite(state, path)
    lycoris = sorted(k for k in state if k.partition(".")[2].split(".")[0] in _LYCORIS)
    if lycoris:
        raise VlexportError(
            f"adapter '{path}': tensor '{lycoris[0]}' is a LyCORIS (LoHa/LoKr/DoRA) tensor; vlexport reads kohya LoRA "
            "(lora_down/lora_up/alpha) single files, and LoHa/LoKr as PEFT directories")
    stems: dict[str, dict] = {}
    for key, t in state.items():
        stem, _, leaf = key.partition(".")
        stems.setdefault(stem, {})[leaf] = (key, t)
    modules, source_keys, used_alpha = {}, {}, None
    for stem, leaves in sorted(stems.items()):
        if "lora_down.weight" not in leaves or "lora_up.weight" not in leaves:
            missing = "lora_up.weight" if "lora_down.weight" in leaves else "lora_down.weight"
            raise VlexportError(f"adapter '{path}': module '{stem}' has no {missing} tensor; the file is incomplete")
        unknown = set(leaves) - {"lora_down.weight", "lora_up.weight", "alpha"}
        if unknown:
            raise VlexportError(f"adapter '{path}': tensor '{stem}.{sorted(unknown)[0]}' is not a kohya LoRA tensor "
                                "(lora_down.weight, lora_up.weight, alpha)")
        name = kohya_module_name(stem)
        if name is None:
            raise VlexportError(
                f"adapter '{path}': kohya key '{leaves['lora_down.weight'][0]}' does not name a LLaVA module (expected "
                f"a prefix such as lora_unet_ and a module path such as model_language_model_layers_0_self_attn_q_proj)")
        (down_key, down), (up_key, up) = leaves["lora_down.weight"], leaves["lora_up.weight"]
        _check_rank(path, down_key, down, up_key, up, "lora_down is [r, in] and lora_up [out, r]")
        r = down.shape[0]
        if "alpha" in leaves:
            alpha = float(leaves["alpha"][1].reshape(-1)[0])
        else:  # kohya's loader: a module saved without alpha has alpha = r (scale 1), unless the user says otherwise
            alpha = float(lora_alpha) if lora_alpha is not None else float(r)
            used_alpha = lora_alpha
        modules[name] = (down, up, alpha)
        source_keys[name] = down_key
    return _adapter(path, path, "kohya", modules, source_keys, used_alpha)


# -- mlx-lm ---------------------------------------------------------------------------------------------------------
def read_mlx_lora(path: Path, lora_alpha: float | None = None):
    folder = path if path.is_dir() else path.parent
    weights = folder / MLX_WEIGHTS
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    kind = config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise VlexportError(f"adapter '{config_path}': mlx-lm fine_tune_type={kind!r} is not read; vlexport reads mlx-lm "
                            "LoRA adapters (fine_tune_type 'lora'); fuse it with mlx_lm.fuse and pass the fused model as --base")
    params = config.get("lora_parameters") or {}
    state = read_tensors(weights)
    check_finite(state, weights)
    modules, source_keys, used_alpha = {}, {}, None
    pairs: dict[str, dict] = {}
    for key, t in state.items():
        stem, _, leaf = key.rpartition(".")
        if leaf not in ("lora_a", "lora_b"):
            raise VlexportError(f"adapter '{weights}': tensor '{key}' is not an mlx-lm LoRA tensor (lora_a, lora_b)")
        pairs.setdefault(stem, {})[leaf] = (key, t)
    for stem, leaves in sorted(pairs.items()):
        if len(leaves) != 2:
            raise VlexportError(f"adapter '{weights}': module '{stem}' has only {next(iter(leaves))}; the file is incomplete")
        (a_key, a), (b_key, b) = leaves["lora_a"], leaves["lora_b"]
        # mlx stores the transposes of PEFT's A and B: lora_a [in, r], lora_b [r, out].
        A, B = a.T.contiguous(), b.T.contiguous()
        _check_rank(weights, a_key, A, b_key, B, "lora_a is [in, r] and lora_b [r, out]")
        r = A.shape[0]
        if "rank" in params and int(params["rank"]) != r:
            raise VlexportError(f"adapter '{weights}': tensor '{a_key}' has rank {r} but adapter_config.json gives "
                                f"lora_parameters.rank={params['rank']}; the config does not belong to these weights")
        if "scale" in params:
            alpha = float(params["scale"]) * r  # mlx's scale is absolute: alpha / r = scale
        elif lora_alpha is not None:
            alpha = float(lora_alpha)
            used_alpha = lora_alpha
        else:
            raise VlexportError(f"adapter '{config_path}': lora_parameters has no scale, so the LoRA's strength is "
                                "unknown: pass --lora-alpha ALPHA (scale = alpha / rank)")
        modules[normalize_key(stem)] = (A, B, alpha)
        source_keys[normalize_key(stem)] = a_key
    return _adapter(path, weights, "mlx", modules, source_keys, used_alpha)


# -- bare PEFT-style safetensors ----------------------------------------------------------------------------------
def _metadata(path: Path) -> dict:
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _alpha_from_metadata(meta: dict, path: Path) -> tuple[dict, str] | None:
    """({lora_alpha, optionally r, rank_pattern, alpha_pattern, use_rslora}, where it came from), or None."""
    if "lora_adapter_metadata" in meta:  # diffusers writes the LoraConfig as JSON
        try:
            cfg = json.loads(meta["lora_adapter_metadata"])
        except json.JSONDecodeError as e:
            raise VlexportError(f"adapter '{path}': metadata lora_adapter_metadata is not valid JSON ({e})") from None
        if "lora_alpha" in cfg:
            keep = ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora")
            return {k: cfg[k] for k in keep if k in cfg}, "lora_adapter_metadata"
    for key in ("lora_alpha", "alpha", "ss_network_alpha"):
        if key in meta:
            try:
                out = {"lora_alpha": float(meta[key])}
                for rk in ("r", "rank", "ss_network_dim"):
                    if rk in meta:
                        out["r"] = int(float(meta[rk]))
                        break
            except ValueError:
                raise VlexportError(f"adapter '{path}': metadata {key}={meta[key]!r} is not a number") from None
            return out, key
    return None


def read_bare_lora(path: Path, state: dict | None = None, lora_alpha: float | None = None):
    from .lora import LoraAdapter, _check_options, parse_peft_state

    state = read_tensors(path) if state is None else state
    check_finite(state, path)
    found = _alpha_from_metadata(_metadata(path), path)
    if found is None and lora_alpha is None:
        raise VlexportError(
            f"LoRA file '{path}' has no adapter_config.json beside it and no alpha in its metadata: its rank is read "
            "from the shapes, but LoRA alpha cannot be; pass --lora-alpha ALPHA (the lora_alpha it was trained with), "
            "or put the training run's adapter_config.json next to it")
    config = dict(found[0]) if found else {}
    if lora_alpha is not None and found is None:
        config["lora_alpha"] = float(lora_alpha)
    config["peft_type"] = "LORA"
    _check_options(config, path)
    adapter = LoraAdapter(path=path, weights_file=path, format="peft-safetensors", config=config,
                          lora_alpha_given=lora_alpha if found is None else None)
    parse_peft_state(state, config, adapter)
    if not adapter.modules:
        raise VlexportError(f"adapter '{path}' contains no LoRA tensors")
    # PEFT, for the reference, needs every module's r: pin them by exact name (the file's shapes are the truth).
    ranks = {m.module: int(m.A.shape[0]) for m in adapter.modules}
    r = config.get("r") or Counter(ranks.values()).most_common(1)[0][0]
    extra = {re.escape(m): v for m, v in ranks.items() if v != _rank_for(adapter.config, m, r)}
    adapter.config = {**adapter.config, "r": r, "rank_pattern": {**extra, **(adapter.config.get("rank_pattern") or {})}}
    return adapter


def _rank_for(config: dict, module: str, default: int) -> int:
    from .lora import _pattern_value

    return _pattern_value(config.get("rank_pattern") or {}, module, default)

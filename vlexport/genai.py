"""onnxruntime-genai (ORT-GenAI) files for a CPU bundle: `og.Model(bundle_dir)` then opens the bundle as it is.

Checked with onnxruntime-genai 0.18.0 (which needs onnxruntime>=1.31 and runs on our onnxruntime 1.32). ORT-GenAI
reads `genai_config.json` beside the ONNX files; the parts themselves are used unchanged.

Model type `videochat_flash_qwen`. ORT-GenAI 0.18 has no `llava` type. Of the types that run the generic
three-session pipeline (vision once per image -> embedding -> decoder with plain 2-D position ids and a growing
2-D attention mask), it is the one that fits LLaVA:
  - its number of image tokens per image is configurable (`vision.num_visual_tokens`; gemma3 hard-codes 256), and
    the runtime pre-allocates the vision output as [num_image_tokens, hidden_size], which is exactly our vision
    part's `image_features` [N*T, H];
  - its vision session gets `pixel_values` as the app passes them, so our [N,3,S,S] input is fed unchanged;
  - the embedding session gets `input_ids` and `image_features` (an empty [0,H] on decode steps, which our embed
    graph accepts);
  - the decoder gets `inputs_embeds`, `attention_mask` int64 [B, past+new] (all ones) and `position_ids` int64
    [B, new] (0..S-1 in prefill, then the absolute position), exactly what vlexport's runtime passes; ORT-GenAI
    takes the integer types from the graph. `past_key_values.%d.key|value` / `present.%d.key|value` are separate,
    growing tensors: `search.past_present_share_buffer` is false (our decoder concatenates the cache);
  - our decoder's logits are [B, 1, V] (last position only, prefill included). ORT-GenAI 0.18 accepts that: it
    logs "Logits: Using Trimmed Prefill Logits" and samples from that single row on every step.

How an app feeds a prompt (tests/test_genai.py does this): with `Generator.set_inputs(NamedTensors)`, from vlexport's
preprocessing: `input_ids` int32 [1, S] (`Bundle.encode`, the image token repeated num_image_tokens times; an int64
array is silently reinterpreted as int32 pairs), `pixel_values` float32 [N, 3, S, S] (`Bundle.pixel_values`), and
`num_image_tokens` int64 [1] = N*T (without it the vision model does not run and image positions get no features).

What ORT-GenAI's own processor cannot do for LLaVA:
  - `videochat_flash_qwen`'s prompt processor expands `<|vision_start|>` into `<|vision_start|><|image_pad|>...`,
    tokens a LLaVA tokenizer does not have, and returns pixel_values as [1, N, 3, S, S], which our vision part
    rejects (rank 5, expected 4);
  - the onnxruntime-extensions image pipeline has no shortest-edge resize, so `processor_config.json` squashes a
    non-square photo to a square: it equals CLIP's preprocessing for square images only. It is written so that
    `vision.config_filename` names a loadable file and `Model.create_multimodal_processor()` works;
  - ORT-GenAI's tokenizer needs `tokenizer_config.json` (written when the bundle has none, without the chat
    template, which ORT-GenAI's template engine cannot render: "Unknown method: upper").
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from . import lora_slots
from .bundle import bundle_file
from .errors import VlexportError
from .files import atomic_write_text

GENAI_CONFIG = "genai_config.json"
PROCESSOR_CONFIG = "processor_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
MODEL_TYPE = "videochat_flash_qwen"


def _names(part: dict, key: str) -> list[str]:
    return [io["name"] for io in part.get(key, [])]


def _one(names: list[str], wanted: str, part: str, kind: str) -> str:
    if wanted not in names:
        raise VlexportError(
            f"the {part} part has no {kind} '{wanted}' (it has {', '.join(names) or 'none'}); "
            "ORT-GenAI files are written for vlexport's own I/O contract: rebuild the bundle"
        )
    return wanted


def _layer_pattern(names: list[str], num_layers: int, suffix: str, part: str) -> str:
    """'past_key_values.%d.key' from names such as 'past_key_values.0.key', checked for every layer."""
    for name in names:
        m = re.fullmatch(r"(.*?)0(\D*" + re.escape(suffix) + r")", name)
        if m:
            pattern = f"{m.group(1)}%d{m.group(2)}"
            missing = [pattern % i for i in range(num_layers) if pattern % i not in names]
            if not missing:
                return pattern
    raise VlexportError(
        f"the {part} part has no per-layer '*{suffix}' tensors for all {num_layers} layers; rebuild the bundle"
    )


def _token_id(bundle_dir: Path, manifest: dict, token: str | None) -> int | None:
    if not token:
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle_file(bundle_dir, manifest["tokenizer"]["file"], "tokenizer.file")))
    return tok.token_to_id(token)


def _processor_config(manifest: dict) -> dict:
    """onnxruntime-extensions image pipeline: decode, bicubic resize, centre crop, rescale, normalize, to CHW.

    Equal to CLIP's processor for square images only (see the module docstring)."""
    spec = manifest["preprocessing"]["image"]
    crop_h, crop_w = int(spec["crop_height"]), int(spec["crop_width"])
    if spec.get("shortest_edge"):
        resize_h = resize_w = int(spec["shortest_edge"])
    else:
        resize_h, resize_w = int(spec.get("height") or crop_h), int(spec.get("width") or crop_w)
    interpolation = {0: "NEAREST", 2: "LINEAR", 3: "CUBIC"}.get(int(spec.get("resample", 3)), "CUBIC")
    transforms = [{"operation": {"name": "decode_image", "type": "DecodeImage", "attrs": {"color_space": "RGB"}}}]
    if spec.get("do_resize", True):
        transforms.append({"operation": {"name": "resize", "type": "Resize", "attrs": {
            "height": resize_h, "width": resize_w, "interpolation": interpolation}}})
    if spec.get("do_center_crop", True):
        transforms.append({"operation": {"name": "center_crop", "type": "CenterCrop", "attrs": {
            "height": crop_h, "width": crop_w}}})
    # Rescale turns the uint8 image into float; it is always needed (factor 1 when the processor skips it).
    factor = float(spec.get("rescale_factor", 1 / 255)) if spec.get("do_rescale", True) else 1.0
    transforms.append({"operation": {"name": "rescale", "type": "Rescale", "attrs": {"rescale_factor": factor}}})
    if spec.get("do_normalize", True):
        transforms.append({"operation": {"name": "normalize", "type": "Normalize", "attrs": {
            "mean": [float(v) for v in spec["mean"]], "std": [float(v) for v in spec["std"]]}}})
    transforms.append({"operation": {"name": "to_channel_first", "type": "Permute3D", "attrs": {"dims": [2, 0, 1]}}})
    return {"processor": {"name": "image_processing", "transforms": transforms}}


def genai_config(bundle_dir: Path, manifest: dict) -> dict:
    """genai_config.json's content for a bundle (written by `write_genai_files`)."""
    parts, model = manifest["parts"], manifest["model"]
    for name in ("vision", "embed", "decoder"):
        if name not in parts:
            raise VlexportError(f"bundle has no {name} part; ORT-GenAI needs vision, embed and decoder")
    vision, embed, decoder = parts["vision"], parts["embed"], parts["decoder"]

    num_layers = int(model["num_layers"])
    dec_in, dec_out = _names(decoder, "inputs"), _names(decoder, "outputs")
    emb_in, emb_out = _names(embed, "inputs"), _names(embed, "outputs")
    vis_in, vis_out = _names(vision, "inputs"), _names(vision, "outputs")

    eos = [int(i) for i in manifest["generation"]["eos_token_ids"]]
    if not eos:
        raise VlexportError("the bundle names no end-of-sequence token (generation.eos_token_ids is empty)")
    tok = manifest["tokenizer"]
    bos = model.get("bos_token_id")
    if bos is None:
        bos = _token_id(bundle_dir, manifest, tok.get("bos_token"))
    # ORT-GenAI masks trailing pad tokens of a prompt and pads batches with this id. Batch 1 never pads; falling
    # back to the first EOS id (as HF's generate does) is safe since a prompt does not end on EOS.
    pad = model.get("pad_token_id")
    if pad is None:
        pad = _token_id(bundle_dir, manifest, tok.get("pad_token"))
    if pad is None:
        pad = eos[0]

    context = int(model["max_position_embeddings"])
    target_context = manifest.get("target", {}).get("shapes", {}).get("context")
    if target_context:
        context = min(context, int(target_context))

    num_image_tokens = int(model["num_image_tokens"])
    return {
        "model": {
            "type": MODEL_TYPE,
            "bos_token_id": int(bos) if bos is not None else eos[0],
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": int(pad),
            "vocab_size": int(model["vocab_size"]),
            "context_length": context,
            "image_token_id": int(model["image_token_id"]),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": decoder["file"],
                "hidden_size": int(model["hidden_size"]),
                "head_size": int(model["head_dim"]),
                "num_attention_heads": int(model["num_attention_heads"]),
                "num_key_value_heads": int(model["num_kv_heads"]),
                "num_hidden_layers": num_layers,
                "inputs": {
                    "inputs_embeds": _one(dec_in, "inputs_embeds", "decoder", "input"),
                    "attention_mask": _one(dec_in, "attention_mask", "decoder", "input"),
                    "position_ids": _one(dec_in, "position_ids", "decoder", "input"),
                    "past_key_names": _layer_pattern(dec_in, num_layers, "key", "decoder"),
                    "past_value_names": _layer_pattern(dec_in, num_layers, "value", "decoder"),
                },
                "outputs": {
                    "logits": _one(dec_out, "logits", "decoder", "output"),
                    "present_key_names": _layer_pattern(dec_out, num_layers, "key", "decoder"),
                    "present_value_names": _layer_pattern(dec_out, num_layers, "value", "decoder"),
                },
            },
            "embedding": {
                "filename": embed["file"],
                "inputs": {
                    "input_ids": _one(emb_in, "input_ids", "embed", "input"),
                    "image_features": _one(emb_in, "image_features", "embed", "input"),
                },
                "outputs": {"inputs_embeds": _one(emb_out, "inputs_embeds", "embed", "output")},
            },
            "vision": {
                "filename": vision["file"],
                "config_filename": PROCESSOR_CONFIG,
                "num_visual_tokens": num_image_tokens,
                "inputs": {"pixel_values": _one(vis_in, "pixel_values", "vision", "input")},
                "outputs": {"image_features": _one(vis_out, "image_features", "vision", "output")},
            },
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # Our decoder returns present = concat(past, new): the cache grows, it is never updated in place.
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def _tokenizer_config(manifest: dict) -> dict:
    """The little of HF's tokenizer_config.json that ORT-GenAI's tokenizer (onnxruntime-extensions) reads.

    The chat template is left out on purpose: ORT-GenAI's template engine cannot render HF templates that call
    string methods (LLaVA's `message['role'].upper()` fails with "Unknown method: upper"); apps render the
    bundle's chat_template.jinja themselves."""
    tok = manifest["tokenizer"]
    config = {"clean_up_tokenization_spaces": False}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        if tok.get(key):
            config[key] = tok[key]
    return config


def write_genai_files(bundle_dir: Path, manifest: dict) -> list[str]:
    """Write genai_config.json, processor_config.json and (when the bundle has none) tokenizer_config.json beside
    the parts; return the file names written.

    og.Model(bundle_dir) needs genai_config.json only. og.Tokenizer and Model.create_multimodal_processor() also
    open tokenizer_config.json, and the multimodal processor opens processor_config.json."""
    bundle_dir = Path(bundle_dir)
    if manifest["model"].get("anyres"):
        return []  # ANYRES_UNSUPPORTED: open_model refuses such a bundle by name
    config = genai_config(bundle_dir, manifest)
    files = {GENAI_CONFIG: config, PROCESSOR_CONFIG: _processor_config(manifest)}
    if not (bundle_dir / TOKENIZER_CONFIG).exists():
        files[TOKENIZER_CONFIG] = _tokenizer_config(manifest)
    for name, content in files.items():
        atomic_write_text(bundle_dir / name, json.dumps(content, indent=2) + "\n")
    return list(files)


GENAI_SECTIONS = {"decoder": "decoder", "embed": "embedding", "vision": "vision"}
ANYRES_UNSUPPORTED = (
    "LLaVA-NeXT bundles do not run in onnxruntime-genai: the number of image tokens depends on each image's size, "
    "where ORT-GenAI 0.18 takes one fixed vision.num_visual_tokens, and the vision part packs the tiles with "
    "pack_index / pack_weight inputs that ORT-GenAI's multimodal pipeline does not feed; run the bundle with "
    "vlexport's runtime (vlexport run, or vlexport.load in Python)"
)
PREFIX_UNSUPPORTED = (
    "prefix tuning needs generation to start from a KV prefix with positions shifted by the prefix length; "
    "onnxruntime-genai 0.18 starts every generator from an empty cache, and its adapter API does not reach the "
    "multimodal pipeline's decoder (measured), so prefix tasks run in vlexport's runtime only"
)


def _bake_pack(src: Path, dst: Path, values: dict) -> None:
    """A copy of a part's graph whose adapter slot defaults are the task's weights. The copy sits next to the
    original and points at the same external data file, so it costs the graph, not the weights."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src), load_external_data=False)
    inits = model.graph.initializer
    for i, init in enumerate(inits):
        if init.name in values:
            inits[i].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values[init.name]), init.name))
    missing = set(values) - {i.name for i in inits}
    if missing:
        raise VlexportError(f"part '{src.name}' has no default for adapter slot input(s) {sorted(missing)}; rebuild the bundle")
    onnx.save(model, str(dst))


def write_task_files(bundle_dir: Path, manifest: dict) -> dict:
    """ORT-GenAI entries for bank tasks: a genai_config overlay that points og.Model at the task's parts.

    A task with its own merged LoRA/BitFit uses its merged copies; a task fed through slots (bottleneck, swappable
    LoRA) gets copies of the slotted parts' graphs with its weights as the slot defaults (ORT-GenAI's multimodal
    pipeline feeds no adapter inputs). Returns {task: {"overlay": {...}} | {"unsupported": why}}."""
    from safetensors.numpy import load_file

    bundle_dir = Path(bundle_dir)
    out: dict = {}
    for name, task in (manifest.get("tasks") or {}).items():
        if manifest["model"].get("anyres"):
            out[name] = {"unsupported": ANYRES_UNSUPPORTED}
            continue
        if task.get("prefix_tokens"):
            out[name] = {"unsupported": PREFIX_UNSUPPORTED}
            continue
        files = dict(task.get("parts") or {})
        slotted = sorted(set(task.get("bottleneck_parts") or []) | set(task.get("lora_parts") or []))
        if slotted:
            pack = load_file(str(bundle_file(bundle_dir, task["pack"], f"tasks.{name}.pack")))
            for part in slotted:
                src = bundle_file(bundle_dir, files.get(part, manifest["parts"][part]["file"]), f"tasks.{name}.parts.{part}")
                dst = src.with_name(f"{src.name[:-len('.onnx')]}.task-{name}.onnx")
                # Every LoRA group of the part at the task's one rank (lora_slots.one_rank), the rest "no LoRA".
                values = {**lora_slots.no_adapter_feed(manifest.get("slots"), manifest.get("lora_slots"), part),
                          **{k: v for k, v in pack.items() if k.startswith((f"{part}_adapter.", f"{part}_lora."))}}
                _bake_pack(src, dst, lora_slots.one_rank(values))
                files[part] = dst.relative_to(bundle_dir).as_posix()
        overlay = {"model": {GENAI_SECTIONS[part]: {"filename": f} for part, f in sorted(files.items())}}
        out[name] = {"overlay": overlay}
    return out


def open_model(bundle_dir: str | Path, task: str | None = None):
    """og.Model for the bundle, or for one of its bank tasks (the overlay the build recorded). The bundle is checked
    first (its seal and every file's sha256), with or without a task: ORT-GenAI itself checks nothing."""
    import onnxruntime_genai as og

    from .bundle import read_manifest

    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    if manifest["model"].get("anyres"):
        raise VlexportError(f"bundle '{bundle_dir}': {ANYRES_UNSUPPORTED}")
    if task is None:
        return og.Model(str(bundle_dir))
    entry = (manifest.get("onnxruntime_genai") or {}).get("tasks", {}).get(task)
    if entry is None:
        raise VlexportError(f"bundle '{bundle_dir}' has no onnxruntime-genai entry for task '{task}'")
    if "unsupported" in entry:
        raise VlexportError(f"task '{task}' cannot run in onnxruntime-genai: {entry['unsupported']}")
    config = og.Config(str(bundle_dir))
    config.overlay(json.dumps(entry["overlay"]))
    return og.Model(config)

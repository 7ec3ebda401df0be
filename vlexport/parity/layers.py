"""Few-layer parity (`vlexport verify --layers N`): check a large model on a small machine.

The bundle's decoder graph is cut down to what its first N layers' present.{i}.key|value outputs need (onnx's
Extractor, weights left in the external data file, so ONNX Runtime maps only those). The reference loads only the
first N decoder layers. Both are fed the reference's own inputs_embeds (image features written in), teacher-forced
over the prompt, and every layer's keys and values are compared. Layer i's K/V depend on layers 0..i-1 in full,
so this checks all but the last layer's attention output and MLP, plus that layer's norm and K/V projections.

With the float64 oracle (the same N-layer reference in float64), the oracle is fed the FP32 reference's
inputs_embeds widened exactly, the very input the bundle's decoder gets, so its K/V measure the decoder's arithmetic
alone; its vision features come from the same pixel values widened.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import metrics


def first_layers_session(decoder_path: Path, num_layers: int):
    """An ONNX Runtime session for a decoder graph with only present.{0..N-1} outputs. Its weights are still read
    from the bundle's data file, and only the ones those outputs need."""
    import onnxruntime as ort
    import onnx
    from onnx.utils import Extractor

    model = onnx.load(str(decoder_path), load_external_data=False)
    outputs = [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    # Every graph input may be kept: the exporter can read a shared dimension (the past length) from any layer's
    # past input. The extractor drops the ones the cut graph does not reach.
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    sub = Extractor(model).extract_model(inputs, outputs)
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(decoder_path.parent))
    return ort.InferenceSession(sub.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _kv_metrics(ref, test) -> dict:
    stats = metrics.error_stats(ref, test)
    scale = float(np.abs(ref).max())
    return {"cosine": metrics.cosine(ref, test), "scale": scale, "max_rel_to_scale": stats["max_abs"] / max(scale, 1e-12),
            **stats}


def run_layers_case(case, bundle, model, processor, sub_session, num_layers: int, oracle=None) -> dict:
    import torch

    from ..backends.torch_reference import oracle_inputs, reference_embeds_and_kv, reference_features, reference_kv

    text = bundle.chat_prompt(case.prompt) if case.prompt is not None else case.raw_prompt
    inputs = processor(images=case.image, text=text, return_tensors="pt")
    embeds, ref_feats, ref_kv = reference_embeds_and_kv(model, inputs, num_layers)
    features = bundle.image_features(bundle.pixel_values(case.image), None, bundle.image_size_of(case.image))
    vision = metrics.feature_metrics(ref_feats, features)
    n = embeds.shape[1]
    feed = {"inputs_embeds": embeds, "attention_mask": np.ones((1, n), np.int64), "position_ids": np.arange(n)[None]}
    wanted = {i.name for i in sub_session.get_inputs()}
    feed.update({k: v for k, v in bundle.empty_past().items() if k in wanted})
    names = list(ref_kv)
    got = dict(zip(names, sub_session.run(names, feed)))
    decoder = {name: _kv_metrics(ref_kv[name], got[name]) for name in names}
    if oracle is not None:
        oracle_feats = reference_features(oracle, oracle_inputs(inputs)["pixel_values"], inputs.get("image_sizes"))
        vision["vs_oracle"] = metrics.feature_metrics(oracle_feats, features)
        vision["reference_vs_oracle"] = metrics.feature_metrics(oracle_feats, ref_feats)
        oracle_kv = reference_kv(oracle, torch.from_numpy(embeds).to(torch.float64), num_layers)
        for name in names:
            decoder[name]["vs_oracle"] = _kv_metrics(oracle_kv[name], got[name])
            decoder[name]["reference_vs_oracle"] = _kv_metrics(oracle_kv[name], ref_kv[name])
    return {"name": case.name, "prompt": text, "vision": {"image_features": vision}, "decoder": decoder}


def verify_first_layers(bundle_dir: Path, manifest: dict, base: Path, adapters: list, num_layers: int, cases, log,
                        oracle: bool = False) -> list:
    """oracle=True also builds the N-layer reference in float64 and measures against it."""
    import torch
    from transformers import AutoProcessor

    from ..backends.torch_reference import build_reference
    from ..progress import track
    from ..runtime import Bundle

    bundle = Bundle(bundle_dir, manifest=manifest)
    model = build_reference(base, adapters, num_text_layers=num_layers)
    oracle_model = build_reference(base, adapters, num_text_layers=num_layers, dtype=torch.float64) if oracle else None
    processor = AutoProcessor.from_pretrained(str(base))
    session = first_layers_session(Path(bundle_dir) / manifest["parts"]["decoder"]["file"], num_layers)
    results = []
    with track(log, "verify", total=len(cases)) as advance:
        for case in cases:
            log(f"few-layer parity case {case.name}")
            results.append(run_layers_case(case, bundle, model, processor, session, num_layers, oracle=oracle_model))
            advance(1, case.name)
    return results

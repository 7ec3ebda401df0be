"""Models too large for an fp32 copy: streamed fp16 checkpoints, FP16 export straight from them, checks on the
first decoder layers. The 7B-shaped build itself is a benchmark (bench/scale.sh); here a tiny model stands in, with
the machine's memory made small enough that the low-memory path is the one taken."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from vlexport import build as build_module
from vlexport.cli import app
from vlexport.errors import ParityError
from vlexport.fixture import write_random_checkpoint
from vlexport.plan import parameter_counts


@pytest.fixture(scope="module")
def tiny_fp16_base(tiny_base, tmp_path_factory):
    """tiny's tokenizer and processor, with seeded random weights stored in fp16 over several shards."""
    from transformers import LlavaConfig

    out = tmp_path_factory.mktemp("tinyfp16") / "llava"
    shutil.copytree(tiny_base, out, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    config = LlavaConfig.from_pretrained(str(tiny_base))
    config.dtype = "float16"
    write_random_checkpoint(config, out, seed=5, shard_bytes=60_000)
    return out


@pytest.fixture
def small_machine(tiny_fp16_base, monkeypatch):
    """Memory for 1.5 fp32 copies of the model: an fp32 export with its check would not fit."""
    config = json.loads((tiny_fp16_base / "config.json").read_text())
    monkeypatch.setattr(build_module, "host_memory_bytes", lambda: int(1.5 * 4 * sum(parameter_counts(config).values())))


def test_streamed_checkpoint_loads_sharded_in_fp16(tiny_fp16_base):
    from transformers import LlavaForConditionalGeneration

    shards = sorted(tiny_fp16_base.glob("model-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((tiny_fp16_base / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    model, info = LlavaForConditionalGeneration.from_pretrained(str(tiny_fp16_base), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float16
    lm = model.model.language_model
    assert 0.015 < float(lm.layers[0].self_attn.q_proj.weight.float().std()) < 0.025
    # GPT-2's residual scaling, and norms near 1 (not exactly: a dropped norm weight must show in parity)
    assert float(lm.layers[0].mlp.down_proj.weight.float().std()) < 0.015
    norm = lm.layers[0].input_layernorm.weight.float()
    assert abs(float(norm.mean()) - 1) < 0.05 and float(norm.std()) > 0.01


def test_low_memory_build_exports_fp16_and_verifies_first_layers(tiny_fp16_base, small_machine, tmp_path):
    """With a LoRA merged into the fp16 weights: verify's reference keeps it unmerged, so a merge gone wrong fails."""
    from vlexport.fixture import make_lora
    from vlexport.runtime import Bundle

    lora = make_lora(tiny_fp16_base, tmp_path / "lora", seed=9, scale=0.05)
    out = tmp_path / "b"
    manifest = build_module.build(tiny_fp16_base, [lora], out=out, target="cpu-fp16")
    assert manifest["build"]["export_dtype"] == "float16"
    assert "would not fit" in manifest["build"]["export_dtype_reason"]
    assert {p["precision"] for p in manifest["parts"].values()} == {"fp16"}
    # Exported from fp16 weights: the decoder's matrices are FLOAT16 initializers, its I/O stays FP32.
    decoder = onnx.load(str(out / manifest["parts"]["decoder"]["file"]), load_external_data=False)
    types = {t.data_type for t in decoder.graph.initializer if len(t.dims) == 2}
    assert types == {onnx.TensorProto.FLOAT16}
    assert decoder.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # The export check ran on the first 2 layers' K/V, the verify on the first 2 layers.
    assert manifest["parts"]["decoder"]["export_check"]["outputs_checked"] == 4
    report = json.loads((out / "parity_report.json").read_text())
    assert report["passed"] and report["mode"].startswith("first 2 decoder layers")
    generation = Bundle(out).generate(np.zeros((40, 30, 3), np.uint8), "What is this?", max_new_tokens=4)
    assert len(generation.token_ids) >= 1


def test_first_layers_export_check_catches_a_changed_weight(tiny_fp16_base, tmp_path):
    from vlexport.export.onnx import check_part, export_part, part_specs
    from vlexport.model import check_base_dir, facts_from_config, load_llava

    model = load_llava(tiny_fp16_base, dtype="float16")
    spec = next(s for s in part_specs(model, facts_from_config(check_base_dir(tiny_fp16_base))) if s.name == "decoder")
    path = export_part(spec, tmp_path / "decoder.onnx")
    assert check_part(spec, path, 1e-2, first_layers=1)["outputs_checked"] == 2
    with torch.no_grad():
        model.model.language_model.layers[0].self_attn.k_proj.weight.mul_(1.1)
    with pytest.raises(ParityError, match="present.0.key"):
        check_part(spec, path, 1e-2, first_layers=1)


def test_low_memory_build_refuses_fp32_parts_by_name(tiny_fp16_base, small_machine, tmp_path):
    out = tmp_path / "b"
    r = CliRunner().invoke(app, ["build", "--base", str(tiny_fp16_base), "--target", "cpu", "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert "does not fit twice" in r.output and "cpu-fp16" in r.output
    assert not out.exists() and not list(tmp_path.glob(".b*"))


def test_export_keeps_no_reference_to_the_model(tiny_base, tmp_path):
    """After export the weights belong to the model alone, so that dropping the model frees them (a 7B build would
    otherwise verify beside a second copy)."""
    import gc
    import weakref

    from vlexport.export.onnx import export_part, part_specs
    from vlexport.model import check_base_dir, facts_from_config, load_llava

    model = load_llava(tiny_base, attention="eager")
    spec = next(s for s in part_specs(model, facts_from_config(check_base_dir(tiny_base))) if s.name == "decoder")
    export_part(spec, tmp_path / "decoder.onnx")
    weight = weakref.ref(model.model.language_model.layers[0].mlp.down_proj.weight)
    del model, spec
    gc.collect()
    assert weight() is None

"""Bad input at run time and in adapter/base files: each refused with exit code 2 (VlexportError), a message naming
the option, file or tensor and the fix, no other exception, and nothing written.

CLI cases go through CliRunner, which catches every exception: a clean refusal is exit code 2 with
result.exception None or a SystemExit (see assert_refused), never "Traceback" in the output, which cannot appear.
"""

import json
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from vlexport.cli import app
from vlexport.errors import VlexportError

RAW = "USER: <image>\nWhat is this? ASSISTANT:"


def listing(folder: Path) -> dict:
    """Every file under a folder with its size and mtime: equal before and after means nothing was written."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def assert_refused(result, *needles):
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"unexpected {type(result.exception).__name__}: {result.exception}")
    for n in needles:
        assert n in result.output, (n, result.output)


def run(bundle, *args):
    return CliRunner().invoke(app, ["run", str(bundle), *args])


def build(base, adapters, out, *extra):
    args = ["build", "--base", str(base), "-o", str(out), "--no-verify", *extra]
    for a in adapters:
        args += ["--adapter", str(a)]
    return CliRunner().invoke(app, args)


def assert_build_refused(result, out, *needles):
    assert_refused(result, *needles)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "partial output left behind"


@pytest.fixture(scope="module")
def bundle(full_bundle):
    import vlexport

    return vlexport.load(full_bundle, threads=1)


@pytest.fixture(scope="module")
def photo_png(tmp_path_factory, photos):
    path = tmp_path_factory.mktemp("img") / "chelsea.png"
    photos["chelsea"].save(path)
    return path


# -- sampling options -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,needle", [
    ({"temperature": 1.0, "top_p": 0.0}, "--top-p"),
    ({"temperature": 1.0, "top_p": 1.5}, "--top-p"),
    ({"temperature": 1.0, "top_p": float("nan")}, "--top-p"),
    ({"temperature": -0.5}, "--temperature"),
    ({"temperature": float("inf")}, "--temperature"),
    ({"max_new_tokens": 0}, "--max-new-tokens"),
    ({"max_new_tokens": -3}, "--max-new-tokens"),
])
def test_generation_options_refused_by_name(bundle, tmp_path, kwargs, needle):
    """Checked before the image is read: the image given does not exist, and the error is still the option's."""
    with pytest.raises(VlexportError, match=needle):
        bundle.generate(tmp_path / "never-read.png", raw_prompt=RAW, **kwargs)


@pytest.mark.parametrize("args,needle", [
    (["--temperature", "1", "--top-p", "0"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--threads", "-1"], "--threads"),
    (["--threads", "0"], "--threads"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_run_options_refused(full_bundle, photo_png, args, needle):
    before = listing(full_bundle)
    assert_refused(run(full_bundle, "--image", str(photo_png), "--raw-prompt", RAW, *args), needle)
    assert listing(full_bundle) == before


@pytest.mark.parametrize("threads", [-1, 0, 1.5, True])
def test_bundle_threads_refused(full_bundle, threads):
    import vlexport

    with pytest.raises(VlexportError, match="--threads"):
        vlexport.load(full_bundle, threads=threads)


# -- prompt length against the context ----------------------------------------------------------------------

def test_prompt_over_context_is_refused_before_vision(bundle, tmp_path):
    """A 5k-token prompt on a 4096 context: refused naming both numbers, before the image is even opened."""
    context = bundle.manifest["target"]["shapes"]["context"]
    prompt = "word " * 5000
    n = len(bundle.encode(f"USER: <image>\n{prompt} ASSISTANT:"))
    assert n > context
    with pytest.raises(VlexportError) as e:
        bundle.generate(tmp_path / "never-read.png", raw_prompt=f"USER: <image>\n{prompt} ASSISTANT:", max_new_tokens=8)
    message = str(e.value)
    assert f"{n} tokens" in message and str(context) in message and "shapes.context" in message
    assert f"{n + 8} tokens" in message


def test_max_new_tokens_over_context_is_refused(bundle, tmp_path):
    context = bundle.manifest["target"]["shapes"]["context"]
    n = len(bundle.encode(RAW))
    with pytest.raises(VlexportError, match=f"{n + context} tokens.*context of {context}"):
        bundle.generate(tmp_path / "never-read.png", raw_prompt=RAW, max_new_tokens=context)
    # The largest request that fits is not refused by the check.
    bundle.check_context(n, context - n)


def test_max_position_embeddings_smaller_than_context(full_bundle, tmp_path):
    """When the model's positions end before the target's context, the smaller limit is the one enforced."""
    from vlexport.bundle import read_manifest
    from vlexport.runtime import Bundle

    manifest = json.loads(json.dumps(read_manifest(full_bundle)))
    manifest["model"]["max_position_embeddings"] = 700
    small = Bundle(full_bundle, threads=1, manifest=manifest)
    n = len(small.encode(RAW))
    with pytest.raises(VlexportError, match="max_position_embeddings of 700"):
        small.generate(tmp_path / "never-read.png", raw_prompt=RAW, max_new_tokens=700 - n + 1)
    small.check_context(n, 700 - n)


def test_huge_prompt_through_run(full_bundle, photo_png):
    """The issue's case: a 100k-character --prompt (25k tokens for a context of 4096) through `vlexport run`."""
    before = listing(full_bundle)
    r = run(full_bundle, "--image", str(photo_png), "--prompt", "lorem ipsum " * 8334)
    assert_refused(r, "4096", "context", "--max-new-tokens")
    assert listing(full_bundle) == before


def test_huge_prompt_does_not_grow_memory(full_bundle, tmp_path):
    """The refusal of a 100k-character prompt costs no memory: peak RSS of a fresh process barely moves."""
    code = f"""
import resource, sys
import vlexport
from vlexport.errors import VlexportError
b = vlexport.load({str(full_bundle)!r}, threads=1)
b.encode("USER: <image>\\nhi ASSISTANT:")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    b.generate({str(tmp_path / 'never-read.png')!r}, prompt="x " * 50000)
except VlexportError as e:
    assert "context" in str(e), e
else:
    sys.exit("not refused")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    grown_kb = int(out.stdout.strip().splitlines()[-1])
    assert grown_kb < 100_000, f"peak RSS grew {grown_kb} kB refusing a long prompt"


# -- images ---------------------------------------------------------------------------------------------------

def _png(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit grayscale PNG of all-black pixels: 20000 x 20000 is 400 megapixels in about 50 kB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_refused(full_bundle, tmp_path):
    from vlexport.preprocess import MAX_IMAGE_PIXELS, open_image

    bomb = _png(tmp_path / "bomb.png", 20000, 20000)
    assert bomb.stat().st_size < 1_000_000 and 20000 * 20000 > MAX_IMAGE_PIXELS
    with pytest.raises(VlexportError, match="400000000 pixels"):  # PIL's own check, from the header
        open_image(bomb)
    before = listing(full_bundle)
    assert_refused(run(full_bundle, "--image", str(bomb), "--raw-prompt", RAW), "bomb.png", "400000000 pixels",
                   f"{MAX_IMAGE_PIXELS:,}")
    assert listing(full_bundle) == before


def test_image_over_vlexport_limit_below_pil_error(full_bundle, tmp_path):
    """12000 x 12000 is under PIL's error threshold (it only warns): vlexport's limit refuses it, from the header."""
    from vlexport.preprocess import MAX_IMAGE_PIXELS, open_image

    big = _png(tmp_path / "scan.png", 12000, 12000)
    assert 12000 * 12000 > MAX_IMAGE_PIXELS
    with pytest.raises(VlexportError, match=r"12000 x 12000 = 144,000,000 pixels"):
        open_image(big)
    assert_refused(run(full_bundle, "--image", str(big), "--raw-prompt", RAW), "scan.png", "12000 x 12000")


def test_image_past_pil_own_bomb_limit_is_refused_by_name(tmp_path, monkeypatch):
    """PIL's own DecompressionBombError (raised at twice PIL.Image.MAX_IMAGE_PIXELS) is reported by name too."""
    from PIL import Image

    from vlexport.preprocess import open_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(VlexportError, match="big.png.*pixels"):
        open_image(_png(tmp_path / "big.png", 100, 100))


def test_extreme_aspect_ratio_is_refused(bundle, tmp_path):
    """1 x 200000 pixels is small, but resizing its short side to CLIP's size would make billions of pixels."""
    strip = _png(tmp_path / "strip.png", 1, 200000)
    with pytest.raises(VlexportError, match="aspect ratio"):
        bundle.pixel_values(strip)


@pytest.mark.parametrize("damage", ["truncated", "garbled", "empty"])
def test_corrupt_image_is_refused(full_bundle, photo_png, tmp_path, damage):
    data = photo_png.read_bytes()
    bad = tmp_path / f"{damage}.png"
    if damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "garbled":
        bad.write_bytes(data[:200] + bytes(255 - b for b in data[200:2000]) + data[2000:])
    else:
        bad.write_bytes(b"")
    assert_refused(run(full_bundle, "--image", str(bad), "--raw-prompt", RAW), f"{damage}.png", "not a readable image")


# -- base weights -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_damaged_base_weights(tiny_base, tmp_path, damage):
    from vlexport.model import load_llava

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    weights = base / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000] if damage == "truncated" else data[:8] + b"{not json" + data[17:])
    out = tmp_path / "out"
    assert_build_refused(build(base, [], out), out, "model.safetensors", "download or save the model again")
    with pytest.raises(VlexportError, match="model.safetensors"):
        load_llava(base)


def test_missing_shard(tiny_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model.safetensors", "x": "model-00002-of-00002.safetensors"}}))
    out = tmp_path / "out"
    assert_build_refused(build(base, [], out), out, "model-00002-of-00002.safetensors", "missing")


# -- adapter files ------------------------------------------------------------------------------------------

def _lora_copy(full_lora, tmp_path, edit):
    dst = tmp_path / "edited"
    shutil.copytree(full_lora, dst)
    state = load_file(str(dst / "adapter_model.safetensors"))
    edit(state)
    save_file(state, str(dst / "adapter_model.safetensors"))
    return dst


def test_lora_ranks_disagree(tiny_base, full_lora, tmp_path):
    a = "base_model.model.model.language_model.layers.1.mlp.gate_proj.lora_A.weight"
    b = a.replace("lora_A", "lora_B")

    def edit(s):
        s[b] = torch.randn(s[b].shape[0], 6)

    from vlexport.adapters import load_adapter

    adapter = _lora_copy(full_lora, tmp_path, edit)
    shape_a, shape_b = (tuple(t.shape) for t in map(load_file(str(adapter / "adapter_model.safetensors")).get, (a, b)))
    assert shape_a[0] == 8 and shape_b[1] == 6
    with pytest.raises(VlexportError, match="disagree on the LoRA rank"):
        load_adapter(adapter)
    out = tmp_path / "out"
    assert_build_refused(build(tiny_base, [adapter], out), out, a, b, str(shape_a), str(shape_b), "8 vs 6")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_integer_lora_tensor(tiny_base, full_lora, tmp_path, dtype):
    key = "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"

    def edit(s):
        s[key] = (s[key] * 100).to(dtype)

    adapter = _lora_copy(full_lora, tmp_path, edit)
    out = tmp_path / "out"
    assert_build_refused(build(tiny_base, [adapter], out), out, key, str(dtype).removeprefix("torch."), "floating point")


def test_integer_bitfit_tensor(tiny_base, bitfit_dump, tmp_path):
    state = load_file(str(bitfit_dump))
    key = "model.multi_modal_projector.linear_1.bias"
    state[key] = state[key].round().to(torch.int32)
    bad = tmp_path / "int.safetensors"
    save_file(state, str(bad))
    out = tmp_path / "out"
    assert_build_refused(build(tiny_base, [bad], out), out, "int.safetensors", key, "int32")


@pytest.fixture(scope="module")
def plain_bottleneck(tiny_base, tmp_path_factory):
    from vlexport.adapters import load_adapter
    from vlexport.adapters.bottleneck import save_plain
    from vlexport.fixture import make_adapterhub_bottleneck

    tmp = tmp_path_factory.mktemp("plain")
    hub = make_adapterhub_bottleneck(tiny_base, tmp / "hub", "language", "double_seqbn")
    return save_plain(load_adapter(hub), tmp / "plain.safetensors")


def _edit_plain(src, dst, edit):
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta, state = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    edit(state)
    save_file(state, str(dst), metadata=meta)
    return dst


def test_plain_bottleneck_missing_tensor(tiny_base, plain_bottleneck, tmp_path):
    from vlexport.adapters import load_adapter

    assert load_adapter(plain_bottleneck).kind == "bottleneck"  # the intact file reads
    bad = _edit_plain(plain_bottleneck, tmp_path / "cut.safetensors", lambda s: s.pop("layers.1.mlp.up.bias"))
    with pytest.raises(VlexportError, match=r"lacks tensor 'layers\.1\.mlp\.up\.bias'"):
        load_adapter(bad)
    out = tmp_path / "out"
    assert_build_refused(build(tiny_base, [f"qa={bad}"], out), out, "cut.safetensors", "layers.1.mlp.up.bias")


def test_plain_bottleneck_wrong_shape_and_dtype(plain_bottleneck, tmp_path):
    from vlexport.adapters import load_adapter

    def widen(s):
        s["layers.0.attention.up.weight"] = torch.zeros(5, 5)

    with pytest.raises(VlexportError, match=r"layers\.0\.attention\.up\.weight' has shape \(5, 5\)"):
        load_adapter(_edit_plain(plain_bottleneck, tmp_path / "shape.safetensors", widen))

    def to_int(s):
        s["layers.0.mlp.down.bias"] = s["layers.0.mlp.down.bias"].to(torch.int16)

    with pytest.raises(VlexportError, match=r"layers\.0\.mlp\.down\.bias' has dtype int16"):
        load_adapter(_edit_plain(plain_bottleneck, tmp_path / "int.safetensors", to_int))


def test_truncated_plain_bottleneck(plain_bottleneck, tmp_path):
    from vlexport.adapters.bottleneck import read_plain_bottleneck

    bad = tmp_path / "short.safetensors"
    bad.write_bytes(plain_bottleneck.read_bytes()[:-64])
    with pytest.raises(VlexportError, match="short.safetensors.*truncated"):
        read_plain_bottleneck(bad)

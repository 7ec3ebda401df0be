"""The C++ any-resolution preprocessing (cpp/: preprocess_anyres, anyres_num_image_tokens) against transformers.

Pixel values must equal LlavaNextImageProcessorPil's / LlavaOnevisionImageProcessorPil's bit for bit on the same 10
images as tests/test_anyres.py; token counts must equal the HF model's packed feature length on those images, and
vlexport.anyres's count (itself tested against HF) on thousands of sizes. Built with the system cmake + C++ compiler
as tests/test_cpp_preprocess.py does; skipped only when there is no compiler or cmake.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vlexport.anyres import AnyResGeometry
from vlexport.preprocess import _to_rgb

from test_anyres import IMAGES  # the same 10 images

CPP_DIR = Path(__file__).resolve().parents[1] / "cpp"


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> Path:
    cmake = shutil.which("cmake")
    cxx = shutil.which(os.environ["CXX"].split()[0]) if os.environ.get("CXX") else next(
        (p for p in map(shutil.which, ("c++", "g++", "clang++", "cl")) if p), None)
    if cmake is None or cxx is None:
        pytest.skip("no C++ toolchain: the C++ any-resolution test needs cmake >= 3.16 and a C++17 compiler "
                    "(e.g. `apt-get install cmake g++`)")
    build = tmp_path_factory.mktemp("cpp_anyres_build")
    for cmd in ([cmake, "-S", str(CPP_DIR), "-B", str(build)],
                [cmake, "--build", str(build), "--config", "Release", "--parallel", "--target", "preprocess_cli"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    exe = next((p for p in build.rglob("preprocess_cli*") if p.is_file() and p.suffix in ("", ".exe")), None)
    assert exe is not None, f"the build produced no preprocess_cli under {build}"
    return exe


def run_cli(cli: Path, *args, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(cli), *map(str, args)], capture_output=True, text=True, timeout=120)
    if ok:
        assert r.returncode == 0, f"preprocess_cli {' '.join(map(str, args[:3]))} ... failed: {r.stderr}"
    return r


@pytest.fixture(scope="module")
def ppms(tmp_path_factory) -> dict[str, Path]:
    """The images as binary PPM, converted to RGB as the HF processor does (the C++ caller's job)."""
    out = tmp_path_factory.mktemp("anyres_ppm")
    paths = {}
    for name, img in IMAGES.items():
        arr = np.array(_to_rgb(img))
        paths[name] = out / f"{name}.ppm"
        paths[name].write_bytes(b"P6\n%d %d\n255\n" % (arr.shape[1], arr.shape[0]) + arr.tobytes())
    return paths


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """label -> (HF image processor, its saved preprocessor_config.json, a model config.json or None, HF config).

    The tiny fixtures' processors and model configs (vlexport.fixture_family, no weights needed) and llava-hf's
    full-size processor defaults."""
    from transformers import LlavaNextImageProcessorPil, LlavaOnevisionImageProcessorPil

    from vlexport import fixture_family as ff

    root = tmp_path_factory.mktemp("anyres_configs")
    tn, to = ff.NEXT_PRESETS["tiny"], ff.ONEVISION_PRESETS["tiny"]
    procs = {
        "next_tiny": (LlavaNextImageProcessorPil(size={"shortest_edge": tn.image_size},
                                                 crop_size={"height": tn.image_size, "width": tn.image_size},
                                                 image_grid_pinpoints=ff.pinpoints(ff.NEXT_GRIDS, tn.image_size)),
                      ff.next_config(tn, 1020, 1, 2, 1021)),
        "onevision_tiny": (LlavaOnevisionImageProcessorPil(
            size={"height": to.image_size, "width": to.image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
            image_grid_pinpoints=ff.pinpoints(ff.ONEVISION_GRIDS, to.image_size)), ff.onevision_config(to, 1019, 1020, 1023, 1021)),
        "next_336": (LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
                     None),
        "onevision_384": (LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3), None),
    }
    out = {}
    for label, (proc, cfg) in procs.items():
        (root / label).mkdir()
        proc.save_pretrained(root / label)
        model_cfg = None
        if cfg is not None:
            cfg.save_pretrained(root / label)
            model_cfg = root / label / "config.json"
        out[label] = (proc, root / label / "preprocessor_config.json", model_cfg, cfg)
    return out


@pytest.mark.parametrize("label", ["next_tiny", "onevision_tiny", "next_336", "onevision_384"])
def test_cpp_pixel_values_equal_hf(cli, ppms, configs, tmp_path, label):
    proc, proc_cfg, _, _ = configs[label]
    for name, img in IMAGES.items():
        r = run_cli(cli, "anyres", "--config", proc_cfg, ppms[name], tmp_path / "out.f32")
        n, h, w = map(int, r.stdout.split()[:3])
        got = np.fromfile(tmp_path / "out.f32", dtype="<f4")
        assert got.size == n * 3 * h * w, f"{label} / {name}: wrote {got.size} floats for {n} x 3 x {h} x {w}"
        got = got.reshape(n, 3, h, w)
        want = proc(img, return_tensors="np")["pixel_values"][0].astype(np.float32)
        assert got.shape == want.shape, f"{label} / {name}: C++ {got.shape} != HF {want.shape}"
        same = got.view(np.uint32) == want.view(np.uint32)
        assert same.all(), (f"{label} / {name}: {int((~same).sum())} values differ from HF, max |diff| "
                            f"{np.abs(got.astype(np.float64) - want).max():.3g}, in tiles "
                            f"{sorted({int(t) for t in np.argwhere(~same)[:, 0]})} of {n}")


def test_cpp_resize_pass_order_matches_pillow(cli, tmp_path):
    """Pillow 13 resizes vertically first when (height - out_height) > 2 * (width - out_width); each pass rounds to
    uint8, so the order shows in the bytes. Both sides of the boundary, the tie, and random size pairs."""
    from PIL import Image

    rng = np.random.default_rng(3)
    pairs = [((120, 120), (80, 79)), ((120, 120), (80, 80)), ((120, 120), (80, 81)),  # tie at 40 = 2 * 20
             ((168, 359), (130, 283)), ((50, 700), (56, 56)), ((200, 400), (56, 56)), ((400, 200), (56, 56)),
             ((300, 900), (336, 1008)), ((640, 427), (336, 224)), ((17, 400), (9, 10))]
    pairs += [((int(w), int(h)), (int(tw), int(th))) for w, h, tw, th in rng.integers(1, 260, (60, 4))]
    for (w, h), (tw, th) in pairs:
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ppm = tmp_path / "in.ppm"
        ppm.write_bytes(b"P6\n%d %d\n255\n" % (w, h) + arr.tobytes())
        for resample in (3, 2):
            run_cli(cli, "resize", "--shortest-edge", 0, "--size", th, tw, "--resample", resample, ppm, tmp_path / "o.u8")
            got = np.fromfile(tmp_path / "o.u8", dtype=np.uint8).reshape(th, tw, 3)
            want = np.array(Image.fromarray(arr).resize((tw, th), resample=resample))
            assert np.array_equal(got, want), f"{w}x{h} -> {tw}x{th} (resample {resample}): " \
                                              f"{int((got != want).sum())} bytes differ from Pillow"


def _hf_packed_length(cfg, size) -> int:
    """The HF model's own pack_image_features length for an image size (a weightless tiny model, zero features)."""
    import torch
    from transformers import LlavaNextModel, LlavaOnevisionModel

    cls = LlavaOnevisionModel if cfg.model_type == "llava_onevision" else LlavaNextModel
    model = _MODELS.setdefault(cfg.model_type, cls(cfg).eval())
    geo = AnyResGeometry.from_config(cfg.to_dict())
    feats = torch.zeros(geo.num_tiles(size), geo.side**2, cfg.text_config.hidden_size)
    kw = {"vision_feature_select_strategy": "default"} if cls is LlavaNextModel else {}
    with torch.no_grad():
        packed, _ = model.pack_image_features([feats], torch.tensor([size]), image_newline=model.image_newline, **kw)
    return int(packed[0].shape[0])


_MODELS: dict = {}


@pytest.mark.parametrize("label", ["next_tiny", "onevision_tiny"])
def test_cpp_token_counts_equal_hf_model(cli, ppms, configs, tmp_path, label):
    _, proc_cfg, model_cfg, cfg = configs[label]
    for name, img in IMAGES.items():
        r = run_cli(cli, "anyres", "--config", proc_cfg, "--model-config", model_cfg, ppms[name], tmp_path / "o.f32")
        tokens = int(r.stdout.split("tokens")[1])
        assert tokens == _hf_packed_length(cfg, (img.height, img.width)), f"{label} / {name}"


GEOMETRIES = {
    "next_tiny": None, "onevision_tiny": None,
    "next_336": {"model_type": "llava_next", "vision_config": {"image_size": 336, "patch_size": 14}},
    # SigLIP at 384 / 14: 27 x 27 features a tile, the remainder dropped, as llava-onevision-qwen2-*-hf
    "onevision_384": {"model_type": "llava_onevision", "vision_config": {"image_size": 384, "patch_size": 14}},
}


@pytest.mark.parametrize("label", list(GEOMETRIES))
def test_cpp_token_counts_equal_python_on_many_sizes(cli, configs, tmp_path, label):
    """Thousands of sizes, the rounding-sensitive ones included (unpad's round(x, 7), the anyres_max shrink)."""
    cfg = GEOMETRIES[label]
    if cfg is None:
        path = configs[label][2]
        cfg = json.loads(path.read_text())
    else:
        path = tmp_path / "config.json"
        path.write_text(json.dumps(cfg))
    geo = AnyResGeometry.from_config(cfg)
    rng = np.random.default_rng(1)
    top = max(max(p) for p in geo.grid_pinpoints) * 3 // 2
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, top, (3000, 2))]
    sizes += [(ph, pw) for ph, pw in geo.grid_pinpoints] + [(1, 1), (1, 5000), (5000, 1), (336, 337), (999, 1000)]
    sizes += [(img.height, img.width) for img in IMAGES.values()]
    r = run_cli(cli, "tokens", "--model-config", path, *[v for s in sizes for v in s])
    lines = r.stdout.split("\n")[:-1]
    assert len(lines) == len(sizes)
    for size, line in zip(sizes, lines):
        want = (geo.num_tiles(size), *geo.packed_grid(size), geo.num_image_tokens(size))
        assert tuple(map(int, line.split())) == want, f"{label} {size}: C++ {line} != Python {want}"


@pytest.mark.parametrize("label", list(GEOMETRIES))
def test_cpp_pack_plan_equals_python(cli, configs, tmp_path, label):
    """anyres_pack_plan's gather tables equal vlexport.anyres.pack_plan's bit for bit (pack_plan is tested against
    the HF model's pack_image_features in tests/test_anyres.py)."""
    from vlexport.anyres import pack_plan

    cfg = GEOMETRIES[label]
    path = configs[label][2] if cfg is None else tmp_path / "config.json"
    if cfg is not None:
        path.write_text(json.dumps(cfg))
    geo = AnyResGeometry.from_config(json.loads(path.read_text()))
    rng = np.random.default_rng(2)
    top = max(max(p) for p in geo.grid_pinpoints) * 3 // 2
    sizes = [(img.height, img.width) for img in IMAGES.values()] + [tuple(map(int, s)) for s in rng.integers(1, top, (25, 2))]
    for size in sizes:
        r = run_cli(cli, "plan", "--model-config", path, *size, tmp_path / "plan.bin")
        t = int(r.stdout)
        raw = (tmp_path / "plan.bin").read_bytes()
        assert len(raw) == t * 4 * 12, (size, len(raw), t)
        index = np.frombuffer(raw[: t * 32], "<i8").reshape(t, 4)
        weight = np.frombuffer(raw[t * 32:], "<f4").reshape(t, 4)
        want_index, want_weight = pack_plan(size, geo)
        assert np.array_equal(index, want_index), f"{label} {size}: indices differ"
        assert np.array_equal(weight.view(np.uint32), want_weight.view(np.uint32)), f"{label} {size}: weights differ"


def test_cpp_anyres_errors(cli, ppms, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"image_processor_type": "CLIPImageProcessor"}))
    r = run_cli(cli, "anyres", "--config", bad, ppms["tiny_17x40"], tmp_path / "o.f32", ok=False)
    assert r.returncode == 2 and "image_processor_type 'CLIPImageProcessor'" in r.stderr, r.stderr
    bad.write_text(json.dumps({"image_processor_type": "LlavaNextImageProcessor", "image_grid_pinpoints": [[336]]}))
    r = run_cli(cli, "anyres", "--config", bad, ppms["tiny_17x40"], tmp_path / "o.f32", ok=False)
    assert r.returncode == 2 and "image_grid_pinpoints" in r.stderr, r.stderr
    bad.write_text(json.dumps({"model_type": "llava_onevision", "vision_aspect_ratio": "anyres"}))
    r = run_cli(cli, "tokens", "--model-config", bad, 10, 10, ok=False)
    assert r.returncode == 2 and "vision_aspect_ratio 'anyres'" in r.stderr, r.stderr

"""The C++ preprocessing (cpp/) against vlexport.preprocess: built with the system cmake + C++ compiler, driven
through cpp/tools/preprocess_cli.

The resize must be bit-identical to PIL.Image.resize, the float tensor within 1e-6 of preprocess_image and in
fact bit-identical, the prompt expansion byte-identical to expand_image_tokens, and the processor_config.json /
manifest.json readers must give the same spec as ImageSpec.from_processor_config / the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlexport.preprocess import ImageSpec, expand_image_tokens, preprocess_image

CPP_DIR = Path(__file__).resolve().parents[1] / "cpp"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SPECS = {
    "clip336": ImageSpec(336, None, None, 336, 336, 3, 1 / 255, CLIP_MEAN, CLIP_STD),
    "clip224": ImageSpec(224, None, None, 224, 224, 3, 1 / 255, CLIP_MEAN, CLIP_STD),
    "tiny56": ImageSpec(56, None, None, 56, 56, 3, 1 / 255, CLIP_MEAN, CLIP_STD),
    "bilinear224": ImageSpec(224, None, None, 224, 224, 2, 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # SigLIP style: fixed size, bilinear, no centre crop.
    "bilinear_fixed": ImageSpec(None, 96, 128, 96, 96, 2, 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
                                do_center_crop=False),
    # Crop taller than the resized image: the zero-padding path of _center_crop.
    "pad": ImageSpec(40, None, None, 64, 48, 3, 1 / 255, CLIP_MEAN, CLIP_STD),
    # No resize: big photos are cropped, small ones padded; normalize the raw 0..255 values.
    "noresize_norescale": ImageSpec(None, None, None, 224, 224, 3, 1 / 255, CLIP_MEAN, CLIP_STD,
                                    do_resize=False, do_rescale=False),
    "rescale_only": ImageSpec(100, None, None, 90, 90, 3, 1 / 127.5, CLIP_MEAN, CLIP_STD, do_normalize=False),
}

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field")
# Other aspect ratios, made from the photos: name -> (photo, width, height).
VARIANTS = {
    "astronaut_17x40": ("astronaut", 17, 40),
    "coffee_300x120": ("coffee", 300, 120),
    "chelsea_33x33": ("chelsea", 33, 33),
    "rocket_1000x50": ("rocket", 1000, 50),
}
IMAGES = PHOTOS + tuple(VARIANTS) + ("noise_97x61",)


# -- build -------------------------------------------------------------------------------------------------------------
def _cxx_compiler() -> str | None:
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"].split()[0])
    return next((p for p in map(shutil.which, ("c++", "g++", "clang++", "cl")) if p), None)


@pytest.fixture(scope="module")
def cli(tmp_path_factory) -> Path:
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.fail("cmake is not installed: the C++ preprocessing test needs cmake >= 3.16 and a C++17 compiler "
                    "(e.g. `apt-get install cmake g++`)")
    if _cxx_compiler() is None:
        pytest.fail("no C++ compiler found (looked for $CXX, c++, g++, clang++, cl): the C++ preprocessing test "
                    "needs a C++17 compiler (e.g. `apt-get install g++`)")
    build = tmp_path_factory.mktemp("cpp_build")
    for cmd in ([cmake, "-S", str(CPP_DIR), "-B", str(build)],
                [cmake, "--build", str(build), "--config", "Release", "--parallel"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    exe = next((p for p in build.rglob("preprocess_cli*") if p.is_file() and p.suffix in ("", ".exe")), None)
    assert exe is not None, f"the build produced no preprocess_cli under {build}"
    return exe


def run_cli(cli: Path, *args, ok: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(cli), *map(str, args)], capture_output=True, text=True, timeout=120)
    if ok:
        assert r.returncode == 0, f"preprocess_cli {' '.join(map(str, args))} failed: {r.stderr}"
    return r


# -- images --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, tuple[np.ndarray, Path]]:
    """name -> (HWC uint8 RGB array, the same image as a binary PPM file)."""
    import skimage.data

    arrays = {name: getattr(skimage.data, name)() for name in PHOTOS}
    for name, (photo, w, h) in VARIANTS.items():
        arrays[name] = np.array(Image.fromarray(arrays[photo]).resize((w, h), Image.Resampling.LANCZOS))
    # Full-range noise: its bicubic overshoot exercises the clipping to 0..255.
    arrays["noise_97x61"] = np.random.default_rng(0).integers(0, 256, (61, 97, 3), dtype=np.uint8)
    out_dir = tmp_path_factory.mktemp("ppm")
    result = {}
    for name, arr in arrays.items():
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3, name
        path = out_dir / f"{name}.ppm"
        path.write_bytes(b"P6\n# vlexport test\n%d %d\n255\n" % (arr.shape[1], arr.shape[0]) + arr.tobytes())
        result[name] = (arr, path)
    return result


def spec_args(spec: ImageSpec) -> list[str]:
    args = ["--shortest-edge", spec.shortest_edge or 0, "--size", spec.height or 0, spec.width or 0,
            "--crop", spec.crop_height, spec.crop_width, "--resample", spec.resample,
            "--rescale-factor", repr(spec.rescale_factor), "--mean", *map(repr, spec.mean),
            "--std", *map(repr, spec.std)]
    for flag in ("resize", "center_crop", "rescale", "normalize"):
        if not getattr(spec, f"do_{flag}"):
            args.append(f"--no-{flag.replace('_', '-')}")
    return [str(a) for a in args]


def cpp_preprocess(cli: Path, ppm: Path, args: list[str], out: Path) -> np.ndarray:
    r = run_cli(cli, "preprocess", *args, ppm, out)
    h, w = map(int, r.stdout.split())
    data = np.fromfile(out, dtype="<f4")
    assert data.size == 3 * h * w, f"wrote {data.size} floats for a {h}x{w} image"
    return data.reshape(3, h, w)


def assert_same_tensor(got: np.ndarray, want: np.ndarray, what: str) -> None:
    assert got.shape == want.shape, f"{what}: C++ shape {got.shape} != Python {want.shape}"
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    assert np.isfinite(got).all(), f"{what}: non-finite values"
    assert diff.max() <= 1e-6, (
        f"{what}: max |C++ - Python| = {diff.max():.3g} at {np.unravel_index(diff.argmax(), diff.shape)}, "
        f"{int((diff > 1e-6).sum())} values differ")
    # Same arithmetic in the same order gives the same float32 bits; a 1-ulp slip (say, rescaling in float32
    # instead of float64) stays under 1e-6, so check the bits too.
    same = got.view(np.uint32) == want.astype(np.float32).view(np.uint32)
    assert same.all(), (
        f"{what}: within 1e-6 but not bit-identical: {int((~same).sum())} values differ by up to {diff.max():.3g}")


# -- preprocess ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec_name", list(SPECS))
@pytest.mark.parametrize("image_name", IMAGES)
def test_preprocess_matches_python(cli, images, tmp_path, image_name, spec_name):
    arr, ppm = images[image_name]
    spec = SPECS[spec_name]
    want = preprocess_image(Image.fromarray(arr), spec)
    got = cpp_preprocess(cli, ppm, spec_args(spec), tmp_path / "out.f32")
    assert_same_tensor(got, want, f"{image_name} / {spec_name}")


# -- resize alone: bit-identical to PIL.Image.resize -------------------------------------------------------------------
def _resize_targets(w: int, h: int) -> list[tuple[str, list[str], tuple[int, int] | None, int]]:
    """(label, CLI options, explicit (width, height) or None when the spec computes it, resample)."""
    targets = [(name, spec_args(SPECS[name]), None, SPECS[name].resample)
               for name in ("clip336", "clip224", "tiny56", "bilinear224")]
    explicit = {
        "identity": (w, h),
        "horizontal_only": (w // 3 + 1, h),
        "vertical_only": (w, 2 * h + 1),
        "upscale": (min(3 * w + 1, 1500), min(5 * h // 2, 1500)),
        "one_pixel": (1, 1),
        "odd": (7, 301),
    }
    for resample in (3, 2):
        for label, (tw, th) in explicit.items():
            targets.append((f"{label}_r{resample}", ["--shortest-edge", "0", "--size", str(th), str(tw),
                                                     "--resample", str(resample)], (tw, th), resample))
    return targets


@pytest.mark.parametrize("image_name", IMAGES)
def test_resize_is_bit_identical_to_pillow(cli, images, tmp_path, image_name):
    arr, ppm = images[image_name]
    pil = Image.fromarray(arr)
    for label, args, size, resample in _resize_targets(pil.width, pil.height):
        r = run_cli(cli, "resize", *args, ppm, tmp_path / "out.u8")
        h, w = map(int, r.stdout.split())
        if size is not None:
            assert (w, h) == size, f"{image_name} / {label}: resized to {w}x{h}, asked for {size[0]}x{size[1]}"
        got = np.fromfile(tmp_path / "out.u8", dtype=np.uint8)
        assert got.size == h * w * 3, f"{image_name} / {label}: wrote {got.size} bytes for {w}x{h}"
        want = np.array(pil.resize((w, h), resample=resample))
        got = got.reshape(h, w, 3)
        bad = got != want
        assert not bad.any(), (
            f"{image_name} / {label} ({w}x{h}, resample {resample}): {int(bad.sum())} bytes differ from "
            f"PIL.Image.resize, first at {tuple(int(i) for i in np.argwhere(bad)[0])}, max |diff| "
            f"{int(np.abs(got.astype(int) - want).max())}")


def test_resize_target_sizes_follow_python_rounding(cli, images, tmp_path):
    """The long side is int(shortest_edge * long / short): check it on sizes where truncation matters."""
    for w, h in ((451, 300), (300, 451), (640, 427), (1000, 50), (50, 1000), (17, 40), (333, 1000), (7, 7)):
        ppm = tmp_path / "flat.ppm"
        ppm.write_bytes(b"P6 %d %d 255\n" % (w, h) + bytes(w * h * 3))
        for se in (336, 224, 56, 1):
            r = run_cli(cli, "resize", "--shortest-edge", se, ppm, tmp_path / "out.u8")
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(se * long / short)
            want = (new_long, se) if w <= h else (se, new_long)  # (height, width)
            assert tuple(map(int, r.stdout.split())) == want, f"{w}x{h} shortest_edge {se}"


def test_unsupported_resample_is_an_error(cli, images, tmp_path):
    _, ppm = images["chelsea_33x33"]
    for resample in (0, 1, 4, 5, 7):
        r = run_cli(cli, "preprocess", "--resample", resample, ppm, tmp_path / "out.f32", ok=False)
        assert r.returncode != 0 and "unsupported resample" in r.stderr, (resample, r.stderr)


# -- prompt expansion -----------------------------------------------------------------------------------------------------
EXPAND_CASES = [
    ("USER: <image>\nWhat is shown here? ASSISTANT:", "<image>", 576),
    ("<image><image> two images", "<image>", 3),
    ("no placeholder at all", "<image>", 5),
    ("ünïcødé 中文 <image> ✓ <image>", "<image>", 2),
    ("start <image> end", "<image>", 1),
    ("drop <image> it", "<image>", 0),
    ("negative <image> count", "<image>", -2),
    ("aaaaa", "aa", 2),
    ("<|image|>x<|image|>", "<|image|>", 4),
    ("emoji 🖼 token 🖼🖼", "🖼", 3),
    ("empty token", "", 4),
    ("", "<image>", 7),
]


@pytest.mark.parametrize("text,token,n", EXPAND_CASES)
def test_expand_image_tokens_matches_python(cli, tmp_path, text, token, n):
    (tmp_path / "in.txt").write_bytes(text.encode())
    run_cli(cli, "expand", tmp_path / "in.txt", tmp_path / "out.txt", token, n)
    got = (tmp_path / "out.txt").read_bytes()
    want = expand_image_tokens(text, token, n).encode()
    assert got == want, f"{text!r} / {token!r} x {n}: C++ {got[:200]!r} != Python {want[:200]!r}"


# -- spec readers -----------------------------------------------------------------------------------------------------------
LLAVA_15_PROCESSOR_CONFIG = {
    "image_processor": {
        "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor", "image_std": list(CLIP_STD), "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 336},
    },
    "image_token": "<image>", "num_additional_image_tokens": 1, "patch_size": 14, "processor_class": "LlavaProcessor",
    "vision_feature_select_strategy": "default",
    "chat_template": "{% for m in messages %}\"{{ m['role'] }}\"\\n\u00e9 \ud83d\uddbc [1, 2.5e-3, null]{% endfor %}",
}
CONFIGS = {
    "llava15": LLAVA_15_PROCESSOR_CONFIG,
    "top_level_siglip": {"do_center_crop": False, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
                         "image_std": [0.5, 0.5, 0.5], "resample": 2, "rescale_factor": 1 / 127.5,
                         "size": {"height": 384, "width": 384}, "crop_size": 384},
    "defaults": {},
    "flags_off": {"image_processor": {"do_rescale": False, "do_normalize": False, "crop_size": {"height": 30,
                  "width": 20}, "size": {"shortest_edge": 25}, "image_mean": [0.1, 0.2, 0.3]}},
}


def _read_spec_output(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        key, *vals = line.split()
        out[key] = vals
    return out


def _assert_spec_equal(got: dict, spec: ImageSpec, what: str) -> None:
    for key in ("shortest_edge", "height", "width", "crop_height", "crop_width", "resample"):
        assert int(got[key][0]) == (getattr(spec, key) or 0), f"{what}: {key} {got[key]} != {getattr(spec, key)}"
    assert float(got["rescale_factor"][0]) == spec.rescale_factor, f"{what}: rescale_factor"
    for key in ("mean", "std"):
        assert np.array_equal(np.array(got[key], dtype=np.float32), np.array(getattr(spec, key), dtype=np.float32)), \
            f"{what}: {key} {got[key]} != {getattr(spec, key)}"
    for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
        assert bool(int(got[key][0])) == bool(getattr(spec, key)), f"{what}: {key}"


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_processor_config_reader_matches_python(cli, images, tmp_path, config_name):
    cfg = CONFIGS[config_name]
    path = tmp_path / "processor_config.json"
    path.write_text(json.dumps(cfg, indent=2))
    spec = ImageSpec.from_processor_config(cfg)
    _assert_spec_equal(_read_spec_output(run_cli(cli, "spec", "--config", path).stdout), spec, config_name)
    # And the whole pipeline, driven by the file.
    arr, ppm = images["chelsea"]
    got = cpp_preprocess(cli, ppm, ["--config", str(path)], tmp_path / "out.f32")
    assert_same_tensor(got, preprocess_image(Image.fromarray(arr), spec), f"chelsea / {config_name}")


@pytest.mark.parametrize("spec_name", ["clip336", "bilinear_fixed", "noresize_norescale"])
def test_manifest_reader_matches_python(cli, tmp_path, spec_name):
    spec = SPECS[spec_name]
    # As build.py writes it: every ImageSpec field under preprocessing.image.
    manifest = {"format": 1, "model": {"num_image_tokens": 576},
                "preprocessing": {"image": {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}}}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    _assert_spec_equal(_read_spec_output(run_cli(cli, "spec", "--manifest", path).stdout), spec, spec_name)


def test_bad_json_is_an_error(cli, tmp_path):
    for text in ('{"image_processor": {"size": }', '{"crop_size": {"height": 3}}', "[1, 2]", '{"a": 1} x'):
        (tmp_path / "bad.json").write_text(text)
        r = run_cli(cli, "spec", "--config", tmp_path / "bad.json", ok=False)
        assert r.returncode != 0 and "error" in r.stderr, (text, r.stderr)

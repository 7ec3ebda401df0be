"""vlexport.anyres against transformers' own LLaVA-NeXT / LLaVA-OneVision processors and models.

Pixel values must equal the HF image processor's (the PIL backend, AutoImageProcessor's default without torchvision)
with 0 difference, token counts must equal the processor's placeholder count and the model's packed feature length,
and pack_features must equal the model's pack_image_features on random tile features.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vlexport.anyres import (
    NEXT,
    ONEVISION,
    AnyResGeometry,
    AnyResSpec,
    anyres_views,
    pack_features,
    pack_plan,
    pack_with_plan,
    preprocess_anyres,
    select_best_resolution,
)
from vlexport.errors import VlexportError


def _images() -> dict[str, Image.Image]:
    """10 images of varied aspect ratios and modes: photos, crops and resizes of them."""
    import skimage.data

    astro, coffee, rocket = skimage.data.astronaut(), skimage.data.coffee(), skimage.data.rocket()
    return {
        "square_astronaut_512": Image.fromarray(astro),
        "wide_chelsea_451x300": Image.fromarray(skimage.data.chelsea()),
        "wide_rocket_640x427": Image.fromarray(rocket),
        "tall_coffee_crop_200x400": Image.fromarray(np.ascontiguousarray(coffee[:, 180:380])),
        "gray_camera_512": Image.fromarray(skimage.data.camera()),  # mode L: converted to RGB
        "rgba_logo_500": Image.fromarray(skimage.data.logo()),  # alpha composited onto white
        "tiny_17x40": Image.fromarray(astro).resize((17, 40), Image.Resampling.LANCZOS),
        "wide_1000x50": Image.fromarray(rocket).resize((1000, 50), Image.Resampling.LANCZOS),
        "tall_50x700": Image.fromarray(coffee).resize((50, 700), Image.Resampling.BILINEAR),
        "large_1800x1200": Image.fromarray(skimage.data.hubble_deep_field()).resize((1800, 1200)),
    }


IMAGES = _images()


def _cli_fixture(kind: str, out) -> object:
    """The fixture as a user makes it: `vlexport fixture KIND OUT --preset tiny`."""
    from typer.testing import CliRunner

    from vlexport.cli import app

    result = CliRunner().invoke(app, ["fixture", kind, str(out), "--preset", "tiny", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"kind": kind, "path": str(out), "preset": "tiny"}
    return out


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    return _cli_fixture("llava-next", tmp_path_factory.mktemp("fixtures") / "llava_next")


@pytest.fixture(scope="module")
def onevision_dir(tmp_path_factory):
    return _cli_fixture("llava-onevision", tmp_path_factory.mktemp("fixtures") / "llava_onevision")


def test_fixtures_have_the_hf_layout(next_dir, onevision_dir):
    from transformers import AutoConfig

    for d, model_type, vision in ((next_dir, NEXT, "clip_vision_model"), (onevision_dir, ONEVISION, "siglip_vision_model")):
        names = {p.name for p in d.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names, names
        cfg = AutoConfig.from_pretrained(d)
        assert cfg.model_type == model_type and cfg.vision_config.model_type == vision
    assert AutoConfig.from_pretrained(onevision_dir).text_config.model_type == "qwen2"


def _processors(next_dir, onevision_dir):
    """(label, HF image processor, its config dict): the tiny fixtures' (as saved and loaded back) and the llava-hf
    defaults at full size (336-px CLIP tiles; 384-px SigLIP-style tiles up to 6 x 6)."""
    from transformers import AutoImageProcessor, LlavaNextImageProcessorPil, LlavaOnevisionImageProcessorPil

    out = []
    for label, d in (("next_tiny", next_dir), ("onevision_tiny", onevision_dir)):
        proc = AutoImageProcessor.from_pretrained(d)
        out.append((label, proc, proc.to_dict()))
    for label, proc in (("next_336", LlavaNextImageProcessorPil(size={"shortest_edge": 336},
                                                                crop_size={"height": 336, "width": 336})),
                        ("onevision_384", LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3))):
        out.append((label, proc, proc.to_dict()))
    return out


def test_auto_image_processor_is_the_pil_backend(next_dir, onevision_dir):
    """The class the module docstring names: what a user of vlexport's environment (no torchvision) gets."""
    from transformers import AutoImageProcessor, LlavaNextImageProcessorPil, LlavaOnevisionImageProcessorPil

    assert type(AutoImageProcessor.from_pretrained(next_dir)) is LlavaNextImageProcessorPil
    assert type(AutoImageProcessor.from_pretrained(onevision_dir)) is LlavaOnevisionImageProcessorPil


def test_pixel_values_equal_hf_processor(next_dir, onevision_dir):
    tiles_seen = set()
    for label, proc, cfg in _processors(next_dir, onevision_dir):
        spec = AnyResSpec.from_processor_config(cfg)
        for name, img in IMAGES.items():
            want = proc(img, return_tensors="np")
            got, size = preprocess_anyres(img, spec)
            ref = want["pixel_values"][0]
            assert got.dtype == np.float32 and got.shape == ref.shape, f"{label} / {name}: {got.shape} != {ref.shape}"
            diff = np.abs(got.astype(np.float64) - ref)
            assert diff.max() == 0, f"{label} / {name}: max |vlexport - HF| = {diff.max():.3g} in tile " \
                                    f"{np.unravel_index(diff.argmax(), diff.shape)[0]} of {len(ref)}"
            assert tuple(want["image_sizes"][0]) == size, f"{label} / {name}"
            tiles_seen.add((label, len(ref)))
    # The images really exercise different grids (not one shape 40 times).
    for label in ("next_tiny", "onevision_tiny", "next_336", "onevision_384"):
        assert len({n for lab, n in tiles_seen if lab == label}) >= 3, (label, sorted(tiles_seen))


def test_views_are_padded_with_zeros_centred():
    """A 10 x 40 (w x h) image in a 56 x 112 pinpoint: fitted to 28 x 112 and centred, 14 zero columns each side."""
    cfg = {"image_processor_type": "LlavaNextImageProcessor", "size": {"shortest_edge": 56},
           "crop_size": {"height": 56, "width": 56}, "image_grid_pinpoints": [[112, 56]]}
    spec = AnyResSpec.from_processor_config(cfg)
    views = anyres_views(np.full((40, 10, 3), 200, np.uint8), spec)
    assert [v.shape for v in views] == [(56, 56, 3)] * 3
    grid = np.concatenate(views[1:], axis=0)  # the two tiles, top then bottom
    assert (grid[:, :14] == 0).all() and (grid[:, 42:] == 0).all() and (grid[:, 14:42] == 200).all()


def _next_token_count(processor, img) -> int:
    ids = processor(text="<image>", images=img, return_tensors="np")["input_ids"][0]
    return int((ids == processor.image_token_id).sum())


def _model_lengths(model, image_processor, img) -> tuple[int, tuple[int, int]]:
    """The HF model's packed feature length for the image, from its own get_image_features."""
    import torch

    inputs = image_processor(img, return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    return int(feats[0].shape[0]), tuple(int(v) for v in inputs["image_sizes"][0])


def test_token_counts_equal_hf(next_dir, onevision_dir):
    from transformers import (AutoImageProcessor, AutoProcessor, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil, LlavaNextProcessor, LlavaOnevisionForConditionalGeneration)

    next_proc = AutoProcessor.from_pretrained(next_dir)
    counts = {}
    for family, d, cls in ((NEXT, next_dir, LlavaNextForConditionalGeneration),
                           (ONEVISION, onevision_dir, LlavaOnevisionForConditionalGeneration)):
        geo = AnyResGeometry.from_config(json.loads((d / "config.json").read_text()))
        model = cls.from_pretrained(d).eval()
        image_processor = AutoImageProcessor.from_pretrained(d)
        for name, img in IMAGES.items():
            length, size = _model_lengths(model, image_processor, img)
            assert size == (img.height, img.width)
            assert geo.num_image_tokens(size) == length, f"{family} / {name}: vlexport {geo.num_image_tokens(size)}, " \
                                                         f"HF model {length}"
            if family == NEXT:  # LlavaOnevisionProcessor cannot be built without torchvision
                assert _next_token_count(next_proc, img) == length, f"{name}: processor vs model"
            counts.setdefault(family, set()).add(length)
    assert len(counts[NEXT]) >= 4 and len(counts[ONEVISION]) >= 4, counts
    # Full-size llava-v1.6 geometry (336-px tiles, 24 x 24 features): the processor's count for each image.
    full = LlavaNextProcessor(image_processor=LlavaNextImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}), tokenizer=next_proc.tokenizer,
        patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    geo = AnyResGeometry.from_config({"model_type": NEXT, "vision_config": {"image_size": 336, "patch_size": 14}})
    for name, img in IMAGES.items():
        assert geo.num_image_tokens((img.height, img.width)) == _next_token_count(full, img), name
    assert geo.num_image_tokens((672, 672)) == 576 + 48 * 48 + 48  # llava-v1.6's 2 x 2 worst case: 2928


SIZES = [(img.height, img.width) for img in IMAGES.values()] + [(1, 1), (60, 60), (61, 97), (333, 100), (97, 2000)]


@pytest.mark.parametrize("family", [NEXT, ONEVISION])
def test_pack_features_equals_hf_pack_image_features(next_dir, onevision_dir, family):
    import torch
    from transformers import LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    d = next_dir if family == NEXT else onevision_dir
    cls = LlavaNextForConditionalGeneration if family == NEXT else LlavaOnevisionForConditionalGeneration
    model = cls.from_pretrained(d).eval()
    geo = AnyResGeometry.from_config(json.loads((d / "config.json").read_text()))
    newline = model.model.image_newline.detach().numpy()
    rng = np.random.default_rng(0)
    shrunk = 0
    for size in SIZES:
        feats = rng.standard_normal((geo.num_tiles(size), geo.side**2, newline.shape[0])).astype(np.float32)
        kw = {"vision_feature_select_strategy": "default"} if family == NEXT else {}
        with torch.no_grad():
            want, lens = model.model.pack_image_features([torch.from_numpy(feats)], torch.tensor([size]),
                                                         image_newline=model.model.image_newline, **kw)
        want = want[0].numpy()
        got = pack_features(feats, size, geo, newline)
        assert got.shape == want.shape == (geo.num_image_tokens(size), newline.shape[0]), (size, got.shape, want.shape)
        rows, cols = geo.packed_grid(size)
        if (rows, cols) != (lambda t, b, l, r: (b - t, r - l))(*_unpadded(geo, size)):
            # OneVision's anyres_max_9 shrink: PyTorch's bilinear kernel sums in float32 along a size-dependent
            # path, so a few float32 ulps separate it from vlexport's float64 sums of the same weights.
            shrunk += 1
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max(), err_msg=str(size))
        else:
            assert np.array_equal(got, want), f"{family} {size}: max diff {np.abs(got - want).max():.3g}"
        # The same packing as a gather (what a graph would do): exact copies for NeXT, the shrink's weights for OV.
        index, weight = pack_plan(size, geo)
        via_plan = pack_with_plan(feats, newline, index, weight)
        assert index.shape == weight.shape == (geo.num_image_tokens(size), 4)
        np.testing.assert_allclose(via_plan, want, rtol=0, atol=2e-5 * np.abs(want).max(), err_msg=str(size))
        if family == NEXT:
            assert np.array_equal(via_plan, want), size
        # The layout: the global view first, then every row of the grid ends with the newline vector.
        assert np.array_equal(got[: geo.side**2], feats[0])
        ends = got[geo.side**2:].reshape(rows, cols + 1, newline.shape[0])[:, -1]
        assert np.array_equal(ends, np.broadcast_to(newline, ends.shape))
    assert (shrunk > 0) == (family == ONEVISION), shrunk


def _unpadded(geo, size):
    from vlexport.anyres import unpad_bounds

    rows, cols = geo.grid(size)
    return unpad_bounds((rows * geo.side, cols * geo.side), size)


def test_onevision_multi_image_equals_hf(onevision_dir):
    """Several images in one prompt: OneVision pads each to a mean-coloured square, one view, side^2 + 1 tokens."""
    import torch
    from transformers import AutoImageProcessor, LlavaOnevisionForConditionalGeneration

    from vlexport.anyres import preprocess_multi_image

    proc = AutoImageProcessor.from_pretrained(onevision_dir)
    spec = AnyResSpec.from_processor_config(proc.to_dict())
    names = ["wide_chelsea_451x300", "tall_50x700", "rgba_logo_500", "tiny_17x40"]
    imgs = [IMAGES[n] for n in names]
    out = proc([imgs], return_tensors="pt")
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(onevision_dir).eval()
    with torch.no_grad():
        feats = model.model.get_image_features(out["pixel_values"], out["image_sizes"],
                                               batch_num_images=out["batch_num_images"]).pooler_output
    geo = AnyResGeometry.from_config(json.loads((onevision_dir / "config.json").read_text()))
    newline = model.model.image_newline.detach().numpy()
    for i, (name, img) in enumerate(zip(names, imgs)):
        got, size = preprocess_multi_image(img, spec)
        assert size == (img.height, img.width)
        assert np.array_equal(got, out["pixel_values"][i][:1].numpy()), name
        assert feats[i].shape[0] == geo.num_image_tokens(size, multi_image=True) == geo.side**2 + 1, name
        one = np.random.default_rng(i).standard_normal((1, geo.side**2, newline.shape[0])).astype(np.float32)
        with torch.no_grad():
            want, _ = model.model.pack_image_features([torch.from_numpy(one)], torch.tensor([size]),
                                                      image_newline=model.model.image_newline)
        assert np.array_equal(pack_features(one, size, geo, newline), want[0].numpy()), name


def test_max_image_tokens_is_the_worst_case():
    """Brute force over image sizes on a small geometry: nothing exceeds max_image_tokens, and its size reaches it."""
    for geo in (AnyResGeometry(NEXT, ((56, 112), (112, 56), (112, 112), (168, 56), (56, 168)), 56, 14),
                AnyResGeometry(ONEVISION, tuple((60 * i, 60 * j) for i in range(1, 7) for j in range(1, 7)), 60, 14,
                               max_num_patches=9)):
        best, size = geo.max_image_tokens()
        assert geo.num_image_tokens(size) == best
        top = max(geo.num_image_tokens((h, w)) for h in range(1, 400, 3) for w in range(1, 400, 7))
        assert top <= best, (geo.family, top, best)


def test_select_best_resolution_equals_hf():
    from transformers.image_processing_utils import select_best_resolution as hf_select

    pins = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    for size in SIZES + [(336, 672), (700, 300), (100, 3000)]:
        assert select_best_resolution(size, pins) == tuple(hf_select(size, pins)), size


def test_errors_name_the_setting():
    with pytest.raises(VlexportError, match="image_grid_pinpoints"):
        AnyResSpec.from_processor_config({"image_processor_type": "LlavaNextImageProcessor",
                                          "image_grid_pinpoints": [[336]]})
    with pytest.raises(VlexportError, match="image_processor_type 'CLIPImageProcessor'"):
        AnyResSpec.from_processor_config({"image_processor_type": "CLIPImageProcessor"})
    with pytest.raises(VlexportError, match="model_type 'llava'"):
        AnyResGeometry.from_config({"model_type": "llava"})
    with pytest.raises(VlexportError, match="vision_aspect_ratio 'anyres'"):
        AnyResGeometry.from_config({"model_type": ONEVISION, "vision_aspect_ratio": "anyres"})
    geo = AnyResGeometry(NEXT, ((56, 112),), 56, 14)
    with pytest.raises(VlexportError, match="1 \\+ 1 x 2 tiles of 16 features"):
        pack_features(np.zeros((2, 16, 8), np.float32), (50, 100), geo)

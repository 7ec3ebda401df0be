"""CLIP image preprocessing and prompt expansion, identical to the base's Hugging Face processor, without torch.

Mirrors transformers' PIL backend step by step (convert RGB onto white, shortest-edge bicubic resize with
int() rounding, centre crop with // offsets, rescale in float64 then float32, normalize in float32).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import VlexportError


@dataclass(frozen=True)
class ImageSpec:
    shortest_edge: int | None
    height: int | None
    width: int | None
    crop_height: int
    crop_width: int
    resample: int
    rescale_factor: float
    mean: tuple
    std: tuple
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @classmethod
    def from_processor_config(cls, cfg: dict) -> "ImageSpec":
        ip = cfg.get("image_processor", cfg)
        size = ip.get("size", {"shortest_edge": 224})
        crop = ip.get("crop_size", {"height": 224, "width": 224})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        return cls(
            shortest_edge=size.get("shortest_edge"),
            height=size.get("height"),
            width=size.get("width"),
            crop_height=int(crop["height"]),
            crop_width=int(crop["width"]),
            resample=int(ip.get("resample", 3)),
            rescale_factor=float(ip.get("rescale_factor", 1 / 255)),
            mean=tuple(ip.get("image_mean", (0.48145466, 0.4578275, 0.40821073))),
            std=tuple(ip.get("image_std", (0.26862954, 0.26130258, 0.27577711))),
            do_resize=ip.get("do_resize", True),
            do_center_crop=ip.get("do_center_crop", True),
            do_rescale=ip.get("do_rescale", True),
            do_normalize=ip.get("do_normalize", True),
            do_convert_rgb=ip.get("do_convert_rgb", True),
        )


# The most pixels an image may have. It bounds what decoding can allocate (a 100 MP RGBA image is 400 MB) and refuses
# decompression bombs (a small PNG that decodes to 20000 x 20000) before a byte of pixel data is decoded. CLIP sees
# 224-336 px squares, so nothing near the limit is needed: downscale larger images first.
MAX_IMAGE_PIXELS = 100_000_000


def _too_large(path, size, why: str = "") -> VlexportError:
    what = f"is {size[0]} x {size[1]} = {size[0] * size[1]:,} pixels" if size else f"has too many pixels ({why})"
    return VlexportError(
        f"--image '{path}' {what}, over vlexport's limit of {MAX_IMAGE_PIXELS:,} pixels "
        "(vlexport.preprocess.MAX_IMAGE_PIXELS; a decompression bomb or an oversized scan): downscale it first, "
        "e.g. to 4000 px on its longest side"
    )


def open_image(path: str | Path):
    """A decoded PIL image, or a VlexportError naming the file: missing, unreadable or corrupt, or over
    MAX_IMAGE_PIXELS (checked from the header, before decoding)."""
    import struct
    import warnings
    import zlib

    from PIL import Image, UnidentifiedImageError

    if Path(path).is_dir():
        raise VlexportError(f"--image '{path}' is a directory; pass an image file (PNG or JPEG)")
    try:
        with warnings.catch_warnings():
            # PIL's own bomb check warns from MAX_IMAGE_PIXELS and raises at twice that; ours is MAX_IMAGE_PIXELS.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise _too_large(path, img.size)
            img.load()
        return img
    except Image.DecompressionBombError as e:
        raise _too_large(path, None, str(e).rstrip(".")) from None
    except FileNotFoundError:
        raise VlexportError(f"--image '{path}' does not exist") from None
    except PermissionError:
        raise VlexportError(f"--image '{path}' cannot be read (permission denied)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
        # PIL reports corrupt or truncated data with any of these
        raise VlexportError(
            f"--image '{path}' is not a readable image ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt data'}); "
            "pass a PNG or JPEG file (a truncated download? copy it again)"
        ) from None


def _to_rgb(img):
    from PIL import Image

    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def preprocess_image(image, spec: ImageSpec) -> np.ndarray:
    """A PIL image (or HWC uint8 array) -> float32 [3, H, W] exactly as the HF processor makes it."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if spec.do_convert_rgb:
        image = _to_rgb(image)
    if spec.do_resize:
        w, h = image.size
        if spec.shortest_edge:
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
            new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
        else:
            new_h, new_w = spec.height, spec.width
        if new_w * new_h > MAX_IMAGE_PIXELS:  # an extreme aspect ratio (1 x 100000) would resize to billions of pixels
            raise VlexportError(
                f"the image is {w} x {h} pixels: resizing its short side to {spec.shortest_edge} would make it "
                f"{new_w} x {new_h}, over vlexport's limit of {MAX_IMAGE_PIXELS:,} pixels; crop it to a less "
                "extreme aspect ratio first"
            )
        image = image.resize((new_w, new_h), resample=spec.resample)
    arr = np.moveaxis(np.array(image), -1, 0)
    if spec.do_center_crop:
        arr = _center_crop(arr, spec.crop_height, spec.crop_width)
    if spec.do_rescale:
        arr = (arr.astype(np.float64) * spec.rescale_factor).astype(np.float32)
    if spec.do_normalize:
        arr = arr.astype(np.float32) if not np.issubdtype(arr.dtype, np.floating) else arr
        mean = np.array(spec.mean, dtype=arr.dtype)
        std = np.array(spec.std, dtype=arr.dtype)
        arr = ((arr.T - mean) / std).T
    return np.ascontiguousarray(arr, dtype=np.float32)


def _center_crop(arr: np.ndarray, ch: int, cw: int) -> np.ndarray:
    _, h, w = arr.shape
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return arr[:, top : top + ch, left : left + cw]
    # Smaller than the crop: zero-pad around it first, as transformers does.
    nh, nw = max(ch, h), max(cw, w)
    padded = np.zeros((arr.shape[0], nh, nw), dtype=arr.dtype)
    tp, lp = -(-(nh - h) // 2), -(-(nw - w) // 2)
    padded[:, tp : tp + h, lp : lp + w] = arr
    top, left = top + tp, left + lp
    return padded[:, max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]


def expand_image_tokens(text: str, image_token: str, num_image_tokens: int) -> str:
    """LlavaProcessor's expansion: each image placeholder becomes one placeholder per visual token."""
    return text.replace(image_token, image_token * num_image_tokens)

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


def open_image(path: str | Path):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
        return img
    except (FileNotFoundError, IsADirectoryError):
        raise VlexportError(f"--image '{path}' does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise VlexportError(f"--image '{path}' is not a readable image ({e}); pass a PNG or JPEG file") from None


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

"""LLaVA-NeXT (1.6) and LLaVA-OneVision any-resolution preprocessing and feature packing, without torch.

Matches transformers 5.x's PIL backend, `LlavaNextImageProcessorPil` / `LlavaOnevisionImageProcessorPil`: that is
the class `AutoImageProcessor.from_pretrained(dir)` returns for a llava-next / llava-onevision directory when
torchvision is not installed, which is vlexport's own environment (torchvision is not a dependency). With torchvision
installed transformers defaults to its torchvision backend (`LlavaNextImageProcessor`), whose bicubic resize is not
Pillow's and gives different pixel values; pass `backend="pil"` there to get the values this module reproduces.

The steps, as HF does them for one image (h x w):
  1. best = select_best_resolution((h, w), image_grid_pinpoints): the pinpoint that keeps most of the image's pixels,
     then wastes the fewest;
  2. resize to fit inside `best` keeping the aspect ratio (patch_output_size: ceil on the scaled side), then pad to
     `best` with zeros (value 0 before normalisation, i.e. black), centred with the odd pixel at the bottom/right;
  3. cut the padded image into tile x tile crops, row-major, and put the global view first: the whole image resized
     (aspect ratio not kept) to the base size;
  4. each of those then goes through the ordinary per-tile CLIP steps (resize, centre crop, rescale, normalise), done
     here by vlexport.preprocess.preprocess_image.

The model side (LlavaNextModel.pack_image_features): the tiles' projected features are laid back out as one grid,
the rows or columns the padding added are cut (unpad), OneVision shrinks the grid by bilinear interpolation when it
holds more than max_num_patches tiles' worth (anyres_max_9), one `image_newline` vector ends every row, and the
global view's features go first. num_image_tokens gives the resulting length for an image size, as
LlavaNextProcessor / LlavaOnevisionProcessor count the `<image>` placeholders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import VlexportError
from .preprocess import ImageSpec, _to_rgb, preprocess_image

NEXT = "llava_next"
ONEVISION = "llava_onevision"

# transformers' defaults when a config leaves image_grid_pinpoints out (LlavaNextImageProcessorPil and
# LlavaOnevisionConfig): 336-px tiles up to 1x3 / 3x1 / 2x2 for NeXT, 384-px tiles up to 6x6 for OneVision.
NEXT_DEFAULT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
ONEVISION_DEFAULT_PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))


# -- geometry shared by the processor and the model ------------------------------------------------------------------
def select_best_resolution(image_size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """transformers.image_processing_utils.select_best_resolution: image_size and pinpoints are (height, width)."""
    h, w = image_size
    best, best_effective, best_wasted = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        wasted = ph * pw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(ph), int(pw)), effective, wasted
    if best is None:
        raise VlexportError(f"image_grid_pinpoints {list(pinpoints)!r} gives no resolution for a {w} x {h} image: "
                            "the processor config needs at least one [height, width] pair of positive sizes")
    return best


def patch_output_size(image_size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """get_patch_output_size: the (height, width) the image is resized to so it fits `target` with its aspect ratio."""
    h, w = image_size
    th, tw = target
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        return min(math.ceil(h * scale_w), th), tw
    return th, min(math.ceil(w * scale_h), tw)


def grid_shape(image_size: tuple[int, int], pinpoints, tile: int) -> tuple[int, int]:
    """get_anyres_image_grid_shape: (rows, columns) of tiles for an image of (height, width)."""
    h, w = select_best_resolution(image_size, pinpoints)
    return h // tile, w // tile


def num_tiles(image_size: tuple[int, int], pinpoints, tile: int) -> int:
    """image_size_to_num_patches: the tiles the vision tower runs on, the global view included."""
    h, w = select_best_resolution(image_size, pinpoints)
    return len(range(0, h, tile)) * len(range(0, w, tile)) + 1


def unpad_bounds(grid_hw: tuple[int, int], image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """unpad_image's cut, as (top, bottom, left, right) slice bounds on a feature grid of grid_hw = (rows, cols)."""
    cur_h, cur_w = grid_hw
    h, w = image_size
    if w / h > cur_w / cur_h:
        new_h = int(round(h * (cur_w / w), 7))
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    new_w = int(round(w * (cur_h / h), 7))
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


def _max_num_patches(vision_aspect_ratio: str | None) -> int | None:
    if vision_aspect_ratio is None:
        return None
    try:
        # transformers reads it with str.strip("anyres_max_"): a character set, so "anyres_max_9" -> "9"
        return int(vision_aspect_ratio.strip("anyres_max_"))
    except ValueError:
        raise VlexportError(f"vision_aspect_ratio '{vision_aspect_ratio}' is not of the form 'anyres_max_N' "
                            "(LLaVA-OneVision uses 'anyres_max_9'): fix it in the model's config.json") from None


@dataclass(frozen=True)
class AnyResGeometry:
    """What the model side needs: tiles of `tile` px cut into (tile // patch)^2 features each.

    max_num_patches: OneVision's anyres_max_N (None for LLaVA-NeXT: no interpolation).
    base_extra: features the global view adds beyond the grid (LlavaNextProcessor's num_additional_image_tokens minus
    the CLS that the 'default' feature strategy drops; 0 for both llava-hf families)."""

    family: str
    grid_pinpoints: tuple[tuple[int, int], ...]
    tile: int
    patch: int
    max_num_patches: int | None = None
    base_extra: int = 0
    newline: bool = True

    @property
    def side(self) -> int:
        return self.tile // self.patch

    @classmethod
    def from_config(cls, config: dict) -> "AnyResGeometry":
        """From a llava_next / llava_onevision config.json (a dict)."""
        family = config.get("model_type")
        if family not in (NEXT, ONEVISION):
            raise VlexportError(f"config.json has model_type '{family}': any-resolution geometry is for "
                                f"'{NEXT}' and '{ONEVISION}' models")
        vision = config.get("vision_config") or {}
        tile = int(vision.get("image_size", 336 if family == NEXT else 384))
        patch = int(vision.get("patch_size", 14))
        pinpoints = config.get("image_grid_pinpoints") or (NEXT_DEFAULT_PINPOINTS if family == NEXT
                                                            else ONEVISION_DEFAULT_PINPOINTS)
        max_n = _max_num_patches(config.get("vision_aspect_ratio", "anyres_max_9")) if family == ONEVISION else None
        return cls(family, _pinpoints(pinpoints, "config.json image_grid_pinpoints"), tile, patch, max_n)

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return grid_shape(image_size, self.grid_pinpoints, self.tile)

    def num_tiles(self, image_size: tuple[int, int]) -> int:
        return num_tiles(image_size, self.grid_pinpoints, self.tile)

    def packed_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """(rows, cols) of the unpadded (and for OneVision, shrunk) feature grid; each row gets one newline."""
        rows, cols = self.grid(image_size)
        top, bottom, left, right = unpad_bounds((rows * self.side, cols * self.side), image_size)
        h, w = bottom - top, right - left
        ratio = self._shrink_ratio(h, w)
        if ratio is not None:
            h, w = int(h // ratio), int(w // ratio)
        return h, w

    def _shrink_ratio(self, h: int, w: int) -> float | None:
        if self.max_num_patches is None:
            return None
        ratio = math.sqrt(h * w / (self.max_num_patches * self.side**2))
        return ratio if ratio > 1.1 else None

    def num_image_tokens(self, image_size: tuple[int, int], multi_image: bool = False) -> int:
        """The `<image>` placeholders the processor writes for an image of (height, width) = the packed length.

        multi_image: OneVision's count for an image among several in one prompt (one view and a newline)."""
        if multi_image:
            if self.family != ONEVISION:
                raise VlexportError("multi_image counts are LLaVA-OneVision's; LLaVA-NeXT tiles every image")
            return self.side**2 + self.base_extra + (1 if self.newline else 0)
        h, w = self.packed_grid(image_size)
        return self.side**2 + self.base_extra + h * w + (h if self.newline else 0)

    def max_image_tokens(self) -> tuple[int, tuple[int, int]]:
        """The worst case over image sizes and an image size that reaches it: (tokens, (height, width)).

        A count depends on the image through its pinpoint and the unpadded extent of the feature grid, so the
        candidates are, for every pinpoint, images that fill it on one side and reach each feature extent on the
        other (the pinpoint itself included)."""
        candidates = set()
        for ph, pw in self.grid_pinpoints:
            rows, cols = ph // self.tile * self.side, pw // self.tile * self.side
            candidates.update((ph, max(1, math.ceil(e * pw / cols))) for e in range(1, cols + 1))
            candidates.update((max(1, math.ceil(e * ph / rows)), pw) for e in range(1, rows + 1))
        return max((self.num_image_tokens(s), s) for s in sorted(candidates))

    def max_tiles(self) -> int:
        return max(len(range(0, h, self.tile)) * len(range(0, w, self.tile)) + 1 for h, w in self.grid_pinpoints)


# -- the processor ---------------------------------------------------------------------------------------------------
def _pinpoints(value, where: str) -> tuple[tuple[int, int], ...]:
    try:
        pts = tuple((int(h), int(w)) for h, w in value)
    except (TypeError, ValueError):
        raise VlexportError(f"{where} must be a list of [height, width] pairs, got {value!r}") from None
    if not pts or any(h <= 0 or w <= 0 for h, w in pts):
        raise VlexportError(f"{where} must be a non-empty list of positive [height, width] pairs, got {value!r}")
    return pts


@dataclass(frozen=True)
class AnyResSpec:
    """The image processor's settings: per-tile CLIP/SigLIP steps plus the tiling."""

    family: str
    tile_spec: ImageSpec  # the per-tile resize / crop / rescale / normalise
    grid_pinpoints: tuple[tuple[int, int], ...]
    tile: int  # the crop side the padded image is cut into (HF's patch_size in get_image_patches)
    base_hw: tuple[int, int]  # the size the global view is resized to

    @classmethod
    def from_processor_config(cls, cfg: dict, family: str | None = None) -> "AnyResSpec":
        """From processor_config.json / preprocessor_config.json (fields under "image_processor" when present)."""
        ip = dict(cfg.get("image_processor", cfg))
        kind = ip.get("image_processor_type", "")
        if family is None:
            family = ONEVISION if "Onevision" in kind else NEXT if "LlavaNext" in kind else None
        if family not in (NEXT, ONEVISION):
            raise VlexportError(f"processor config has image_processor_type '{kind}': any-resolution preprocessing "
                                "is for LlavaNextImageProcessor and LlavaOnevisionImageProcessor")
        default_size = {"shortest_edge": 224} if family == NEXT else {"height": 384, "width": 384}
        size = ip.get("size") or default_size
        ip["size"] = size
        crop = ip.get("crop_size")
        if family == NEXT and crop is None and "crop_size" not in ip:
            crop = {"height": 224, "width": 224}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if family == ONEVISION and "do_center_crop" not in ip:
            ip["do_center_crop"] = False  # LlavaOnevisionImageProcessorPil: do_center_crop = None
        # The tile side: crop height, else the fixed resize height, else the shortest edge (as _preprocess picks it).
        if crop and crop.get("height"):
            tile = int(crop["height"])
        elif size.get("height"):
            tile = int(size["height"])
        else:
            tile = int(size["shortest_edge"])
        if size.get("height") and size.get("width"):
            base = (int(size["height"]), int(size["width"]))
        else:
            base = (int(size["shortest_edge"]), int(size["shortest_edge"]))
        # ImageSpec wants a crop size even when no crop is done (OneVision's crop_size is null).
        ip["crop_size"] = crop or {"height": tile, "width": tile}
        pinpoints = ip.get("image_grid_pinpoints") or (NEXT_DEFAULT_PINPOINTS if family == NEXT
                                                       else ONEVISION_DEFAULT_PINPOINTS)
        return cls(family, ImageSpec.from_processor_config(ip),
                   _pinpoints(pinpoints, "processor config image_grid_pinpoints"), tile, base)


def anyres_views(image, spec: AnyResSpec) -> list[np.ndarray]:
    """The uint8 HWC views before the per-tile steps: the global view, then the padded image's tiles, row-major."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if spec.tile_spec.do_convert_rgb:
        image = _to_rgb(image)
    w, h = image.size
    best = select_best_resolution((h, w), spec.grid_pinpoints)
    nh, nw = patch_output_size((h, w), best)
    resample = spec.tile_spec.resample
    fitted = np.array(image.resize((nw, nh), resample=resample))
    # _get_padding_size: divmod halves, the odd pixel goes after (bottom / right); the fill is 0.
    top, left = (best[0] - nh) // 2, (best[1] - nw) // 2
    padded = np.zeros((best[0], best[1], fitted.shape[2]), dtype=fitted.dtype)
    padded[top:top + nh, left:left + nw] = fitted
    t = spec.tile
    tiles = [padded[i:i + t, j:j + t] for i in range(0, best[0], t) for j in range(0, best[1], t)]
    base = np.array(image.resize((spec.base_hw[1], spec.base_hw[0]), resample=resample))
    return [base] + tiles


def preprocess_anyres(image, spec: AnyResSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """A PIL image (or HWC uint8 array) -> (pixel_values float32 [tiles, 3, H, W], image_size (height, width)).

    Equal to the HF processor's pixel_values[0] (for one image; a batch pads the tile axis with zeros to the largest
    tile count) and image_sizes[0]."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    size = (image.height, image.width)
    tiles = [preprocess_image(view, spec.tile_spec) for view in anyres_views(image, spec)]
    return np.stack(tiles), size


def preprocess_multi_image(image, spec: AnyResSpec) -> tuple[np.ndarray, tuple[int, int]]:
    """LLaVA-OneVision's path for an image among several in one prompt: no tiling, one view, padded to a square
    with the mean colour (int(mean * 255) per channel, centred) before the per-view steps. -> ([1, 3, H, W], size)."""
    from PIL import Image

    if spec.family != ONEVISION:
        raise VlexportError("the multi-image path (one padded view per image) is LLaVA-OneVision's; LLaVA-NeXT tiles "
                            "every image")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if spec.tile_spec.do_convert_rgb:
        image = _to_rgb(image)
    arr = np.array(image)
    h, w = arr.shape[:2]
    side = max(h, w)
    square = np.empty((side, side, arr.shape[2]), dtype=arr.dtype)
    square[:] = np.array([int(m * 255) for m in spec.tile_spec.mean], dtype=arr.dtype)
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = arr
    return preprocess_image(square, spec.tile_spec)[None], (h, w)


# -- the model: packing tile features into the placeholder sequence --------------------------------------------------
def _bilinear_axis(n_in: int, n_out: int):
    """PyTorch's bilinear source indices and weights on one axis (align_corners=False, float32 input): the scale
    in / out, the source index and its fraction in float32 as PyTorch computes them, the index clamped at 0.
    -> (i0, i1, w0, w1), weights as float64."""
    f = np.float32
    src = np.maximum((np.arange(n_out, dtype=f) + f(0.5)) * (f(n_in) / f(n_out)) - f(0.5), f(0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    l1 = np.clip(src - i0.astype(f), f(0), f(1)).astype(np.float64)
    return i0, np.minimum(i0 + 1, n_in - 1), 1.0 - l1, l1


def _bilinear(grid: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """torch.nn.functional.interpolate(mode="bilinear", align_corners=False) of a [C, H, W] array: PyTorch's indices
    and weights (_bilinear_axis), the sums in float64, rounded once to the dtype. PyTorch's CPU kernel sums in
    float32 along a path that depends on the output size and thread count, so its result is within a few float32
    ulps of this one, not bit-equal."""
    y0, y1, hy0, hy1 = _bilinear_axis(grid.shape[1], out_h)
    x0, x1, wx0, wx1 = _bilinear_axis(grid.shape[2], out_w)
    g = grid.astype(np.float64)
    top = g[:, y0][:, :, x0] * wx0 + g[:, y0][:, :, x1] * wx1
    bottom = g[:, y1][:, :, x0] * wx0 + g[:, y1][:, :, x1] * wx1
    return (top * hy0[:, None] + bottom * hy1[:, None]).astype(grid.dtype)


def pack_features(tile_features: np.ndarray, image_size: tuple[int, int], geometry: AnyResGeometry,
                  image_newline: np.ndarray | None = None) -> np.ndarray:
    """LlavaNextModel.pack_image_features (and LlavaOnevisionModel's) for one image, in numpy.

    tile_features: [tiles, side * side, D], the projector's output for the global view then the grid tiles, as the
    vision part returns them. Returns [num_image_tokens(image_size), D]: the global view's features, then the unpadded
    grid row by row, each row followed by image_newline (when given)."""
    feats = np.asarray(tile_features)
    if feats.ndim != 3:
        raise VlexportError(f"tile features must be [tiles, tokens, dim], got shape {feats.shape}")
    n, tokens, dim = feats.shape
    side = geometry.side
    if n == 1:  # a single view (OneVision's multi-image path): no grid to unpad
        out = feats[0]
        return np.concatenate([out, image_newline[None].astype(out.dtype)]) if image_newline is not None else out
    rows, cols = geometry.grid(image_size)
    if tokens != side * side or n - 1 != rows * cols:
        raise VlexportError(
            f"tile features have shape {feats.shape} but a {image_size[0]} x {image_size[1]} (h x w) image needs "
            f"1 + {rows} x {cols} tiles of {side * side} features: preprocess it with the same image_grid_pinpoints "
            f"({list(geometry.grid_pinpoints)}) and tile size ({geometry.tile})")
    base = feats[0]
    # [rows, cols, side, side, D] -> [D, rows * side, cols * side], as view + permute(4, 0, 2, 1, 3) + flatten
    grid = feats[1:].reshape(rows, cols, side, side, dim).transpose(4, 0, 2, 1, 3).reshape(dim, rows * side, cols * side)
    top, bottom, left, right = unpad_bounds(grid.shape[1:], image_size)
    grid = grid[:, top:bottom, left:right]
    ratio = geometry._shrink_ratio(*grid.shape[1:])
    if ratio is not None:
        grid = _bilinear(np.ascontiguousarray(grid), int(grid.shape[1] // ratio), int(grid.shape[2] // ratio))
    if image_newline is not None:
        nl = np.broadcast_to(np.asarray(image_newline, dtype=grid.dtype)[:, None, None], (dim, grid.shape[1], 1))
        grid = np.concatenate([grid, nl], axis=2)
    packed = grid.reshape(dim, -1).T
    return np.concatenate([base, packed.astype(base.dtype)], axis=0)


def pack_plan(image_size: tuple[int, int], geometry: AnyResGeometry, num_tiles: int | None = None,
              multi_image: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """pack_features as a gather: (index int64 [T, 4], weight float32 [T, 4]) with T = num_image_tokens.

    Row t of the packed sequence is sum_k weight[t, k] * table[index[t, k]], where table is the vision part's output
    flattened to [tiles * side^2, D] with the newline vector appended as its last row (index tiles * side^2).
    LLaVA-NeXT rows are plain copies (weights 1, 0, 0, 0); OneVision's shrink puts its bilinear weights here. The
    shapes then depend on the image only through T, so a graph (or a TensorRT engine) can do the packing with
    Gather + Mul + ReduceSum and one dynamic axis."""
    side = geometry.side
    n = 1 if multi_image else (num_tiles if num_tiles is not None else geometry.num_tiles(image_size))
    newline_row = n * side * side
    rows: list[tuple[list[int], list[float]]] = [([i, i, i, i], [1.0, 0.0, 0.0, 0.0]) for i in range(side * side)]
    if n > 1:
        grid_rows, grid_cols = geometry.grid(image_size)
        # the feature grid's (r, c) -> its row in the table: tile (r // side, c // side), patch (r % side, c % side)
        full_r, full_c = np.meshgrid(np.arange(grid_rows * side), np.arange(grid_cols * side), indexing="ij")
        src = (1 + (full_r // side) * grid_cols + full_c // side) * side * side + (full_r % side) * side + full_c % side
        top, bottom, left, right = unpad_bounds(src.shape, image_size)
        src = src[top:bottom, left:right]
        h, w = src.shape
        ratio = geometry._shrink_ratio(h, w)
        if ratio is None:
            cells = [([int(src[r, c])] * 4, [1.0, 0.0, 0.0, 0.0]) for r in range(h) for c in range(w)]
            out_h, out_w = h, w
        else:
            out_h, out_w = int(h // ratio), int(w // ratio)
            y0, y1, hy0, hy1 = _bilinear_axis(h, out_h)
            x0, x1, wx0, wx1 = _bilinear_axis(w, out_w)
            cells = [([int(src[y0[r], x0[c]]), int(src[y0[r], x1[c]]), int(src[y1[r], x0[c]]), int(src[y1[r], x1[c]])],
                      [hy0[r] * wx0[c], hy0[r] * wx1[c], hy1[r] * wx0[c], hy1[r] * wx1[c]])
                     for r in range(out_h) for c in range(out_w)]
        for r in range(out_h):
            rows += cells[r * out_w:(r + 1) * out_w]
            if geometry.newline:
                rows.append(([newline_row] * 4, [1.0, 0.0, 0.0, 0.0]))
    elif geometry.newline:
        rows.append(([newline_row] * 4, [1.0, 0.0, 0.0, 0.0]))
    index = np.array([r[0] for r in rows], dtype=np.int64).reshape(-1, 4)
    weight = np.array([r[1] for r in rows], dtype=np.float64).reshape(-1, 4)
    return index, weight.astype(np.float32)


def pack_with_plan(tile_features: np.ndarray, image_newline: np.ndarray, index: np.ndarray,
                   weight: np.ndarray) -> np.ndarray:
    """What a graph does with pack_plan's tables: Gather rows of [features; newline], weight them, sum the four."""
    feats = np.asarray(tile_features)
    table = np.concatenate([feats.reshape(-1, feats.shape[-1]), np.asarray(image_newline, feats.dtype)[None]])
    return (table[index].astype(np.float64) * weight[..., None].astype(np.float64)).sum(1).astype(feats.dtype)

"""Parity (and calibration) data: real photos that ship with scikit-image, or a user folder.

A user folder holds images and prompts.jsonl, one JSON object per line:
  {"image": "cat.jpg", "prompt": "What is this?"}          chat template applied
  {"image": "cat.jpg", "raw_prompt": "USER: <image>\\n..."}  used verbatim
  {"image": "skimage:rocket", "prompt": "..."}             a photo that ships with scikit-image
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import VlexportError

BUILTIN_IMAGES = ("astronaut", "chelsea", "coffee")  # square, 451x300, 600x400
BUILTIN_PROMPTS = ("What is shown in this image?", "Describe the photo in one sentence.")


@dataclass
class Case:
    name: str
    image: object  # PIL image
    prompt: str | None = None
    raw_prompt: str | None = None


def builtin_cases() -> list[Case]:
    import skimage.data
    from PIL import Image

    cases = []
    for img_name in BUILTIN_IMAGES:
        image = Image.fromarray(getattr(skimage.data, img_name)())
        for i, prompt in enumerate(BUILTIN_PROMPTS):
            cases.append(Case(f"{img_name}/p{i}", image, prompt=prompt))
    return cases


def folder_cases(folder: str | Path) -> list[Case]:
    from ..preprocess import open_image

    folder = Path(folder)
    index = folder / "prompts.jsonl"
    if not index.exists():
        raise VlexportError(f"--data '{folder}' has no prompts.jsonl; see the README for its format")
    cases = []
    for n, line in enumerate(index.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise VlexportError(f"'{index}' line {n} is not valid JSON ({e})") from None
        if "image" not in entry or ("prompt" in entry) == ("raw_prompt" in entry):
            raise VlexportError(f"'{index}' line {n} needs 'image' and exactly one of 'prompt' or 'raw_prompt'")
        image = _skimage_photo(entry["image"][8:], index, n) if entry["image"].startswith("skimage:") \
            else open_image(folder / entry["image"])
        cases.append(Case(f"{entry['image']}/l{n}", image, entry.get("prompt"), entry.get("raw_prompt")))
    if not cases:
        raise VlexportError(f"'{index}' lists no cases")
    return cases


def _skimage_photo(name: str, index: Path, line: int):
    """A photo bundled with scikit-image (no download): skimage.data.NAME(), or a file in its data folder."""
    import skimage
    import skimage.data
    from PIL import Image

    files = {p.stem: p for p in (Path(skimage.__file__).parent / "data").glob("*") if p.suffix in (".png", ".jpg")}
    if name in files:
        image = Image.open(files[name])
        image.load()
        return image
    if callable(getattr(skimage.data, name, None)):
        return Image.fromarray(getattr(skimage.data, name)())
    raise VlexportError(f"'{index}' line {line}: scikit-image ships no photo '{name}'; use one of {', '.join(sorted(files))}")

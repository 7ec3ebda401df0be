"""Small file helpers shared by every stage: checksums, JSON that fails with a message naming the file, and ONNX
files with their external data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import VlexportError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_json(path: Path, fix: str = "") -> dict:
    """JSON from `path`; a missing or malformed file is a VlexportError naming it (and `fix`, if given)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise VlexportError(f"'{path}' does not exist{'; ' + fix if fix else ''}") from None
    except json.JSONDecodeError as e:
        raise VlexportError(f"'{path}' is not valid JSON ({e}){'; ' + fix if fix else ''}") from None


def remove_part(path: Path) -> None:
    """Delete an ONNX file and its external data (NAME.onnx.data). onnx appends to an existing data file, so a part
    must be removed before it is written again."""
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `path` so that a reader (or a killed process) never sees half a file: a temporary file beside it, fsynced,
    then renamed over it."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask

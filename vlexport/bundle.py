"""The bundle: manifest.json + parts + tokenizer/preprocessing files, written atomically, checked on load."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .files import read_json, sha256_file
from .errors import VlexportError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


def check_output_path(out: Path, force: bool) -> None:
    out = Path(out)
    if out.exists() and not force:
        raise VlexportError(f"output '{out}' already exists; pass --force to replace it, or choose another -o")
    if out.exists() and not out.is_dir():
        raise VlexportError(f"output '{out}' exists and is not a directory")


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool):
    """Yield a temporary directory beside `out`; on success it replaces `out` in one rename, on failure it vanishes."""
    out = Path(out).resolve()
    check_output_path(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "bundle")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(bundle_dir: Path, manifest: dict) -> dict:
    """Record every file's sha256 and write manifest.json (last, so a manifest means a finished bundle)."""
    files = {}
    for f in sorted(bundle_dir.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            files[f.relative_to(bundle_dir).as_posix()] = sha256_file(f)
    manifest = {"schema_version": SCHEMA_VERSION, **manifest, "files": files}
    (bundle_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_manifest(bundle_dir: Path, verify_files: bool = True) -> dict:
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if not path.exists():
        raise VlexportError(f"'{bundle_dir}' is not a vlexport bundle (no {MANIFEST}); build one with `vlexport build`")
    manifest = read_json(path, fix="rebuild the bundle")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise VlexportError(
            f"bundle '{bundle_dir}' has manifest schema {version}; this vlexport reads schema {SCHEMA_VERSION}: rebuild it"
        )
    if verify_files:
        for rel, digest in manifest.get("files", {}).items():
            f = bundle_dir / rel
            if not f.exists():
                raise VlexportError(f"bundle '{bundle_dir}' is missing '{rel}'; copy the whole bundle directory")
            if sha256_file(f) != digest:
                raise VlexportError(
                    f"bundle file '{f}' does not match its sha256 in {MANIFEST}: it changed or was corrupted after "
                    "the build; rebuild the bundle or copy it again"
                )
    return manifest


def onnx_io(onnx_path: Path) -> dict:
    """Inputs and outputs of an ONNX file, with dtypes and symbolic shapes, for the manifest."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)

    def describe(values):
        out = []
        for v in values:
            t = v.type.tensor_type
            shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape})
        return out

    return {"inputs": describe(model.graph.input), "outputs": describe(model.graph.output), "opset": model.opset_import[0].version}

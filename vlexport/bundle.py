"""The bundle: manifest.json + parts + tokenizer/preprocessing files, written atomically, sealed, checked on load.

Sealing (schema 2). manifest.json's `files` maps every file under the bundle directory (relative POSIX path) to
{"sha256", "bytes"}; manifest.json is the one file not in it. The manifest seals itself: `manifest_sha256` is the
sha256 of the manifest without that key, serialized canonically (json.dumps with sort_keys=True,
separators=(",", ":"), ensure_ascii=True). The seal lives inside manifest.json rather than in a second file so that
re-sealing (`vlexport engines`) is one atomic rename: a bundle can never be caught between a new manifest and an old
seal. The seal detects accidental or careless change (an edited manifest, a stray file, a truncated copy); it is not
a signature, and anyone who can write the bundle can also re-seal it.

At load, read_manifest refuses: a manifest whose digest does not match, an old schema, a missing required key, a
missing or empty `files` table, a listed path that is absolute or escapes the bundle (`..`), any symlink or other
non-regular file under the bundle, a file under the bundle that the table does not list, a listed file that is
missing, a size that differs and (with hash_files=True, the default) a sha256 that differs.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

from .errors import VlexportError
from .files import atomic_write_text, sha256_file

SCHEMA_VERSION = 3  # 3: adapter slot inputs have a row axis (slots.py, lora_slots.py)
MANIFEST = "manifest.json"
SEAL_KEY = "manifest_sha256"
# Keys every manifest must have (dotted = nested); the runtime reads all of them.
REQUIRED_KEYS = (
    "schema_version", "vlexport_version", "target", "target.name", "parts",
    "model", "model.image_token_id", "model.num_image_tokens", "model.vocab_size", "model.hidden_size",
    "model.num_layers", "model.num_kv_heads", "model.head_dim",
    "tokenizer", "tokenizer.file", "tokenizer.image_token",
    "preprocessing", "preprocessing.image", "generation", "generation.eos_token_ids", "files",
)
REQUIRED_PARTS = ("vision", "embed", "decoder")
PART_KEYS = ("file", "precision", "inputs", "outputs")
# A partial or replaced directory that nobody holds a lock on is stale once it is this old (a fresh one is locked
# within microseconds of its creation; the age only guards those microseconds).
STALE_AFTER_S = 10.0
_HEX64 = re.compile(r"[0-9a-f]{64}")


# -- paths -------------------------------------------------------------------------------------------------------

def check_relpath(rel: object, where: str = "manifest") -> str:
    """`rel` as a safe bundle-relative POSIX path, or a VlexportError naming it (absolute, `..`, empty...)."""
    if not isinstance(rel, str) or not rel:
        raise VlexportError(f"{where}: path {rel!r} is not a file name; rebuild the bundle")
    p = PurePosixPath(rel)
    if p.is_absolute() or rel.startswith("\\") or re.match(r"^[A-Za-z]:", rel):
        raise VlexportError(f"{where}: path '{rel}' is absolute; a bundle names its files relative to its own "
                            "directory: rebuild the bundle")
    if any(part in ("..", ".", "") for part in rel.replace("\\", "/").split("/")):
        raise VlexportError(f"{where}: path '{rel}' escapes the bundle directory (or is not normalized); "
                            "rebuild the bundle")
    return rel


def bundle_file(bundle_dir: Path, rel: object, where: str = "manifest") -> Path:
    """The one way to join a manifest path to the bundle directory: refuses absolute and escaping paths, and a
    path through a symlink that leaves the bundle."""
    rel = check_relpath(rel, where)
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / rel
    root = os.path.realpath(bundle_dir)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise VlexportError(f"{where}: '{rel}' resolves to '{real}', outside the bundle '{bundle_dir}' (a symlink); "
                            "bundles hold plain files only: copy the bundle without symlinks (cp -rL) or rebuild it")
    return path


# -- output directory --------------------------------------------------------------------------------------------

def is_vlexport_bundle(path: Path) -> bool:
    """A directory whose manifest.json was written by vlexport (any schema; its seal is not checked here)."""
    m = Path(path) / MANIFEST
    if not Path(path).is_dir() or Path(path).is_symlink() or not m.is_file():
        return False
    try:
        data = json.loads(m.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and {"schema_version", "vlexport_version", "parts"} <= set(data)


def _nearest_existing(path: Path) -> Path:
    p = path
    while not os.path.lexists(p) and p != p.parent:
        p = p.parent
    return p


def check_output_path(out: Path, force: bool) -> None:
    """Refuse an -o that the build could not write, before any work is done."""
    out = Path(os.path.abspath(out))
    if out.is_symlink():
        raise VlexportError(f"-o '{out}' is a symbolic link; give the directory itself as -o")
    if out.exists():
        if not out.is_dir():
            raise VlexportError(f"-o '{out}' is a file, not a bundle directory; choose another -o")
        if not force:
            raise VlexportError(f"output '{out}' already exists; pass --force to replace it, or choose another -o")
        if not is_vlexport_bundle(out):
            what = "an empty directory" if not any(out.iterdir()) else "a directory without a vlexport manifest.json"
            raise VlexportError(f"-o '{out}' is {what}, not a vlexport bundle: --force replaces only a bundle that "
                                "vlexport wrote, so it was left untouched; remove it yourself or choose another -o")
    parent = _nearest_existing(out.parent)
    if not parent.is_dir():
        raise VlexportError(f"-o '{out}': '{parent}' is a file, so no directory can be created under it; "
                            "choose another -o")
    effective = os.access in os.supports_effective_ids
    if not os.access(parent, os.W_OK | os.X_OK, effective_ids=effective):
        raise VlexportError(f"-o '{out}': cannot write in '{parent}' (permission denied or read-only); the bundle is "
                            "written beside -o and renamed into place: choose a writable -o")


def _lock_dir(path: Path) -> int:
    """An fd holding an exclusive flock on a directory: the lock follows the inode through renames and ends when
    the process does (however it ends)."""
    import fcntl

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove_stale(out: Path, log: Callable[[str], None]) -> None:
    """Delete `.NAME.partial-*` / `.NAME.old-*` beside `out` left by builds that were killed.

    A live build holds a flock on its directory; one that nobody locks (and that is not brand new) is stale."""
    import fcntl

    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(partial|old)-")
    for entry in sorted(out.parent.iterdir()):
        if not pattern.match(entry.name) or entry.is_symlink() or not entry.is_dir():
            continue
        try:
            fd = os.open(entry, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    log(f"'{entry}' belongs to a build that is still running; left alone")
                else:
                    log(f"'{entry}' cannot be locked ({e}); left alone, remove it yourself if no build is running")
                continue
            if time.time() - entry.stat().st_mtime < STALE_AFTER_S:
                continue
            shutil.rmtree(entry, ignore_errors=True)
            if entry.exists():
                log(f"could not remove '{entry}', left by an earlier build that was killed; remove it yourself")
            else:
                log(f"removed '{entry}', left by an earlier build that was killed")
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(out: Path, force: bool, log: Callable[[str], None] = lambda m: None) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success it becomes `out`, on failure it vanishes.

    Replacing a bundle (--force): the old one is moved aside, the new one moved in, then the old one deleted, so
    at every instant `out` is one whole bundle (or, for a moment between the two renames, absent while both copies
    exist beside it). Stale directories of killed builds are removed first, and logged."""
    out = Path(os.path.abspath(out))
    check_output_path(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out, log)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    fds = [_lock_dir(tmp)]
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a bundle is read by other users
        yield tmp
        check_output_path(out, force)  # out may have changed while the build ran
        if out.exists():
            old = out.parent / f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
            try:
                fds.append(_lock_dir(out))
            except BlockingIOError:
                raise VlexportError(f"-o '{out}' is being replaced by another build right now; wait for it and run "
                                    "this build again, or choose another -o") from None
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            _fsync_dir(out.parent)
            shutil.rmtree(old, ignore_errors=True)
            if old.exists():
                log(f"the replaced bundle could not be deleted: '{old}'; the next build removes it")
        else:
            os.rename(tmp, out)
            _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for fd in fds:
            os.close(fd)


# -- sealing ------------------------------------------------------------------------------------------------------

def _canonical(manifest: dict) -> dict:
    """The manifest as JSON gives it back (tuples -> lists, keys -> str), so the digest survives a round trip."""
    return json.loads(json.dumps(manifest))


def manifest_digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != SEAL_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _walk(bundle_dir: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(relpath, lstat) of every non-directory entry under bundle_dir; symlinks and special files are refused."""
    bundle_dir = Path(bundle_dir)
    for root, dirs, names in os.walk(bundle_dir, followlinks=False):
        for name in sorted(dirs) + sorted(names):
            path = Path(root) / name
            rel = path.relative_to(bundle_dir).as_posix()
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                raise VlexportError(f"bundle '{bundle_dir}': '{rel}' is a symbolic link (to '{os.readlink(path)}'); "
                                    "a bundle holds plain files only: copy the bundle without links (cp -rL) or "
                                    "rebuild it")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise VlexportError(f"bundle '{bundle_dir}': '{rel}' is not a regular file; remove it or rebuild "
                                    "the bundle")
            yield rel, st


def write_manifest(bundle_dir: Path, manifest: dict) -> dict:
    """Seal the bundle: record every file's sha256 and size, and write manifest.json with its own digest (last and
    atomically, so a manifest means a finished bundle). `files`, `schema_version` and the seal of `manifest` are
    replaced, so a manifest read back may be sealed again (after `vlexport engines`)."""
    bundle_dir = Path(bundle_dir)
    files = {}
    for rel, st in _walk(bundle_dir):
        if rel != MANIFEST:
            files[rel] = {"sha256": sha256_file(bundle_dir / rel), "bytes": st.st_size}
    body = {k: v for k, v in manifest.items() if k not in ("schema_version", "files", SEAL_KEY)}
    sealed = _canonical({"schema_version": SCHEMA_VERSION, **body, "files": files})
    sealed[SEAL_KEY] = manifest_digest(sealed)
    atomic_write_text(bundle_dir / MANIFEST, json.dumps(sealed, indent=2) + "\n")
    return sealed


def reseal(bundle_dir: Path) -> dict:
    """Seal a bundle again after changing its files on purpose (tests that alter a weight to prove parity fails,
    a hand-edited manifest). Checks nothing: the caller vouches for the content."""
    path = Path(bundle_dir) / MANIFEST
    return write_manifest(Path(bundle_dir), json.loads(path.read_text()))


def _lookup(manifest: dict, dotted: str):
    node = manifest
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return KeyError
        node = node[key]
    return node


def check_manifest_keys(manifest: dict, where: str) -> None:
    """Every key the runtime reads, and every path the manifest names, checked before anything opens a file."""
    fix = "the manifest is damaged or not vlexport's: rebuild the bundle"
    for key in REQUIRED_KEYS:
        if _lookup(manifest, key) is KeyError:
            raise VlexportError(f"{where} has no '{key}' (a required key); {fix}")
    if not isinstance(manifest["parts"], dict):
        raise VlexportError(f"{where}: 'parts' is not an object; {fix}")
    for part in REQUIRED_PARTS:
        if part not in manifest["parts"]:
            raise VlexportError(f"{where} has no 'parts.{part}' (a required key); {fix}")
    for part, entry in manifest["parts"].items():
        for key in PART_KEYS:
            if not isinstance(entry, dict) or key not in entry:
                raise VlexportError(f"{where} has no 'parts.{part}.{key}' (a required key); {fix}")
    for key, rel in manifest_paths(manifest):
        check_relpath(rel, f"{where} '{key}'")


def manifest_paths(manifest: dict) -> list[tuple[str, object]]:
    """(key, path) for every bundle file the manifest names outside `files`."""
    out: list[tuple[str, object]] = [(f"parts.{n}.file", p.get("file")) for n, p in manifest["parts"].items()]
    out.append(("tokenizer.file", manifest["tokenizer"]["file"]))
    if manifest.get("chat_template"):
        out.append(("chat_template.file", manifest["chat_template"].get("file")))
    if (manifest.get("parity") or {}).get("report"):
        out.append(("parity.report", manifest["parity"]["report"]))
    for name, task in (manifest.get("tasks") or {}).items():
        if task.get("pack"):
            out.append((f"tasks.{name}.pack", task["pack"]))
        out += [(f"tasks.{name}.parts.{p}", rel) for p, rel in (task.get("parts") or {}).items()]
    engines = manifest.get("engines") or {}
    for key in ("script", "timing_cache"):
        if engines.get(key):
            out.append((f"engines.{key}", engines[key]))
    for name, p in (engines.get("parts") or {}).items():
        out += [(f"engines.parts.{name}.file", p.get("file")), (f"engines.parts.{name}.onnx", p.get("onnx"))]
    return out


def read_manifest(bundle_dir: Path, verify_files: bool = True, hash_files: bool = True,
                  allow_unlisted: Iterable[str] = ()) -> dict:
    """The bundle's manifest, after checking its seal and keys; with verify_files, every file under the bundle
    against the table (hash_files=False: sizes only, for a fast `inspect` of a 13 GB bundle).

    allow_unlisted: relative paths that may exist without being listed (`vlexport engines` adopting what
    engines/build.sh wrote); they are not checked."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if path.is_symlink():
        raise VlexportError(f"'{path}' is a symbolic link; a bundle holds plain files only: rebuild the bundle")
    if not path.exists():
        raise VlexportError(f"'{bundle_dir}' is not a vlexport bundle (no {MANIFEST}); build one with `vlexport build`")
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VlexportError(f"'{path}' is not valid JSON ({e}); rebuild the bundle") from None
    if not isinstance(manifest, dict):
        raise VlexportError(f"'{path}' is not a JSON object; rebuild the bundle")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        old = isinstance(version, int) and version < SCHEMA_VERSION
        raise VlexportError(
            f"bundle '{bundle_dir}' has manifest schema {version}; this vlexport reads schema {SCHEMA_VERSION}"
            + (" (sealed bundles: every file listed with its size, the manifest with its own sha256)" if old else "")
            + ": rebuild it with this vlexport (`vlexport build ... -o DIR --force`)"
        )
    seal = manifest.get(SEAL_KEY)
    if not isinstance(seal, str):
        raise VlexportError(f"'{path}' has no '{SEAL_KEY}' (its seal); rebuild the bundle")
    if manifest_digest(manifest) != seal:
        raise VlexportError(f"'{path}' does not match its own sha256 ('{SEAL_KEY}'): the manifest was edited or "
                            "damaged after the build; rebuild the bundle or copy it again")
    check_manifest_keys(manifest, f"'{path}'")
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise VlexportError(f"'{path}' has an empty 'files' table, so nothing in the bundle can be checked; "
                            "rebuild the bundle")
    for rel, entry in files.items():
        check_relpath(rel, f"'{path}' 'files'")
        if rel == MANIFEST or not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not _HEX64.fullmatch(entry["sha256"]) or not isinstance(entry.get("bytes"), int):
            raise VlexportError(f"'{path}' 'files' entry '{rel}' is not {{\"sha256\": hex, \"bytes\": int}}; "
                                "rebuild the bundle")
    for key, rel in manifest_paths(manifest):
        planned = key.startswith("engines.") and (manifest.get("engines") or {}).get("status") != "built"
        if rel not in files and not planned and key != "engines.timing_cache":
            raise VlexportError(f"'{path}' '{key}' names '{rel}', which is not in its 'files' table; rebuild the bundle")
    if verify_files:
        verify_bundle_files(bundle_dir, files, hash_files, allow_unlisted)
    return manifest


def verify_bundle_files(bundle_dir: Path, files: dict, hash_files: bool = True, allow_unlisted: Iterable[str] = ()) -> None:
    bundle_dir = Path(bundle_dir)
    allowed = set(allow_unlisted)
    present = {}
    for rel, st in _walk(bundle_dir):
        if rel == MANIFEST or rel in allowed:
            continue
        if rel not in files:
            raise VlexportError(f"bundle '{bundle_dir}' holds '{rel}', which its {MANIFEST} does not list: a bundle "
                                "is sealed, so a file added after the build is refused; remove it, or rebuild")
        present[rel] = st
    files = {rel: entry for rel, entry in files.items() if rel not in allowed}
    for rel, entry in files.items():
        if rel not in present:
            raise VlexportError(f"bundle '{bundle_dir}' is missing '{rel}'; copy the whole bundle directory")
        size = present[rel].st_size
        if size != entry["bytes"]:
            raise VlexportError(f"bundle file '{bundle_dir / rel}' has {size} bytes, {MANIFEST} says {entry['bytes']}: "
                                "it was truncated or changed after the build; copy the bundle again or rebuild it")
    if hash_files:
        for rel, entry in files.items():
            if sha256_file(bundle_dir / rel) != entry["sha256"]:
                raise VlexportError(
                    f"bundle file '{bundle_dir / rel}' does not match its sha256 in {MANIFEST}: it changed or was "
                    "corrupted after the build; rebuild the bundle or copy it again"
                )


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

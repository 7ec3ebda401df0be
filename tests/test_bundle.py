"""Sealed bundles and atomic, clean output directories (issue 13, items 4, 5, 8 and 9).

One bundle is built for the module; every tampering case works on its own copy (shutil.copytree)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from vlexport.bundle import (
    MANIFEST,
    SCHEMA_VERSION,
    SEAL_KEY,
    atomic_directory,
    bundle_file,
    check_output_path,
    manifest_digest,
    read_manifest,
    reseal,
    write_manifest,
)
from vlexport.cli import app
from vlexport.errors import VlexportError


@pytest.fixture(scope="module")
def sealed(tiny_base, tmp_path_factory):
    from vlexport.build import build

    out = tmp_path_factory.mktemp("sealed") / "bundle"
    build(tiny_base, [], out, verify=False)
    return out


@pytest.fixture
def copy(sealed, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(sealed, dst)
    return dst


def words(text: str) -> str:
    return " ".join(text.split())


def refused(args: list[str], *expected: str):
    """The CLI exits 2 with a message (no unexpected exception, no traceback) naming each of `expected`."""
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2, r.output
    assert not isinstance(r.exception, Exception) or isinstance(r.exception, SystemExit), repr(r.exception)
    out = words(r.output)
    for e in expected:
        assert words(e) in out, out
    return out


def edit_manifest(bundle: Path, change) -> None:
    """Change the manifest and fix its own digest (not the files table): the case must fail on what was changed."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    change(manifest)
    manifest[SEAL_KEY] = manifest_digest(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))


def refuse_load(bundle: Path, match: str, **kwargs):
    with pytest.raises(VlexportError, match=match) as e:
        read_manifest(bundle, **kwargs)
    return str(e.value)


# -- what a sealed bundle is ---------------------------------------------------------------------------------------

def test_every_file_is_listed_with_size_and_sha256(sealed):
    from vlexport.files import sha256_file

    manifest = read_manifest(sealed)
    assert manifest["schema_version"] == SCHEMA_VERSION == 3
    on_disk = {p.relative_to(sealed).as_posix() for p in sealed.rglob("*") if p.is_file()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk
    for rel, entry in manifest["files"].items():
        assert entry == {"sha256": sha256_file(sealed / rel), "bytes": (sealed / rel).stat().st_size}
    assert manifest[SEAL_KEY] == manifest_digest(manifest)
    # Normal permissions (umask), not mkdtemp's 0700.
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(sealed.stat().st_mode) == 0o777 & ~mask
    assert not [p for p in sealed.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_reseal_after_a_deliberate_change(copy):
    (copy / "chat_template.jinja").write_text("{{ messages }}")
    refuse_load(copy, "has 14 bytes")
    reseal(copy)
    assert read_manifest(copy)["files"]["chat_template.jinja"]["bytes"] == 14


# -- refusals at load ----------------------------------------------------------------------------------------------

def test_unlisted_file_is_refused(copy):
    (copy / "extra.onnx").write_bytes(b"planted")
    refuse_load(copy, "holds 'extra.onnx', which its manifest.json does not list")
    refuse_load(copy, "extra.onnx", hash_files=False)  # inspect's fast mode checks it too
    refused(["inspect", str(copy)], "'extra.onnx'", "does not list")
    (copy / "extra.onnx").unlink()
    (copy / "packs").mkdir(exist_ok=True)
    (copy / "packs" / "x.safetensors").write_bytes(b"")
    refuse_load(copy, "packs/x.safetensors")


def test_missing_or_empty_table_is_refused(copy):
    edit_manifest(copy, lambda m: m.update(files={}))
    refuse_load(copy, "empty 'files' table")
    edit_manifest(copy, lambda m: m.pop("files"))
    refused(["inspect", str(copy)], "no 'files' (a required key)")


@pytest.mark.parametrize("path,why", [("/etc/passwd", "is absolute"), ("../outside.onnx", "escapes the bundle"),
                                      ("parts/../../x", "escapes the bundle"), ("C:/x.onnx", "is absolute")])
def test_absolute_and_escaping_paths_are_refused(copy, path, why):
    def in_table(m):
        m["files"][path] = {"sha256": "0" * 64, "bytes": 0}

    edit_manifest(copy, in_table)
    refuse_load(copy, why, verify_files=False)  # refused from the manifest alone, before any file is opened


@pytest.mark.parametrize("path,why", [("/etc/passwd", "is absolute"), ("../outside.onnx", "escapes the bundle")])
def test_a_part_path_outside_the_bundle_is_refused(copy, path, why):
    edit_manifest(copy, lambda m: m["parts"]["vision"].update(file=path))
    out = refused(["inspect", str(copy)], "parts.vision.file", why)
    assert path in out
    with pytest.raises(VlexportError, match=why):
        bundle_file(copy, path)


def test_symlinks_are_refused(copy, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copy(copy / "tokenizer.json", outside)
    (copy / "tokenizer.json").unlink()
    (copy / "tokenizer.json").symlink_to(outside)  # same bytes, but it lives outside the bundle
    refuse_load(copy, "'tokenizer.json' is a symbolic link")
    refused(["inspect", str(copy)], "tokenizer.json", "symbolic link")
    # bundle_file refuses a join that a symlink takes out of the bundle
    with pytest.raises(VlexportError, match="outside the bundle"):
        bundle_file(copy, "tokenizer.json")
    (copy / "tokenizer.json").unlink()
    shutil.copy(outside, copy / "tokenizer.json")
    read_manifest(copy)
    (copy / "linked").symlink_to(tmp_path, target_is_directory=True)  # a link to a directory, even unlisted
    refuse_load(copy, "'linked' is a symbolic link")


def test_manifest_digest_mismatch_is_refused(copy):
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["model"]["num_image_tokens"] += 1  # a plausible edit, digest left as it was
    (copy / MANIFEST).write_text(json.dumps(manifest, indent=2))
    refuse_load(copy, "does not match its own sha256")
    refused(["inspect", str(copy)], "manifest.json", "does not match its own sha256")
    manifest.pop(SEAL_KEY)
    (copy / MANIFEST).write_text(json.dumps(manifest, indent=2))
    refuse_load(copy, f"no '{SEAL_KEY}'")


def test_size_mismatch_missing_file_and_hash_mismatch(copy):
    with open(copy / "chat_template.jinja", "ab") as f:
        f.write(b" ")
    refuse_load(copy, "chat_template.jinja' has .* bytes, manifest.json says", hash_files=False)
    reseal(copy)
    data = bytearray((copy / "chat_template.jinja").read_bytes())
    data[0] ^= 1  # same size, other content
    (copy / "chat_template.jinja").write_bytes(bytes(data))
    read_manifest(copy, hash_files=False)  # sizes only: what `inspect` checks on a 13 GB bundle
    refuse_load(copy, "chat_template.jinja' does not match its sha256")
    import vlexport

    with pytest.raises(VlexportError, match="does not match its sha256"):
        vlexport.load(copy)  # loading hashes every file
    (copy / "tokenizer.json").unlink()
    refuse_load(copy, "is missing 'tokenizer.json'", hash_files=False)


@pytest.mark.parametrize("key", ["model.head_dim", "tokenizer.file", "parts.decoder", "parts.vision.file", "target"])
def test_manifest_missing_a_key_exits_2_naming_it(copy, key):
    def drop(m):
        *path, last = key.split(".")
        node = m
        for k in path:
            node = node[k]
        del node[last]

    edit_manifest(copy, drop)
    refused(["inspect", str(copy)], f"no '{key}' (a required key)")
    refuse_load(copy, f"'{key}'", verify_files=False)


def test_old_schema_is_refused_with_a_fix(copy):
    edit_manifest(copy, lambda m: m.update(schema_version=1))
    refused(["inspect", str(copy)], "manifest schema 1", "reads schema 3", "rebuild it")


def test_genai_open_model_without_task_checks_the_bundle(copy):
    from vlexport.genai import open_model

    (copy / "extra.bin").write_bytes(b"x")
    with pytest.raises(VlexportError, match="extra.bin"):
        open_model(copy)


# -- the output directory -------------------------------------------------------------------------------------------

def test_force_on_a_folder_that_is_not_a_bundle_is_refused_and_untouched(tiny_base, tmp_path):
    folder = tmp_path / "photos"
    (folder / "2024").mkdir(parents=True)
    (folder / "2024" / "cat.jpg").write_bytes(b"precious")
    (folder / "manifest.json").write_text('{"not": "vlexport"}')
    before = sorted((p.relative_to(folder).as_posix(), p.read_bytes() if p.is_file() else b"") for p in folder.rglob("*"))
    refused(["build", "--base", str(tiny_base), "-o", str(folder), "--force", "--no-verify"],
            str(folder), "not a vlexport bundle", "left untouched")
    after = sorted((p.relative_to(folder).as_posix(), p.read_bytes() if p.is_file() else b"") for p in folder.rglob("*"))
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no partial directory either
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(["build", "--base", str(tiny_base), "-o", str(empty), "--force", "--no-verify"], "an empty directory")
    assert empty.is_dir()


def test_force_accepts_a_bundle(sealed):
    check_output_path(sealed, force=True)
    with pytest.raises(VlexportError, match="already exists; pass --force"):
        check_output_path(sealed, force=False)


def test_output_that_is_a_file_or_under_a_file_is_refused_before_any_work(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("x")
    missing_base = tmp_path / "no-such-base"  # the -o check comes first: the base is never looked at
    refused(["build", "--base", str(missing_base), "-o", str(f), "--force"], f"-o '{f}' is a file")
    refused(["build", "--base", str(missing_base), "-o", str(f / "sub" / "bundle")],
            f"-o '{f / 'sub' / 'bundle'}'", f"'{f}' is a file")
    assert f.read_text() == "x"


@pytest.mark.skipif(not hasattr(os, "seteuid"), reason="needs POSIX user ids")
def test_parent_not_writable_is_refused(tmp_path):
    """As root os.access allows everything, so the check runs as `nobody` (effective uid) when the tests run as root;
    a writable directory beside it is the control, so the refusal is about the permission and nothing else."""
    base = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        ro, rw = base / "ro", base / "rw"
        ro.mkdir()
        rw.mkdir()
        os.chmod(ro, 0o555)
        os.chmod(rw, 0o777)
        as_root = os.geteuid() == 0
        if as_root:
            os.seteuid(65534)
        try:
            check_output_path(rw / "bundle", force=False)
            check_output_path(rw / "deeper" / "bundle", force=False)
            with pytest.raises(VlexportError, match=f"-o '{ro / 'bundle'}': cannot write in '{ro}'"):
                check_output_path(ro / "bundle", force=False)
            with pytest.raises(VlexportError, match=f"cannot write in '{ro}'"):
                check_output_path(ro / "a" / "b", force=False)  # the nearest existing parent is what counts
        finally:
            if as_root:
                os.seteuid(0)
    finally:
        os.chmod(base / "ro", 0o755)
        shutil.rmtree(base)


def _fake_bundle(path: Path, tag: str) -> Path:
    path.mkdir(parents=True)
    (path / "tag.txt").write_text(tag)
    (path / MANIFEST).write_text(json.dumps({"schema_version": SCHEMA_VERSION, "vlexport_version": "test",
                                             "parts": {}}))
    return path


def test_replace_keeps_the_old_bundle_until_the_new_one_is_in(tmp_path, monkeypatch):
    out = _fake_bundle(tmp_path / "out", "old")
    with atomic_directory(out, force=True) as tmp:
        assert (out / "tag.txt").read_text() == "old"  # untouched while the new one is written
        (tmp / "tag.txt").write_text("new")
        (tmp / MANIFEST).write_text((out / MANIFEST).read_text())
    assert (out / "tag.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # old one deleted, no partial left

    # A failed build leaves the old bundle as it was, and nothing beside it.
    with pytest.raises(RuntimeError):
        with atomic_directory(out, force=True) as tmp:
            (tmp / "tag.txt").write_text("broken")
            raise RuntimeError("export failed")
    assert (out / "tag.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    # The new one cannot be moved in (fault injected into the second rename): the old one is put back.
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise OSError("injected: disk full")
        return real_rename(src, dst)

    with pytest.raises(OSError, match="injected"):
        with atomic_directory(out, force=True) as tmp:
            (tmp / "tag.txt").write_text("newer")
            monkeypatch.setattr(os, "rename", rename)
    monkeypatch.undo()
    assert calls[0][0] == "out" and ".old-" in calls[0][1] and ".partial-" in calls[1][0]
    assert (out / "tag.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


HOLDER = textwrap.dedent("""\
    import os, signal, sys
    from pathlib import Path
    from vlexport.bundle import atomic_directory
    with atomic_directory(Path(sys.argv[1]), False) as tmp:
        (tmp / "vision.onnx").write_bytes(b"half an export")
        print(tmp, flush=True)
        if sys.argv[2] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.stdin.read()
""")


def test_stale_partial_is_removed_and_logged_a_live_one_is_kept(tmp_path):
    out = tmp_path / "bundle"
    # A build killed mid-export (SIGKILL: no cleanup runs) leaves its partial directory.
    killed = subprocess.run([sys.executable, "-c", HOLDER, str(out), "kill"], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    stale = Path(killed.stdout.strip())
    assert stale.is_dir() and stale.name.startswith(".bundle.partial-")
    old = time.time() - 60
    os.utime(stale, (old, old))
    # Another build is running now, and holds its own partial directory.
    live = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "other"), "wait"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        live_dir = Path(live.stdout.readline().strip())
        os.utime(live_dir, (old, old))
        # a third build of the same -o as the live one
        logged: list[str] = []
        with pytest.raises(RuntimeError):
            with atomic_directory(tmp_path / "other", False, logged.append):
                raise RuntimeError("stop")
        assert live_dir.is_dir()
        assert any(str(live_dir) in m and "still running" in m for m in logged), logged
        logged.clear()
        with atomic_directory(out, False, logged.append) as tmp:
            (tmp / "x").write_text("x")
        assert not stale.exists()
        assert any(str(stale) in m and "removed" in m and "killed" in m for m in logged), logged
    finally:
        live.stdin.close()
        live.wait(timeout=60)
    assert live.returncode == 0 and (tmp_path / "other" / "vision.onnx").is_file()


def test_write_manifest_refuses_a_symlink_in_the_bundle(tmp_path):
    d = tmp_path / "b"
    d.mkdir()
    (d / "a.txt").write_text("a")
    (d / "link").symlink_to(d / "a.txt")
    with pytest.raises(VlexportError, match="'link' is a symbolic link"):
        write_manifest(d, {})

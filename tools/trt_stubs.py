"""Prepare a mypy-usable copy of the `tensorrt-stubs` package:  python tools/trt_stubs.py OUT_DIR

tensorrt-stubs (PyPI; install with `pip install --no-deps "tensorrt-stubs==10.13.0.35.1"`, since its `tensorrt`
dependency cannot be installed here) puts `tensorrt/__init__.pyi` and `tensorrt_bindings/*.pyi` straight into
site-packages without py.typed, so mypy will not use them where they are. This script copies them to OUT_DIR (put it
on MYPYPATH) and patches what stops mypy from reading them:

 1. parameters named with Python keywords are renamed (`in` -> `in_`; the stubs' `out` is not a keyword and stays);
 2. a parameter without a default after ones with defaults (`add_scale_nd(..., channel_axis: int)`) gets `= ...`;
 3. `import tensorrt_libs` (a runtime-only package with no stubs) becomes `tensorrt_libs: Any`.

and two that make the stubs say what they mean, so that more real mistakes are caught:

 4. the module defines `bool: DataType` (trt.bool), which shadows the builtin in every `-> bool` / `x: bool`
    annotation of the same file; annotations are rewritten to `builtins.bool`;
 5. `typing_extensions.Buffer` is used but `typing_extensions` is not imported; the import is added.

Every patched file must then parse (ast.parse); anything else is an error, never a silent skip.
"""

from __future__ import annotations

import ast
import keyword
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

DIST = "tensorrt-stubs"
INSTALL_HINT = f'pip install --no-deps "{DIST}==10.13.0.35.1"   (--no-deps: its `tensorrt` dependency cannot install here)'
PACKAGES = ("tensorrt", "tensorrt_bindings")
REQUIRED = ("tensorrt/__init__.pyi", "tensorrt_bindings/tensorrt.pyi")

DEF_LINE = re.compile(r"^(?P<head>\s*(?:async\s+)?def\s+\w+\s*\()(?P<params>.*)(?P<tail>\)\s*(?:->.*)?:.*)$")
# `bool` in an annotation position (after `: `, `-> `, `[`, `| `, or `, ` when it is not a parameter named bool);
# never the module-level definition `bool: DataType`, which starts its line.
BOOL_ANNOTATION = re.compile(r"(?:(?<=: )|(?<=-> )|(?<=\[)|(?<=\| ))bool\b|(?<=, )bool\b(?!\s*:)")


class StubsError(RuntimeError):
    pass


def find_stub_files() -> dict[str, Path]:
    """Relative path -> installed file, for every .pyi of the tensorrt-stubs distribution in PACKAGES."""
    try:
        dist = metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        raise StubsError(f"the '{DIST}' package is not installed in {sys.executable}; install it with:\n  {INSTALL_HINT}")
    found: dict[str, Path] = {}
    for f in dist.files or []:
        rel = f.as_posix()
        if rel.endswith(".pyi") and rel.split("/", 1)[0] in PACKAGES:
            found[rel] = Path(str(dist.locate_file(f)))
    missing = [r for r in REQUIRED if r not in found or not found[r].is_file()]
    if missing:
        raise StubsError(
            f"'{DIST}' {dist.version} is installed but lacks {', '.join(missing)} (found: {sorted(found) or 'nothing'}); "
            f"reinstall it with:\n  {INSTALL_HINT}"
        )
    return found


def split_params(params: str) -> list[str]:
    """Split a parameter list at top-level commas (annotations may contain brackets with commas)."""
    parts: list[str] = []
    cur: list[str] = []
    depth, quote = 0, ""
    for ch in params:
        if quote:  # inside a string default such as '' or 'a, b'
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


def fix_params(params: str, counts: dict[str, int]) -> str:
    out, seen_default, keyword_only = [], False, False
    for raw in split_params(params):
        p = raw.strip()
        m = re.match(r"\**(\w+)", p)
        name = m.group(1) if m else ""
        if keyword.iskeyword(name):  # patch 1: `in: list[...]` is a SyntaxError
            p = re.sub(rf"^(\**){name}\b", rf"\g<1>{name}_", p)
            counts["keyword parameters"] += 1
        if p in ("*", "/") or p.startswith("*"):
            keyword_only = keyword_only or p.startswith("*") and not p.startswith("**")
            out.append(p)
            continue
        has_default = "=" in p.split(":", 1)[-1] if ":" in p else "=" in p
        if has_default:
            seen_default = True
        elif seen_default and not keyword_only:  # patch 2: non-default parameter after a default one
            p += " = ..."
            counts["non-default after default"] += 1
        out.append(p)
    return ", ".join(out)


def patch(text: str, rel: str, counts: dict[str, int]) -> str:
    lines = []
    for line in text.splitlines():
        m = DEF_LINE.match(line)
        if m:
            line = m["head"] + fix_params(m["params"], counts) + m["tail"]
        # patch 3: tensorrt_libs only exists next to real TensorRT wheels and has no stubs.
        if re.match(r"^\s*(import\s+tensorrt_libs\b|from\s+tensorrt_libs\b)", line):
            line = "tensorrt_libs: _typing.Any  # patched by tools/trt_stubs.py: no stubs for tensorrt_libs"
            counts["tensorrt_libs import"] += 1
        # patch 4: inside annotations, `bool` means the builtin, not the module's `bool: DataType`.
        # (Docstring text such as "x: bool" may be rewritten too; that is harmless.)
        line, n = BOOL_ANNOTATION.subn("builtins.bool", line)
        counts["bool annotations"] += n
        lines.append(line)
    header = ["import builtins", "import typing as _typing"]
    if "typing_extensions." in text and not re.search(r"^import typing_extensions\b", text, re.M):
        header.append("import typing_extensions")  # patch 5
        counts["typing_extensions import"] += 1
    # After `from __future__` (which must stay first) if present.
    at = next((i + 1 for i, l in enumerate(lines) if l.startswith("from __future__")), 0)
    lines[at:at] = header
    out = "\n".join(lines) + "\n"
    try:
        ast.parse(out, filename=rel)
    except SyntaxError as e:
        raise StubsError(f"{rel} still does not parse after patching (line {e.lineno}: {e.msg}); "
                         "this tensorrt-stubs version needs another patch in tools/trt_stubs.py")
    return out


def prepare(out_dir: Path) -> dict[str, int]:
    files = find_stub_files()
    counts = dict.fromkeys(["keyword parameters", "non-default after default", "tensorrt_libs import",
                            "bool annotations", "typing_extensions import"], 0)
    out_dir = Path(out_dir)
    for pkg in PACKAGES:
        shutil.rmtree(out_dir / pkg, ignore_errors=True)
    for rel, src in sorted(files.items()):
        dst = out_dir / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text(patch(src.read_text(encoding="utf-8"), rel, counts), encoding="utf-8")
    for pkg in PACKAGES:
        (out_dir / pkg / "py.typed").write_text("")  # not needed on MYPYPATH, but makes OUT_DIR a proper PEP 561 tree
    # The three patches the stubs are known to need must each have applied; if not, the stubs changed: say so.
    for key in ("keyword parameters", "non-default after default", "tensorrt_libs import"):
        if counts[key] == 0:
            print(f"trt_stubs: note: patch '{key}' found nothing to change in {DIST} "
                  f"{metadata.version(DIST)}", file=sys.stderr)
    return counts


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        return 2
    try:
        counts = prepare(Path(argv[0]))
    except StubsError as e:
        print(f"trt_stubs: error: {e}", file=sys.stderr)
        return 1
    print(f"trt_stubs: wrote {DIST} {metadata.version(DIST)} to {argv[0]} "
          f"({', '.join(f'{k}: {v}' for k, v in counts.items())}); use MYPYPATH={argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

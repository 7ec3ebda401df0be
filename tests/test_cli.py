"""The command line as a script sees it: every command's --json against the schema the README documents, one exit-code
table, help on every argument and option, progress bars only on a terminal, and tables that never cut off a value a
user types back."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import jsonschema
import pytest
import typer.main
from rich.console import Console
from typer._click import Context
from typer.core import TyperArgument
from typer.testing import CliRunner

from vlexport import cli
from vlexport.cli import app
from vlexport.progress import Reporter

README = Path(__file__).resolve().parent.parent / "README.md"


def _schemas() -> dict:
    """The JSON Schemas of the README's "Command line" section, by the command they follow."""
    text = README.read_text()
    section = text[text.index("## Command line"):]
    section = section[:section.index("\n## ", 1)]
    found = re.findall(r"#### `vlexport ([^`]+?) --json`[^\n]*\n(?:(?!#### )[^\n]*\n)*?```json\n(.*?)\n```", section, re.S)
    return {name: json.loads(body) for name, body in found}


SCHEMAS = _schemas()


def validate(command: str, text: str):
    """stdout must be one JSON document that matches the README's schema for `command`."""
    value = json.loads(text)
    jsonschema.validate(value, SCHEMAS[command])
    return value


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_exit(result, code: int):
    """The code, and no traceback: CliRunner keeps an uncaught exception in result.exception, not in the output."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def test_readme_documents_a_schema_for_every_command():
    commands = {"build", "run", "verify", "inspect", "bench", "bench --compare", "plan", "targets", "engines",
                "check-trt", "fixture", "demo", "COMMAND"}
    assert commands <= set(SCHEMAS), commands - set(SCHEMAS)
    for schema in SCHEMAS.values():
        jsonschema.Draft202012Validator.check_schema(schema)


# -- help ------------------------------------------------------------------------------------------------------------
def _walk(command, path=()):
    """Every command of typer's tree (typer vendors click: its classes are not the `click` package's)."""
    yield path, command
    if hasattr(command, "list_commands"):
        ctx = Context(command)
        for name in command.list_commands(ctx):
            yield from _walk(command.get_command(ctx, name), (*path, name))


# typer's type labels (<str>, <path>, <list[str]>) and click's default metavars; PATH and DIR are real metavars.
RAW_TYPE = re.compile(r"^(<(str|int|float|bool|path|text|uuid|list\[.*\]|tuple\[.*\])>|TEXT|INTEGER|FLOAT|BOOLEAN|UUID)(\.\.\.)?$")


def test_every_argument_and_option_has_help_and_a_real_metavar():
    root = typer.main.get_command(app)
    problems, commands = [], []
    for path, command in _walk(root):
        commands.append(path)
        ctx = Context(command, info_name=" ".join(("vlexport", *path)))
        if not (command.help or command.short_help):
            problems.append(f"{' '.join(path)}: no help")
        for param in [*command.get_params(ctx)]:
            if getattr(param, "hidden", False):
                continue
            where = f"vlexport {' '.join(path)} {param.opts[0] if param.opts else param.name}"
            if not getattr(param, "help", None):
                problems.append(f"{where}: no help text")
            shown = param.display_type_rich(ctx)
            if shown and RAW_TYPE.match(shown.strip()):
                problems.append(f"{where}: metavar {shown!r} is a type name")
            if isinstance(param, TyperArgument) and RAW_TYPE.match(param.display_name_raw):
                problems.append(f"{where}: argument named {param.display_name_raw!r}")
    assert len(commands) == 18 and not problems, "\n".join(problems)
    # And as a user sees it: no type names in any rendered help.
    for path, _ in _walk(root):
        r = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert r.exit_code == 0, r.output
        assert not re.search(r"<(bool|str|int|float|path|list\[[^>]*\])>", r.output), (path, r.output)


def test_commands_are_listed_in_the_order_a_user_meets_them():
    r = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    names = re.findall(r"^│ ([a-z][a-z-]*) ", r.output, re.M)
    assert names == ["fixture", "build", "run", "serve", "verify", "inspect", "bench", "plan", "targets", "engines", "check-trt",
                     "demo"], r.output


def test_enumerations_are_choices():
    r = invoke("fixture", "llava", "-o", "x", "--preset", "huge")
    assert_exit(r, 2)
    assert "tiny-gqa" in r.output and "7b-shaped" in r.output
    for args in (["run", "b", "--image", "i", "--prompt", "p", "--backend", "trt"], ["verify", "b", "--oracle", "fp128"],
                 ["build", "--base", "b", "-o", "o", "--adapter-kind", "dora"]):
        assert_exit(invoke(*args), 2)


# -- progress --------------------------------------------------------------------------------------------------------
class RecordingReporter(Reporter):
    """The CLI's Reporter, also keeping every progress step a stage reports while bars are drawn."""

    instances: list = []

    def __init__(self, console, quiet=False):
        super().__init__(console, quiet)
        self.steps = []
        RecordingReporter.instances.append(self)

    @contextlib.contextmanager
    def track(self, description, total=None):
        with super().track(description, total) as advance:
            def step(n=1, note=None):
                if self.live:
                    self.steps.append((description, note))
                advance(n, note)

            yield step


def _recording_console(terminal: bool) -> Console:
    return Console(file=io.StringIO(), record=True, force_terminal=terminal, width=120, log_path=False)


@pytest.fixture
def terminal(monkeypatch):
    """The CLI's stderr console replaced by a recorded terminal (or a recorded non-terminal)."""
    def use(is_terminal: bool):
        console = _recording_console(is_terminal)
        RecordingReporter.instances = []
        monkeypatch.setattr(cli, "console", console)
        monkeypatch.setattr(cli, "Reporter", RecordingReporter)
        return console

    return use


def test_build_json_and_progress_on_a_terminal(tiny_base, bitfit_dump, tmp_path, terminal):
    """The one build of this file: `build --json` on a captured terminal. Progress is reported during the export of
    each part and during verify, and drawn as bars; stdout is the JSON summary alone."""
    console = terminal(True)
    out = tmp_path / "bundle"
    r = invoke("build", "--base", tiny_base, "--adapter", bitfit_dump, "-o", out, "--json")
    assert_exit(r, 0)
    summary = validate("build", r.stdout)
    assert summary["parity"]["passed"] is True and summary["engines"] is None
    assert {p["shipped"] for p in summary["precision"].values()} == {"fp32"}
    assert summary["total_bytes"] >= sum(p["bytes"] for p in summary["parts"].values())
    assert "verify" in summary["stages"] and all(s["seconds"] >= 0 for s in summary["stages"].values())
    steps = RecordingReporter.instances[0].steps
    assert any(d.startswith("export") for d, _ in steps), steps
    assert any("verify" in f"{d} {n or ''}".lower() for d, n in steps), steps
    drawn = console.export_text()
    assert "━" in drawn and re.search(r"export \w+ .*━", drawn), drawn[-3000:]


def test_no_progress_when_not_a_terminal_and_verify_json(full_bundle, terminal):
    console = terminal(False)
    r = invoke("verify", full_bundle, "--json", "--max-new-tokens", "3")
    assert_exit(r, 0)
    report = validate("verify", r.stdout)
    assert report["passed"] is True
    assert RecordingReporter.instances and not RecordingReporter.instances[0].live
    assert not RecordingReporter.instances[0].steps
    raw = console.file.getvalue()
    assert "━" not in raw and "\x1b[" not in raw
    assert raw.strip(), "log lines are still written"


def test_quiet_writes_no_log_lines(full_bundle, tmp_path, photos, terminal):
    console = terminal(True)
    photos["astronaut"].save(tmp_path / "a.png")
    r = invoke("run", full_bundle, "--image", tmp_path / "a.png", "--prompt", "hi", "--max-new-tokens", "2", "-q")
    assert_exit(r, 0)
    assert r.stdout.strip() and not console.export_text().strip()


# -- --json on every other command -----------------------------------------------------------------------------------
def test_run_json(full_bundle, tmp_path, photos):
    photos["chelsea"].save(tmp_path / "c.png")
    r = invoke("run", full_bundle, "--image", tmp_path / "c.png", "--prompt", "What is this?", "--max-new-tokens", "3",
               "--threads", "1", "--json")
    assert_exit(r, 0)
    assert len(validate("run", r.stdout)["token_ids"]) <= 3


def test_inspect_json_and_verify(full_bundle, full_lora, bitfit_dump):
    r = invoke("inspect", full_bundle, "--json")
    assert_exit(r, 0)
    manifest = validate("inspect", r.stdout)
    assert set(manifest["parts"]) == {"vision", "embed", "decoder"}
    for adapter in (full_lora, bitfit_dump):
        r = invoke("inspect", adapter, "--json")
        assert_exit(r, 0)
        validate("inspect", r.stdout)
    r = invoke("inspect", full_bundle, "--verify")
    assert_exit(r, 0)
    assert "checked against their sha256" in r.stdout
    r = invoke("inspect", full_lora, "--verify")
    assert_exit(r, 2)
    assert "not a bundle" in r.output


def test_inspect_reads_the_manifest_without_hashing(full_bundle, tmp_path, monkeypatch):
    """A changed byte is found by --verify (and by loading), not by a plain inspect, which must stay fast on a 7B."""
    import vlexport.bundle

    calls = []
    real = vlexport.bundle.sha256_file
    monkeypatch.setattr(vlexport.bundle, "sha256_file", lambda p: calls.append(p) or real(p))
    assert_exit(invoke("inspect", full_bundle), 0)
    assert not [p for p in calls if Path(p).name != "manifest.json"], calls


def test_plan_and_fixture_json(tmp_path):
    r = invoke("fixture", "llava", "-o", tmp_path / "cfg", "--preset", "7b-shaped", "--config-only", "--json")
    assert_exit(r, 0)
    assert validate("fixture", r.stdout) == {"kind": "llava", "path": str(tmp_path / "cfg"), "preset": "7b-shaped"}
    r = invoke("plan", "--base", tmp_path / "cfg", "--target", "jetson-orin", "--json")
    assert_exit(r, 0)
    assert validate("plan", r.stdout)["fits"] is True
    # Does not fit: exit 2, and stdout is still the one plan (fits: false); the reason goes to stderr.
    r = invoke("plan", "--base", tmp_path / "cfg", "--target", "jetson-orin-nano-8gb", "--json")
    assert_exit(r, 2)
    assert validate("plan", r.stdout)["fits"] is False and "would fit" in r.stderr


def test_fixture_adapters_json_and_output_forms(tiny_base, tmp_path):
    r = invoke("fixture", "lora", tiny_base, "-o", tmp_path / "lora", "--json")
    assert_exit(r, 0)
    assert validate("fixture", r.stdout)["kind"] == "lora" and (tmp_path / "lora" / "adapter_config.json").exists()
    r = invoke("fixture", "bitfit", tiny_base, "--output", tmp_path / "b.safetensors", "--json")
    assert_exit(r, 0)
    assert validate("fixture", r.stdout)["path"] == str(tmp_path / "b.safetensors")
    # The older positional output still works; two different outputs, or none, are refused.
    r = invoke("fixture", "bitfit", tiny_base, tmp_path / "old.safetensors")
    assert_exit(r, 0)
    assert (tmp_path / "old.safetensors").exists()
    r = invoke("fixture", "bitfit", tiny_base, tmp_path / "x.safetensors", "-o", tmp_path / "y.safetensors")
    assert_exit(r, 2)
    assert "give it once" in r.output
    r = invoke("fixture", "bitfit", tiny_base, "--json")
    assert_exit(r, 2)
    assert "-o/--output" in r.output and validate("COMMAND", r.stdout)["exit_code"] == 2


def test_targets_json():
    r = invoke("targets", "--json")
    assert_exit(r, 0)
    rows = validate("targets", r.stdout)
    assert {"cpu", "jetson-orin", "jetson-orin-nano-8gb"} <= {t["name"] for t in rows}


def test_check_trt_json(full_bundle):
    r = invoke("check-trt", full_bundle, "--json")
    assert r.exit_code in (0, 1)
    assert_exit(r, r.exit_code)
    report = validate("check-trt", r.stdout)
    assert report["passed"] == (r.exit_code == 0)


def test_engines_json_error(full_bundle):
    """No TensorRT target (and no TensorRT here): exit 2, and --json gives the error object. (The success schema is
    checked where a stand-in tensorrt module builds engines.)"""
    r = invoke("engines", full_bundle, "--json")
    assert_exit(r, 2)
    error = validate("COMMAND", r.stdout)
    assert "TensorRT" in error["error"] and error["exit_code"] == 2


def test_demo_json(full_bundle, tmp_path, monkeypatch):
    """demo's wiring and --json, with the build replaced by a copy of the session's bundle (a build is tested above)."""
    import vlexport.build
    from vlexport.bundle import read_manifest

    def copy_build(base, adapters, out, force=False, log=None, **_):
        assert [Path(a).name for a in adapters] == ["lora", "bitfit.safetensors"]
        shutil.copytree(full_bundle, out)
        return read_manifest(out)

    monkeypatch.setattr(vlexport.build, "build", copy_build)
    r = invoke("demo", "-o", tmp_path / "demo", "--json")
    assert_exit(r, 0)
    demo = validate("demo", r.stdout)
    assert demo["bundle"] == str(tmp_path / "demo" / "bundle") and demo["token_ids"]


# -- options reach the API; options that cannot apply are refused ------------------------------------------------------
@pytest.fixture
def build_args(monkeypatch):
    """build() replaced by a stub that records its arguments and fails as a user error."""
    import vlexport.build
    from vlexport.errors import VlexportError

    seen = {}

    def stub(base, adapters, out, **kwargs):
        seen.update(kwargs, adapters=adapters)
        raise VlexportError("stub build")

    monkeypatch.setattr(vlexport.build, "build", stub)
    return seen


def test_build_options_are_passed_through(build_args, tmp_path):
    r = invoke("build", "--base", tmp_path, "-o", tmp_path / "o", "--adapter", "a", "--adapter", "t=b", "--layers", "2",
               "--oracle", "fp64", "--strict-precision", "--adapter-kind", "lora", "--json")
    assert_exit(r, 2)
    assert validate("COMMAND", r.stdout) == {"error": "stub build", "exit_code": 2}
    assert build_args["adapters"] == ["a", "t=b"] and build_args["verify_layers"] == 2
    assert build_args["oracle"] == "fp64" and build_args["strict_precision"] is True
    assert build_args["adapter_kind"] == "lora"


def test_verify_layers_is_a_deprecated_alias(build_args, tmp_path):
    r = invoke("build", "--base", tmp_path, "-o", tmp_path / "o", "--verify-layers", "3")
    assert_exit(r, 2)
    assert build_args["verify_layers"] == 3 and "deprecated" in r.output
    assert "--verify-layers" not in invoke("build", "--help").output
    r = invoke("build", "--base", tmp_path, "-o", tmp_path / "o", "--verify-layers", "3", "--layers", "2")
    assert_exit(r, 2)
    assert "disagree" in r.output


def test_verify_passes_name_equals_path_adapters(monkeypatch, tmp_path):
    import vlexport.parity.verify
    from vlexport.errors import VlexportError

    seen = {}

    def stub(bundle, **kwargs):
        seen.update(kwargs)
        raise VlexportError("stub verify")

    monkeypatch.setattr(vlexport.parity.verify, "verify_bundle", stub)
    r = invoke("verify", tmp_path, "--adapter", "vqa=/x/prefix", "--adapter", "/x/lora", "--oracle", "off", "--layers", "1")
    assert_exit(r, 2)
    assert seen["adapters"] == ["vqa=/x/prefix", "/x/lora"] and seen["oracle"] == "off" and seen["layers"] == 1


@pytest.mark.parametrize("args, needle", [
    (["verify", "B", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["run", "B", "--image", "i.png", "--prompt", "p", "--threads", "-1"], "--threads"),
    (["run", "B", "--image", "i.png", "--prompt", "p", "--temperature", "-1"], "--temperature"),
    (["run", "B", "--image", "i.png", "--prompt", "p", "--temperature", "1", "--top-p", "0"], "--top-p"),
    (["bench", "B", "--repeats", "0"], "--repeats"),
    (["bench", "B", "--contexts", "8,x"], "--contexts"),
    (["bench", "B", "--compare", "C", "--plot", "p.png"], "--plot"),
    (["bench", "B", "--compare", "C", "--no-rss"], "--rss"),
    (["bench", "B", "--compare", "C", "--backend", "tensorrt"], "--backend"),
    (["fixture", "llava", "-o", "x", "--weight-scale", "0"], "--weight-scale"),
    (["fixture", "llava", "-o", "x", "--config-only", "--weight-scale", "3"], "--config-only"),
])
def test_refused_before_any_work(args, needle, tmp_path, monkeypatch):
    """Exit 2 naming the option, before a model or a bundle is opened (B does not even exist)."""
    monkeypatch.chdir(tmp_path)
    r = invoke(*args)
    assert_exit(r, 2)
    assert needle in r.output, r.output
    assert not (tmp_path / "x").exists()


def test_errors_in_targets_exit_2(monkeypatch):
    import vlexport.target
    from vlexport.errors import VlexportError

    def broken(name):
        raise VlexportError(f"target profile 'targets/{name}.toml': unknown key 'shapez'")

    monkeypatch.setattr(vlexport.target, "load_target", broken)
    r = invoke("targets")
    assert_exit(r, 2)
    assert "unknown key 'shapez'" in r.output


# -- output that fits the terminal -----------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [40, 60, 80, 99, 100, 120, 160, 200])
def test_targets_never_cut_a_name(width):
    console = Console(file=io.StringIO(), record=True, width=width, color_system=None)
    rows = cli.target_rows()
    cli.print_targets(rows, console)
    text = console.export_text()
    assert "…" not in text
    for row in rows:
        assert re.search(rf"(?<![\w-]){re.escape(row['name'])}(?![\w-])", text), (width, row["name"], text)


@pytest.mark.parametrize("width", [60, 200])
def test_inspect_never_cuts_part_or_file_names(full_bundle, monkeypatch, width):
    console = Console(file=io.StringIO(), record=True, width=width, color_system=None)
    monkeypatch.setattr(cli, "out", console)
    assert_exit(invoke("inspect", full_bundle), 0)
    text = console.export_text()
    for name in ("vision.onnx", "embed.onnx", "decoder.onnx"):
        assert re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", text), (width, name, text)


def test_build_final_line_says_what_shipped_in_fp32(full_bundle, tmp_path, monkeypatch):
    """A part asked for in INT8 that fell back to FP32 is named on the last line (and in --json's precision)."""
    import vlexport.build
    from vlexport.bundle import read_manifest

    def fallback_build(base, adapters, out, **_):
        shutil.copytree(full_bundle, out)
        manifest = read_manifest(out)
        manifest["build"]["precision"]["decoder"] = {"requested": "int8", "shipped": "fp32",
                                                     "reason": "left in FP32: INT8 failed the parity gate"}
        return manifest

    monkeypatch.setattr(vlexport.build, "build", fallback_build)
    r = invoke("build", "--base", tmp_path, "-o", tmp_path / "o")
    assert_exit(r, 0)
    last = " ".join(r.stdout.split())
    assert "bundle written" in last and "decoder requested INT8, shipped FP32 (left in FP32" in last


def test_a_failed_check_is_exit_1_with_the_error_as_json(monkeypatch, tmp_path):
    import vlexport.build
    from vlexport.errors import ParityError

    def failing(*_, **__):
        raise ParityError("--strict-precision: decoder requested int8 ships fp32; the bundle was not written")

    monkeypatch.setattr(vlexport.build, "build", failing)
    r = invoke("build", "--base", tmp_path, "-o", tmp_path / "o", "--strict-precision", "--json")
    assert_exit(r, 1)
    assert validate("COMMAND", r.stdout)["exit_code"] == 1 and "--strict-precision" in r.stderr

"""The vlexport command line. It parses arguments, calls the API and maps errors to exit codes (one table for every
command, README "Command line"): 0 success, 1 a check failed (parity, check-trt, --strict-precision), 2 usage or
input error (the message says what to fix). With --json, stdout carries only the JSON; logs go to stderr."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import math
import os
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup

from .errors import ParityError, VlexportError
from .fixture import PRESETS
from .progress import Reporter
from .target import BACKENDS

# The order a user meets the commands in; `vlexport --help` lists them so.
COMMAND_ORDER = ("fixture", "build", "run", "serve", "verify", "inspect", "bench", "plan", "targets", "engines", "check-trt", "demo")


class _HelpFlagMixin:
    """`--help` is a flag: it takes no value, so it shows no type (typer would render `<bool>`)."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Argument(TyperArgument):
    """An argument whose metavar (BUNDLE, PATH) says what it is shows no type next to it (typer would add `<path>`)."""

    def display_type_rich(self, ctx):
        return None if self.metavar else super().display_type_rich(ctx)


class _Command(_HelpFlagMixin, TyperCommand):
    # typer has no hook for the class of the arguments it makes, so they are given ours here.
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if type(param) is TyperArgument:
                param.__class__ = _Argument


class _Group(_HelpFlagMixin, TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        names = list(self.commands)
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda n: (rank.get(n, len(rank)), names.index(n)))


app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False, cls=_Group,
                  help="Compile LLaVA models and their adapters into bundles that run on ONNX Runtime.")
fixture_app = typer.Typer(no_args_is_help=True, cls=_Group, help="Write small LLaVA models and adapters for tests and demos.")
app.add_typer(fixture_app, name="fixture")
command = functools.partial(app.command, cls=_Command)
fixture_command = functools.partial(fixture_app.command, cls=_Command)
console = Console(stderr=True, log_path=False)
out = Console()

# -- one vocabulary: enumerations and the options several commands share ---------------------------------------------
Backend = Enum("Backend", {b: b for b in BACKENDS}, type=str)
FixturePreset = Enum("FixturePreset", {p: p for p in PRESETS}, type=str)


class AdapterKind(str, Enum):
    lora = "lora"
    bitfit = "bitfit"


class Oracle(str, Enum):
    auto = "auto"
    fp64 = "fp64"
    off = "off"


class Peer(str, Enum):
    onnxruntime_genai = "onnxruntime-genai"


def _json_option(what: str):
    return typer.Option(False, "--json", metavar="",
                        help=f"Print {what} as JSON on stdout (logs go to stderr); the schema is in the README.")


def _quiet_option():
    return typer.Option(False, "--quiet", "-q", metavar="", help="No log lines or progress bars on stderr (errors still print).")


def _threads_option():
    return typer.Option(None, "--threads", min=1, metavar="N",
                        help="CPU threads for ONNX Runtime (and PyTorch in bench). Default: every core this process may use.")


def _backend_option():
    return typer.Option(Backend.onnxruntime.value, "--backend",
                        help="onnxruntime, or tensorrt for engines built on the device.")


def _oracle_option():
    return typer.Option(Oracle.auto.value, "--oracle",
                        help="Float64 evaluation of the reference that both sides are measured against: auto (when it "
                             "fits in memory), fp64 (always) or off (fixed limits only).")


def _default_threads(threads: int | None) -> int:
    return threads or len(os.sched_getaffinity(0))


# With --json, stdout carries the one JSON document. Anything else that prints while the command works (a library's
# own messages) is sent to stderr, and the document goes to the stdout saved here.
_json_stdout: contextvars.ContextVar = contextvars.ContextVar("json_stdout", default=None)


def _handle_errors(fn):
    """VlexportError -> exit 2, ParityError -> exit 1 (or the error's own exit_code), with the message and no traceback.
    With --json the error also goes to stdout as {"error": message, "exit_code": n}."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        as_json = bool(kwargs.get("as_json"))
        token = _json_stdout.set(sys.stdout if as_json else None)
        try:
            with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
                return fn(*args, **kwargs)
        except (VlexportError, ParityError) as e:
            code = getattr(e, "exit_code", 2 if isinstance(e, VlexportError) else 1)
            label = "error" if isinstance(e, VlexportError) else "parity failure"
            console.print(f"[red]{label}:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            if as_json:
                _print_json({"error": str(e), "exit_code": code})
            raise typer.Exit(code) from None
        finally:
            _json_stdout.reset(token)

    return wrapper


def _finite(value):
    """NaN and infinity become null: they are not JSON, and jq and most parsers refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _print_json(value) -> None:
    """The one JSON document of a --json command, on stdout (one line)."""
    print(json.dumps(_finite(value), allow_nan=False), file=_json_stdout.get() or sys.stdout, flush=True)


def _one_output(positional: Optional[Path], output: Optional[Path]) -> Path:
    """-o/--output, or the older positional form; not both, not neither."""
    if positional is not None and output is not None and positional != output:
        raise VlexportError(f"two outputs given ('{positional}' and -o '{output}'); give it once, as -o/--output PATH")
    if positional is None and output is None:
        raise VlexportError("missing -o/--output PATH: where to write")
    return output if output is not None else positional


# -- build ----------------------------------------------------------------------------------------------------------
def _part_bytes(bundle: Path, rel: str) -> int:
    f = bundle / rel
    data = f.with_name(f.name + ".data")
    return (f.stat().st_size if f.exists() else 0) + (data.stat().st_size if data.exists() else 0)


def build_summary(bundle: Path, manifest: dict) -> dict:
    """`vlexport build --json`: what a CI job needs from the manifest (schema in the README)."""
    parts = {name: {"file": p["file"], "precision": p["precision"], "bytes": _part_bytes(bundle, p["file"])}
             for name, p in manifest["parts"].items()}
    tasks = {name: {"pack": t.get("pack"), "bytes": t.get("bytes", 0), "parts_bytes": t.get("parts_bytes", 0),
                    "adapters": [a["kind"] for a in t.get("adapters", [])]}
             for name, t in (manifest.get("tasks") or {}).items()}
    parity = manifest.get("parity")
    engines = manifest.get("engines")
    return {
        "bundle": str(bundle),
        "target": manifest["target"]["name"],
        "backend": manifest["target"]["backend"],
        "parts": parts,
        "precision": manifest["build"]["precision"],
        "tasks": tasks,
        "adapters": [{"kind": a["kind"], "format": a["format"], "path": a["path"], "merged": a["merged"]}
                     for a in manifest.get("adapters", [])],
        "total_bytes": sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()),
        "stages": (manifest.get("build") or {}).get("stages", {}),
        "parity": {"passed": parity["passed"], "report": parity["report"], "oracle": parity.get("oracle", "off"),
                   "oracle_worst_ratio": parity.get("oracle_worst_ratio")} if parity else None,
        "engines": {"status": engines["status"], "reason": engines.get("reason")} if engines else None,
    }


def _downgrades(precision: dict) -> list[str]:
    return [f"{part} requested {p['requested'].upper()}, shipped {p['shipped'].upper()}"
            + (f" ({p['reason']})" if p.get("reason") else "")
            for part, p in precision.items() if p["shipped"] != p["requested"]]


@command()
@_handle_errors
def build(
    base: Path = typer.Option(..., "--base", metavar="DIR", help="Hugging Face LLaVA directory (config.json + safetensors)."),
    adapter: list[str] = typer.Option([], "--adapter", metavar="PATH|NAME=PATH",
                                      help="Adapter file or directory, or NAME=PATH for a bank task; repeat for several."),
    adapter_kind: Optional[AdapterKind] = typer.Option(None, "--adapter-kind", help="Override the detected kind of every --adapter."),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", metavar="ALPHA",
                                               help="LoRA alpha for single-file LoRAs that do not record it (a bare "
                                                    "safetensors without metadata, mlx-lm without scale, kohya without alpha keys)."),
    lora_mode: str = typer.Option("swappable", "--lora-mode", metavar="swappable|merged",
                                  help="A named task's LoRA: fed per request over one base graph (swappable, the "
                                       "default) or merged into a copy of the parts it changes (merged)."),
    target: str = typer.Option("cpu", "--target", metavar="NAME|PATH", help="Target profile name (vlexport targets) or a .toml path."),
    output: Path = typer.Option(..., "-o", "--output", metavar="DIR", help="Bundle directory to write."),
    force: bool = typer.Option(False, "--force", metavar="", help="Replace an existing bundle at -o."),
    verify: bool = typer.Option(True, "--verify/--no-verify", metavar="", help="Run the parity check against PyTorch (default on)."),
    precision: Optional[str] = typer.Option(None, "--precision", metavar="PART=PREC,...",
                                            help="Override the target per part, e.g. vision=int8,decoder=fp16."),
    int8: Optional[str] = typer.Option(None, "--int8", metavar="KEY=VALUE,...",
                                       help="Override the target's \\[int8] options, comma-separated, e.g. calibration=entropy,"
                                            "decoder=weight-only. Keys: calibration, decoder, fallback, form, smoothquant_alpha."),
    int4: Optional[str] = typer.Option(None, "--int4", metavar="KEY=VALUE,...",
                                       help="Override the target's \\[int4] options (INT4 weight-only decoder), e.g. "
                                            "block_size=64,algo=hqq,lm_head=int4. Keys: block_size (32|64|128), algo "
                                            "(rtn|hqq|gptq), symmetric, lm_head (int4|int8), keep (int8|fp32), fallback, awq."),
    calib: Optional[Path] = typer.Option(None, "--calib", metavar="DIR", help="Calibration folder (images + prompts.jsonl); default calib/."),
    layers: Optional[int] = typer.Option(None, "--layers", min=1, metavar="N",
                                         help="Verify only the first N decoder layers (chosen, N=2, when the fp32 reference would not fit in memory)."),
    verify_layers: Optional[int] = typer.Option(None, "--verify-layers", min=1, metavar="N", hidden=True,
                                                help="Deprecated spelling of --layers."),
    oracle: Oracle = _oracle_option(),
    strict_precision: bool = typer.Option(False, "--strict-precision", metavar="",
                                          help="Exit 1 when a part requested in INT8 or FP16 ships in FP32 (fallback)."),
    as_json: bool = _json_option("the bundle's summary (parts, precision requested vs shipped, tasks, sizes, stage times, parity)"),
    quiet: bool = _quiet_option(),
):
    """Merge adapters into the base, export vision/embed/decoder to ONNX, lower their precision, check them and write a bundle."""
    from .build import build as run_build
    from .target import parse_precision_overrides

    if verify_layers is not None:
        if layers is not None and layers != verify_layers:
            raise VlexportError(f"--layers {layers} and --verify-layers {verify_layers} disagree; give --layers only")
        console.print("[yellow]--verify-layers is deprecated: use --layers[/]", highlight=False)
        layers = verify_layers
    # With --strict-precision, build() itself fails (exit 1) before writing when a part ships above its request.
    manifest = run_build(base, adapter, output, target=target, force=force,
                         adapter_kind=AdapterKind(adapter_kind).value if adapter_kind else None, verify=verify,
                         precision=parse_precision_overrides(precision), int8=int8, int4=int4, calib=calib, verify_layers=layers,
                         oracle=Oracle(oracle).value, strict_precision=strict_precision, log=Reporter(console, quiet),
                         lora_alpha=lora_alpha, lora_mode=lora_mode)
    summary = build_summary(Path(output), manifest)
    downgrades = _downgrades(summary["precision"])
    if as_json:
        _print_json(summary)
    else:
        engines = manifest.get("engines")
        if engines and engines["status"] == "planned":
            out.print(f"[yellow]TensorRT engines were not built on this machine[/] ({engines['reason']}). "
                      f"Build them on the device: `bash {output}/engines/build.sh` or `vlexport engines {output}`.",
                      highlight=False)
        parity = manifest.get("parity")
        note = "parity passed" if parity and parity["passed"] else "parity not checked (--no-verify)"
        if parity and parity.get("oracle_worst_ratio") is not None:
            note += f"; against float64 its error is at most {parity['oracle_worst_ratio']:.2g}x PyTorch FP32's own"
        shipped = f"; [yellow]{escape('; '.join(downgrades))}[/]" if downgrades else ""
        out.print(f"[green]bundle written:[/] {escape(str(output))} ({note}){shipped}", highlight=False, soft_wrap=True)


# -- run ------------------------------------------------------------------------------------------------------------
@command()
@_handle_errors
def run(
    bundle: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle directory."),
    image: Optional[Path] = typer.Option(None, "--image", metavar="PATH", help="Image file."),
    prompt: Optional[str] = typer.Option(None, "--prompt", metavar="QUESTION", help="Question; the base's chat template is applied."),
    raw_prompt: Optional[str] = typer.Option(None, "--raw-prompt", metavar="PROMPT", help="Prompt used verbatim, with the <image> placeholder."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, metavar="N", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, metavar="T", help="0 = greedy (default); > 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, metavar="P", help="Nucleus sampling mass, in (0, 1] (with --temperature > 0)."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Sampling seed (with --temperature > 0)."),
    threads: Optional[int] = _threads_option(),
    backend: Backend = _backend_option(),
    task: Optional[str] = typer.Option(None, "--task", metavar="NAME", help="Bank task to answer with (vlexport inspect lists them)."),
    batch: Optional[Path] = typer.Option(None, "--batch", metavar="FILE.jsonl",
                                         help="Many requests decoded together, one JSON object per line: {\"image\", "
                                              "\"prompt\" | \"raw_prompt\", \"task\"?, \"max_new_tokens\"?} (greedy; relative "
                                              "image paths are read from the file's folder). Prints one JSON line per "
                                              "request, in input order."),
    max_batch: int = typer.Option(8, "--max-batch", min=1, metavar="N",
                                  help="With --batch: most requests that share one decode step (each holds a KV cache)."),
    as_json: bool = _json_option("{text, token_ids, timings}"),
    quiet: bool = _quiet_option(),
):
    """Answer a prompt about an image with a bundle (ONNX Runtime, no torch)."""
    from .runtime import Bundle, check_sampling

    check_sampling(max_new_tokens, temperature, top_p)  # before anything is opened
    if batch is not None:
        single = {"--image": image, "--prompt": prompt, "--raw-prompt": raw_prompt, "--task": task}
        given = [name for name, value in single.items() if value is not None]
        if given:
            raise VlexportError(f"--batch takes each request's image, prompt and task from its lines; drop {', '.join(given)}")
        if temperature > 0 or top_p != 1.0 or seed != 0:
            raise VlexportError("--batch decodes greedily; drop --temperature, --top-p and --seed (or run requests one "
                                "by one to sample)")
        requests = read_batch_requests(batch, max_new_tokens)
        loaded = Bundle(bundle, threads=_default_threads(threads), backend=Backend(backend).value)
        for result in loaded.generate_batch(requests, max_batch=max_batch):
            line = {"text": result.text, "token_ids": result.token_ids, "task": result.timings.get("task")}
            if as_json:  # JSON Lines: one document per request, in input order
                _print_json(line)
            else:
                out.print(result.text, highlight=False)
        return
    if image is None:
        raise VlexportError("give --image (one request) or --batch FILE.jsonl (many)")
    if not image.is_file():
        raise VlexportError(f"--image '{image}' does not exist")
    result = Bundle(bundle, threads=_default_threads(threads), backend=Backend(backend).value).generate(
        image, prompt=prompt, raw_prompt=raw_prompt, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, seed=seed, task=task,
        release_vision=True,  # one image: the decoder opens in the vision session's memory
    )
    if as_json:
        _print_json(result.to_dict())
        return
    out.print(result.text, highlight=False)
    if not quiet:
        t = result.timings
        console.print(f"[dim]vision {t['vision_ms']:.0f} ms, prefill {t['prefill_ms']:.0f} ms, "
                      f"decode {t['decode_ms_per_token']:.1f} ms/token, {t['new_tokens']} tokens[/]")


_BATCH_KEYS = ("image", "prompt", "raw_prompt", "task", "max_new_tokens")


def read_batch_requests(path: Path, default_max_new_tokens: int) -> list:
    """`run --batch` lines as Requests, each line checked by name (file:line) before anything runs."""
    from .runtime import Request

    if not path.is_file():
        raise VlexportError(f"--batch '{path}' does not exist")
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"--batch {path}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise VlexportError(f"{where}: not JSON ({e.msg}); write one object per line") from None
        if not isinstance(entry, dict):
            raise VlexportError(f"{where}: expected a JSON object with \"image\" and \"prompt\" or \"raw_prompt\"")
        unknown = sorted(set(entry) - set(_BATCH_KEYS))
        if unknown:
            raise VlexportError(f"{where}: unknown key(s) {', '.join(unknown)}; use {', '.join(_BATCH_KEYS)}")
        if not isinstance(entry.get("image"), str):
            raise VlexportError(f"{where}: \"image\" must be the path of an image file")
        image = Path(entry["image"])
        image = image if image.is_absolute() else path.parent / image
        if not image.is_file():
            raise VlexportError(f"{where}: image '{image}' does not exist")
        if ("prompt" in entry) == ("raw_prompt" in entry):
            raise VlexportError(f"{where}: give exactly one of \"prompt\" (chat template applied) or \"raw_prompt\"")
        text_key = "prompt" if "prompt" in entry else "raw_prompt"
        if not isinstance(entry[text_key], str):
            raise VlexportError(f"{where}: \"{text_key}\" must be a string")
        if entry.get("task") is not None and not isinstance(entry["task"], str):
            raise VlexportError(f"{where}: \"task\" must be a task name (vlexport inspect lists them) or null")
        max_new = entry.get("max_new_tokens", default_max_new_tokens)
        if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
            raise VlexportError(f"{where}: \"max_new_tokens\" must be a whole number of at least 1")
        requests.append(Request(image=image, prompt=entry.get("prompt"), raw_prompt=entry.get("raw_prompt"),
                                task=entry.get("task"), max_new_tokens=max_new))
    if not requests:
        raise VlexportError(f"--batch '{path}' has no requests; write one JSON object per line")
    return requests


# -- serve ----------------------------------------------------------------------------------------------------------
@command()
@_handle_errors
def serve(
    bundle: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle directory to serve (its tasks are the models)."),
    host: str = typer.Option("127.0.0.1", "--host", metavar="ADDRESS", help="Address to listen on (default: loopback only)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, metavar="N", help="TCP port."),
    max_batch: int = typer.Option(4, "--max-batch", min=1, metavar="N", help="Most requests that share one decode step."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, metavar="N", help="Most requests waiting; beyond it the answer is 429 with Retry-After."),
    max_image_bytes: int = typer.Option(20_000_000, "--max-image-bytes", min=1, metavar="BYTES", help="Largest image accepted (413 above it)."),
    max_image_pixels: int = typer.Option(50_000_000, "--max-image-pixels", min=1, metavar="PIXELS", help="Most pixels an image may decode to (a decompression bomb is refused from its header)."),
    allow_local_images: bool = typer.Option(False, "--allow-local-images", metavar="", help="Accept image_url parts that name a local file (path or file://)."),
    request_timeout: float = typer.Option(120.0, "--request-timeout", min=1.0, metavar="SECONDS", help="From arrival to the last token; 504 after it."),
    threads: Optional[int] = _threads_option(),
    quiet: bool = _quiet_option(),
):
    """An OpenAI-compatible chat-completions server over one bundle: /v1/chat/completions, /v1/models, /health, /metrics."""
    from .serve import serve as run_server

    run_server(bundle, host=host, port=port, max_batch=max_batch, max_queue=max_queue, max_image_bytes=max_image_bytes,
               allow_local_images=allow_local_images, threads=_default_threads(threads),
               request_timeout_s=request_timeout, log=Reporter(console, quiet), max_image_pixels=max_image_pixels)


# -- verify ---------------------------------------------------------------------------------------------------------
@command()
@_handle_errors
def verify(
    bundle: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle directory."),
    base: Optional[Path] = typer.Option(None, "--base", metavar="DIR", help="Reference base (default: the one in the manifest)."),
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", metavar="PATH|NAME=PATH",
                                                help="Reference adapters, as build takes them (NAME=PATH for a task); default: the manifest's."),
    data: Optional[Path] = typer.Option(None, "--data", metavar="DIR", help="Folder of images + prompts.jsonl (default: built-in photos)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, metavar="N", help="Greedy tokens per case (teacher-forced and free-running)."),
    layers: Optional[int] = typer.Option(None, "--layers", min=1, metavar="N", help="Compare only the first N decoder layers (large models)."),
    backend: Backend = _backend_option(),
    oracle: Oracle = _oracle_option(),
    as_json: bool = _json_option("the parity report"),
    junit: Optional[Path] = typer.Option(None, "--junit", metavar="PATH", help="Also write the checks as JUnit XML here."),
    quiet: bool = _quiet_option(),
):
    """Prove a bundle matches the PyTorch model as trained. Exit 0 pass, 1 parity failure, 2 bad input."""
    from .parity.report import render_table, write_junit
    from .parity.verify import verify_bundle

    report = verify_bundle(bundle, base=base, adapters=adapter or None, data=data, max_new_tokens=max_new_tokens,
                           layers=layers, backend=Backend(backend).value, log=Reporter(console, quiet),
                           oracle=Oracle(oracle).value)
    if junit:
        write_junit(report, junit)
    if as_json:
        _print_json(report)
    else:
        render_table(report, out)
    if not report["passed"]:
        raise typer.Exit(1)


# -- inspect --------------------------------------------------------------------------------------------------------
def _io_lines(values: list) -> str:
    text = "\n".join(f"{v['name']} {v['dtype']}{v['shape']}" for v in values[:4])
    return text + (f"\n… {len(values) - 4} more" if len(values) > 4 else "")


@command()
@_handle_errors
def inspect(
    path: Path = typer.Argument(..., metavar="PATH", help="A bundle directory or an adapter file/directory."),
    verify_files: bool = typer.Option(False, "--verify", metavar="",
                                      help="Also check every file's sha256 (reads the whole bundle; slow on a 7B)."),
    as_json: bool = _json_option("the manifest (bundle) or the adapter's description"),
    lora_alpha: Optional[float] = typer.Option(None, "--lora-alpha", metavar="ALPHA",
                                               help="LoRA alpha for a single-file LoRA that does not record it (as for build)."),
):
    """Describe a bundle (parts, I/O, adapters, tasks) or an adapter (kind, format, tensors). Reads the manifest only."""
    from rich.measure import Measurement
    from rich.table import Table

    from .bundle import MANIFEST, read_manifest

    if (path / MANIFEST).exists():
        # Without --verify: the manifest (and what it says about the files) only, so a 13 GB bundle opens at once.
        info = read_manifest(path, hash_files=verify_files)
        if as_json:
            _print_json(info)
            return
        out.print(f"[bold]bundle[/] {path}  vlexport {info['vlexport_version']}  target {info['target']['name']}",
                  highlight=False, soft_wrap=True)
        # Part, file and tensor names are typed back: a table when it fits unwrapped, else one block per part.
        table = Table("part", "file", "precision", "inputs", "outputs")
        for name, part in info["parts"].items():
            table.add_row(name, part["file"], part["precision"], _io_lines(part["inputs"]), _io_lines(part["outputs"]))
        if Measurement.get(out, out.options.update_width(10_000), table).maximum <= out.width:
            out.print(table)
        else:
            for name, part in info["parts"].items():
                out.print(f"{name}: {part['file']} ({part['precision']})", highlight=False, soft_wrap=True)
                for label, values in (("in", part["inputs"]), ("out", part["outputs"])):
                    for line in _io_lines(values).split("\n"):
                        out.print(f"  {label:<3} {line}", highlight=False, soft_wrap=True)
        for a in info["adapters"]:
            out.print(f"adapter {a['kind']} ({a['format']}) {a['path']} sha256 {a['sha256'][:12]}… merged={a['merged']}",
                      highlight=False, soft_wrap=True)
        for name, t in (info.get("tasks") or {}).items():
            kinds = ", ".join(f"{a['kind']} ({a['format']})" for a in t["adapters"])
            slots = ", ".join(t.get("bottleneck_parts", [])) or "none"
            out.print(f"task {name}: pack {t['pack']} ({t['bytes'] / 1024:.1f} KiB), {kinds}; "
                      f"{t['prefix_tokens']} prefix tokens, positions from {t['position_offset']}; "
                      f"bottleneck slots: {slots}", highlight=False, soft_wrap=True)
        for name, part in info["parts"].items():
            low = part.get("lowering") or {}
            if "keep_precision" in low:  # INT4: products the fallback kept, by name, at the precision each kept
                kept = ", ".join(f"{k['module']} ({k['precision'].upper()}, {k['emulated_rel_error']:.2g})"
                                 for k in low["kept"]) or "none"
                out.print(f"{name}: INT4 {low['form']} ({low['algo']}, block {low['block_size']}, "
                          f"{'symmetric' if low['symmetric'] else 'zero points'}{', AWQ' if low.get('awq') else ''}, "
                          f"lm_head {low['lm_head'].upper()}), {low['products_quantized']} of {low['products_total']} "
                          f"products INT4; kept: {kept}" + (f"; {low['result']}" if "result" in low else ""),
                          highlight=False, soft_wrap=True)
            elif "products_total" in low:
                kept = ", ".join(f"{k['module']} ({k['emulated_rel_error']:.2g})" for k in low["kept_fp32"]) or "none"
                out.print(f"{name}: INT8 {low['form']}, {low['products_quantized']} of {low['products_total']} products "
                          f"quantized; kept in FP32: {kept}" + (f"; {low['result']}" if "result" in low else ""),
                          highlight=False, soft_wrap=True)
            elif "kept_fp32_op_types" in low:
                out.print(f"{name}: FP16, {', '.join(low['kept_fp32_op_types'])} in FP32", highlight=False, soft_wrap=True)
        if info.get("parity"):
            out.print(f"parity: {'passed' if info['parity']['passed'] else 'FAILED'} ({info['parity']['report']})",
                      highlight=False)
        if verify_files:
            out.print(f"[green]files: {len(info.get('files', {}))} checked against their sha256[/]", highlight=False)
        return
    if verify_files:
        raise VlexportError(f"--verify checks a bundle's files, and '{path}' is not a bundle (no {MANIFEST})")
    from .adapters import load_adapter

    info = load_adapter(path, lora_alpha=lora_alpha).describe()
    if as_json:
        _print_json(info)
    else:
        for k, v in info.items():
            out.print(f"{k}: {v}", highlight=False, soft_wrap=True)


# -- bench ----------------------------------------------------------------------------------------------------------
@command()
@_handle_errors
def bench(
    bundle: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle directory."),
    threads: Optional[int] = _threads_option(),
    repeats: int = typer.Option(10, "--repeats", min=1, metavar="N", help="Timed runs per metric (decode: twice as many)."),
    contexts: str = typer.Option("64,300,1000", "--contexts", metavar="N,N,...", help="Decode context lengths."),
    as_json: bool = _json_option("the result"),
    plot_file: Optional[Path] = typer.Option(None, "--plot", metavar="PATH", help="Write a PNG plot here (not with --compare)."),
    markdown_file: Optional[Path] = typer.Option(None, "--markdown", metavar="PATH", help="Write the markdown table here."),
    rss: Optional[bool] = typer.Option(None, "--rss/--no-rss", metavar="",
                                       help="Measure peak RSS in fresh processes (default on; not with --compare)."),
    backend: Optional[Backend] = typer.Option(None, "--backend",
                                              help="onnxruntime (default), or tensorrt for engines built on the device (not with --compare)."),
    compare: list[Path] = typer.Option([], "--compare", metavar="BUNDLE",
                                       help="Other bundles of the same model (e.g. FP16, INT8): per-part latency of all against "
                                            "PyTorch eager, in one run; repeat for several."),
    peer: Optional[Peer] = typer.Option(None, "--peer",
                                        help="Also build onnxruntime-genai's model builder decoder from the bundle's merged "
                                             "weights at its precision, and time it against the bundle in the same run "
                                             "(not with --compare or --backend tensorrt)."),
    quiet: bool = _quiet_option(),
):
    """Latency and memory of the bundle against PyTorch eager, measured in one run; ratios > 1 favour the bundle."""
    from rich.markdown import Markdown

    from .bench.run import markdown, plot, run_bench

    try:
        ctx = tuple(int(c) for c in contexts.split(","))
    except ValueError:
        raise VlexportError(f"--contexts '{contexts}': expected integers separated by commas, e.g. 64,300,1000") from None
    if any(c < 1 for c in ctx):
        raise VlexportError(f"--contexts '{contexts}': every context must be at least 1")
    log = Reporter(console, quiet)
    threads = _default_threads(threads)
    if compare:
        refused = [name for name, given in (("--plot", plot_file is not None), ("--rss/--no-rss", rss is not None),
                                            ("--backend tensorrt", backend == Backend.tensorrt),
                                            ("--peer", peer is not None)) if given]
        if refused:
            raise VlexportError(f"{', '.join(refused)} cannot be used with --compare, which times the parts of every bundle "
                                "on ONNX Runtime (no plot, no peak RSS); drop it, or bench one bundle without --compare")
        from .bench import precision

        result = precision.run_precision_bench([bundle, *compare], threads=threads, contexts=ctx, repeats=repeats, log=log)
        table = precision.markdown(result)
    else:
        if peer is not None and backend == Backend.tensorrt:
            raise VlexportError("--peer times onnxruntime-genai on the CPU against the bundle on ONNX Runtime; drop "
                                "--backend tensorrt to use it")
        result = run_bench(bundle, threads=threads, contexts=ctx, repeats=repeats, measure_rss=rss is not False,
                           backend=Backend(backend or Backend.onnxruntime).value,
                           peer=Peer(peer).value if peer is not None else None, log=log)
        table = markdown(result)
        if plot_file:
            plot(result, plot_file)
    if markdown_file:
        markdown_file.write_text(table)
    if as_json:
        _print_json(result)
    else:
        out.print(Markdown(table))


# -- plan, targets --------------------------------------------------------------------------------------------------
@command()
@_handle_errors
def plan(
    base: Path = typer.Option(..., "--base", metavar="DIR", help="LLaVA directory; only config.json is read."),
    target: str = typer.Option(..., "--target", metavar="NAME|PATH", help="Target profile name (vlexport targets) or a .toml path."),
    precision: Optional[str] = typer.Option(None, "--precision", metavar="PART=PREC,...", help="Override per part, e.g. vision=fp16,decoder=int8."),
    context: Optional[int] = typer.Option(None, "--context", min=1, metavar="N", help="Max context in tokens (default: the target's)."),
    adapter: list[str] = typer.Option([], "--adapter", metavar="PATH|NAME=PATH",
                                      help="As for build: NAME=PATH bank tasks count what they add (a swappable LoRA "
                                           "its own bytes, a merged task its copies of the parts)."),
    lora_mode: str = typer.Option("swappable", "--lora-mode", metavar="swappable|merged", help="As for build."),
    as_json: bool = _json_option("the memory plan"),
):
    """Will the model fit the target's memory? Exit 2 with what would fit if it does not."""
    from rich.table import Table

    from .build import task_bytes
    from .model import check_config_dir
    from .plan import check_fits, plan_memory
    from .target import load_target, parse_precision_overrides
    from .tasks import load_bank

    config = check_config_dir(base)
    prof = load_target(target).with_precision(parse_precision_overrides(precision))
    _, tasks = load_bank(adapter, lora_mode=lora_mode)
    per_task = task_bytes(tasks, config, prof)
    memory = plan_memory(config, prof, context=context, adapter_bytes=sum(per_task.values()))
    if as_json:
        _print_json({**memory.to_dict(), "task_bytes": per_task})
        if not memory.fits:  # the plan (fits: false) is the JSON; the reason goes to stderr
            try:
                check_fits(memory, config, prof)
            except VlexportError as e:
                console.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
        return
    table = Table("item", "GiB", title=f"memory plan: {base} on {prof.name} ({prof.device})")
    for part, gib in memory.weights_gib.items():
        table.add_row(f"weights {part} ({memory.precision[part]})", f"{gib:.2f}")
    table.add_row(f"KV cache (context {memory.context}, batch {memory.batch})", f"{memory.kv_cache_gib:.2f}")
    table.add_row("activations (peak, estimate)", f"{memory.activations_gib:.2f}")
    table.add_row(f"adapter packs ({len(per_task)} tasks)" if per_task else "adapter packs", f"{memory.adapters_gib:.2f}")
    table.add_row("runtime overhead", f"{memory.overhead_gib:.2f}")
    table.add_row("[bold]total[/]", f"[bold]{memory.total_gib:.2f}[/]")
    table.add_row("usable on target", "-" if memory.usable_gib is None else f"{memory.usable_gib:.2f}")
    out.print(table)
    check_fits(memory, config, prof)
    out.print("[green]fits[/]")


def target_rows() -> list[dict]:
    """`vlexport targets --json`: one object per shipped profile."""
    from .target import available_targets, load_target

    rows = []
    for name in available_targets():
        t = load_target(name)
        rows.append({"name": name, "description": t.description, "backend": t.backend, "device": t.device,
                     "compute_capability": t.compute_capability, "tensorrt_versions": list(t.tensorrt_versions),
                     "usable_memory_gb": t.usable_memory_gb, "memory_bandwidth_gbs": t.memory_bandwidth_gbs,
                     "dla_cores": t.dla_cores, "precision": {p: t.precision[p] for p in ("vision", "embed", "decoder")}})
    return rows


def print_targets(rows: list[dict], console_: Console) -> None:
    """A table when it fits the width unwrapped, else one block per target. Names are typed back as --target, so
    they are never cut."""
    from rich.measure import Measurement
    from rich.table import Table

    table = Table("name", "backend", "device", "sm", "TensorRT", "usable GiB", "GB/s", "DLA", "precision v/e/d")
    for r in rows:
        table.add_row(r["name"], r["backend"], r["device"], r["compute_capability"] or "-",
                      ",".join(r["tensorrt_versions"]) or "-", f"{r['usable_memory_gb']}" if r["usable_memory_gb"] else "-",
                      f"{r['memory_bandwidth_gbs']:g}" if r["memory_bandwidth_gbs"] else "-", str(r["dla_cores"]),
                      "/".join(r["precision"].values()))
    if Measurement.get(console_, console_.options.update_width(10_000), table).maximum <= console_.width:
        console_.print(table)
        return
    for r in rows:
        console_.print(r["name"], style="bold", highlight=False, soft_wrap=True)
        facts = [r["backend"], r["device"]]
        if r["compute_capability"]:
            facts.append(f"sm {r['compute_capability']}, TensorRT {','.join(r['tensorrt_versions'])}")
        if r["usable_memory_gb"]:
            facts.append(f"{r['usable_memory_gb']} GiB usable")
        if r["memory_bandwidth_gbs"]:
            facts.append(f"{r['memory_bandwidth_gbs']:g} GB/s")
        if r["dla_cores"]:
            facts.append(f"DLA {r['dla_cores']}")
        facts.append(f"precision vision/embed/decoder {'/'.join(r['precision'].values())}")
        console_.print("  " + "; ".join(facts), highlight=False)


@command()
@_handle_errors
def targets(as_json: bool = _json_option("the target profiles")):
    """List the shipped target profiles (--target NAME, or pass your own .toml)."""
    rows = target_rows()
    if as_json:
        _print_json(rows)
    else:
        print_targets(rows, out)


# -- TensorRT -------------------------------------------------------------------------------------------------------
@command()
@_handle_errors
def engines(
    bundle: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle directory built for a TensorRT target."),
    adopt: bool = typer.Option(False, "--adopt", metavar="", help="Record engines that engines/build.sh already built."),
    as_json: bool = _json_option("the manifest's engines entry"),
    quiet: bool = _quiet_option(),
):
    """On the device: build the bundle's TensorRT engines (or adopt trtexec's) and update the manifest."""
    from .engines import build_engines_on_device

    manifest = build_engines_on_device(bundle, adopt, Reporter(console, quiet))
    if as_json:
        _print_json({"bundle": str(bundle), "engines": manifest["engines"]})
    else:
        out.print(f"[green]engines recorded in {bundle}/manifest.json[/]", highlight=False)


@command("check-trt")
@_handle_errors
def check_trt(
    bundle: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle directory."),
    trt_version: str = typer.Option("10.3", "--trt-version", metavar="X.Y", help="TensorRT version whose ONNX import rules apply."),
    target: Optional[str] = typer.Option(None, "--target", metavar="NAME|PATH", help="Shape ranges from this target (default: the bundle's)."),
    as_json: bool = _json_option("{trt_version, passed, violations}"),
):
    """Check every part against TensorRT's ONNX import rules (ops, dtypes, profiles) without TensorRT. Exit 1 when the check fails."""
    from .bundle import read_manifest
    from .target import Target, load_target
    from .trt.onnx_rules import check_bundle

    manifest = read_manifest(bundle)
    prof = load_target(target) if target else Target.from_dict(manifest["target"])
    found = check_bundle(bundle, manifest, trt_version, prof.shapes)
    violations = [v for vs in found.values() for v in vs]
    if as_json:
        _print_json({"trt_version": trt_version, "passed": not violations, "violations": [v.__dict__ for v in violations]})
    else:
        for part, vs in found.items():
            status = "[green]ok[/]" if not vs else f"[red]{len(vs)} violation(s)[/]"
            out.print(f"{part}: {status}")
            for v in vs:
                out.print(f"  \\[{v.rule}] {v.message}", highlight=False, soft_wrap=True)
    if violations:
        raise typer.Exit(1)


# -- fixture --------------------------------------------------------------------------------------------------------
def _output_option(what: str):
    return typer.Option(None, "-o", "--output", metavar="PATH", help=f"Where to write {what}.")


def _old_output_argument():
    return typer.Argument(None, metavar="OUT", hidden=True, help="Older positional form of -o/--output.")


@fixture_command("llava")
@_handle_errors
def fixture_llava(
    out_dir: Optional[Path] = _old_output_argument(),
    output: Optional[Path] = _output_option("the LLaVA directory"),
    preset: FixturePreset = typer.Option(FixturePreset["tiny"].value, "--preset",
                                         help="Model size; 7b-shaped writes 14 GB of random fp16 weights, shard by shard."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed of the random weights."),
    config_only: bool = typer.Option(False, "--config-only", metavar="", help="Write config.json only (enough for `vlexport plan`)."),
    outliers: bool = typer.Option(False, "--outliers", metavar="",
                                  help="Inject the activation outliers of trained LLMs (same function, INT8-hostile ranges)."),
    weight_scale: float = typer.Option(1.0, "--weight-scale", metavar="F",
                                                 help="Scale the random weights by F (e.g. 30 on the tiny preset: its PyTorch FP32 logits are then measurably off float64)."),
    as_json: bool = _json_option("{kind, path, preset}"),
):
    """A seeded random LLaVA in the Hugging Face layout."""
    from .fixture import make_llava, write_llava_config

    dest = _one_output(out_dir, output)
    name = FixturePreset(preset).value
    if not weight_scale > 0:
        raise VlexportError(f"--weight-scale {weight_scale}: give a factor above 0, e.g. 30")
    if config_only:
        if weight_scale != 1.0 or outliers:
            raise VlexportError("--config-only writes no weights: drop --weight-scale/--outliers, or --config-only")
        write_llava_config(dest, name)
    else:
        make_llava(dest, name, seed, outliers=outliers, weight_scale=weight_scale)
    if as_json:
        _print_json({"kind": "llava", "path": str(dest), "preset": name})
    else:
        out.print(f"wrote {name} LLaVA to {dest}", highlight=False)


FamilyPreset = Enum("FamilyPreset", {p: p for p in ("tiny", "small")}, type=str)


def _fixture_family(kind: str, make, out_dir, output, preset, seed, as_json) -> None:
    dest = _one_output(out_dir, output)
    name = FamilyPreset(preset).value
    make(dest, name, seed)
    if as_json:
        _print_json({"kind": kind, "path": str(dest), "preset": name})
    else:
        out.print(f"wrote {name} {kind} to {dest}", highlight=False)


@fixture_command("llava-next")
@_handle_errors
def fixture_llava_next(
    out_dir: Optional[Path] = _old_output_argument(),
    output: Optional[Path] = _output_option("the LLaVA-NeXT directory"),
    preset: FamilyPreset = typer.Option("tiny", "--preset", help="Model size: tiny (56-px tiles, seconds) or small (224-px tiles, 12 layers: about 4 minutes)."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed of the random weights."),
    as_json: bool = _json_option("{kind, path, preset}"),
):
    """A seeded random LLaVA-NeXT (CLIP + Llama, any-resolution tiles) in the Hugging Face layout."""
    from .fixture_family import make_llava_next

    _fixture_family("llava-next", make_llava_next, out_dir, output, preset, seed, as_json)


@fixture_command("llava-onevision")
@_handle_errors
def fixture_llava_onevision(
    out_dir: Optional[Path] = _old_output_argument(),
    output: Optional[Path] = _output_option("the LLaVA-OneVision directory"),
    preset: FamilyPreset = typer.Option("tiny", "--preset", help="Model size: tiny (60-px tiles, seconds) or small (224-px tiles, 12 layers: about 4 minutes)."),
    seed: int = typer.Option(0, "--seed", metavar="N", help="Seed of the random weights."),
    as_json: bool = _json_option("{kind, path, preset}"),
):
    """A seeded random LLaVA-OneVision (SigLIP + Qwen2, anyres_max_9) in the Hugging Face layout."""
    from .fixture_family import make_llava_onevision

    _fixture_family("llava-onevision", make_llava_onevision, out_dir, output, preset, seed, as_json)


@fixture_command("lora")
@_handle_errors
def fixture_lora(
    base: Path = typer.Argument(..., metavar="BASE", help="LLaVA directory the LoRA is made for."),
    out_dir: Optional[Path] = _old_output_argument(),
    output: Optional[Path] = _output_option("the PEFT adapter directory"),
    seed: int = typer.Option(1, "--seed", metavar="N", help="Seed of the random A and B."),
    scale: float = typer.Option(0.1, "--scale", metavar="F",
                                help="Std of A and B: 0.1 (default) makes a LoRA no parity test can miss; 0.02 is a trained LoRA's size."),
    as_json: bool = _json_option("{kind, path}"),
):
    """A PEFT LoRA (vision, projector, language) with non-zero weights for BASE."""
    from .fixture_family import adapter_maker

    dest = _one_output(out_dir, output)
    adapter_maker(base, "lora")(base, dest, seed, scale=scale)
    if as_json:
        _print_json({"kind": "lora", "path": str(dest)})
    else:
        out.print(f"wrote LoRA adapter to {dest}", highlight=False)


@fixture_command("bitfit")
@_handle_errors
def fixture_bitfit(
    base: Path = typer.Argument(..., metavar="BASE", help="LLaVA directory the biases are made for."),
    out_file: Optional[Path] = _old_output_argument(),
    output: Optional[Path] = _output_option("the .safetensors bias dump"),
    seed: int = typer.Option(2, "--seed", metavar="N", help="Seed of the random biases."),
    as_json: bool = _json_option("{kind, path}"),
):
    """A BitFit bias dump for BASE."""
    from .fixture_family import adapter_maker

    dest = _one_output(out_file, output)
    adapter_maker(base, "bitfit")(base, dest, seed)
    if as_json:
        _print_json({"kind": "bitfit", "path": str(dest)})
    else:
        out.print(f"wrote BitFit biases to {dest}", highlight=False)


# -- demo -----------------------------------------------------------------------------------------------------------
@command()
@_handle_errors
def demo(
    output: Path = typer.Option(Path("vlexport-demo"), "-o", "--output", metavar="DIR", help="Where the fixture, adapters and bundle go."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", metavar="DIR", hidden=True, help="Deprecated spelling of -o/--output."),
    preset: FixturePreset = typer.Option(FixturePreset["tiny"].value, "--preset", help="Size of the LLaVA fixture to make."),
    as_json: bool = _json_option("{question, image, answer, token_ids, bundle}"),
    quiet: bool = _quiet_option(),
):
    """The whole job on a built-in default: make a small LLaVA and adapters, build a bundle, ask it about a photo."""
    import skimage.data
    from PIL import Image

    from .build import build as run_build
    from .fixture import make_bitfit, make_llava, make_lora
    from .progress import track
    from .runtime import Bundle

    workdir = workdir or output
    log = Reporter(console, quiet)
    base, lora, bitfit, bundle = workdir / "llava", workdir / "lora", workdir / "bitfit.safetensors", workdir / "bundle"
    with track(log, "making a LLaVA fixture and adapters", total=3) as advance:
        if not (base / "config.json").exists():
            make_llava(base, FixturePreset(preset).value)
        advance()
        make_lora(base, lora)
        advance()
        make_bitfit(base, bitfit)
        advance()
    log(f"base {base}, adapters {lora} (PEFT LoRA) and {bitfit} (BitFit)")
    run_build(base, [lora, bitfit], bundle, force=True, log=log)
    photo = workdir / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    question = "What is shown in this image?"
    result = Bundle(bundle).generate(photo, prompt=question, max_new_tokens=24)
    if as_json:
        _print_json({"question": question, "image": str(photo), "answer": result.text, "token_ids": result.token_ids,
                     "bundle": str(bundle)})
        return
    out.print(f"[bold]Q:[/] {question}  [dim]({photo})[/]", highlight=False)
    out.print(f"[bold]A:[/] {result.text!r}  [dim](random weights: the words are noise; the tokens match PyTorch exactly)[/]",
              highlight=False)
    out.print(f"token ids: {result.token_ids}")
    out.print(f"bundle: {bundle}  (try: vlexport run {bundle} --image {photo} --prompt \"{question}\" --json)", highlight=False)


def main() -> None:
    # Library chatter (weight-loading bars, deprecation notices) would bury vlexport's own messages.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # ONNX Runtime warns, once per session, about every slot input that has a default ("initializer appears in
    # graph inputs"): those inputs are fed at run time by design. Its errors still show.
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    app()


if __name__ == "__main__":
    main()

"""The vlexport command line. It parses arguments, calls the API and maps errors to exit codes:
0 success, 1 parity failure, 2 bad input (the message says what to fix)."""

from __future__ import annotations

import functools
import json
import os
import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import ParityError, VlexportError

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  help="Compile LLaVA models and their adapters into bundles that run on ONNX Runtime.")
fixture_app = typer.Typer(no_args_is_help=True, help="Write small LLaVA models and adapters for tests and demos.")
app.add_typer(fixture_app, name="fixture")
console = Console(stderr=True, log_path=False)
out = Console()


def _handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except VlexportError as e:
            console.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except ParityError as e:
            console.print(f"[red]parity failure:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1)

    return wrapper


def _log(msg: str) -> None:
    console.log(msg, highlight=False)


@app.command()
@_handle_errors
def build(
    base: Path = typer.Option(..., "--base", help="Hugging Face LLaVA directory (config.json + safetensors)."),
    adapter: list[str] = typer.Option([], "--adapter", help="Adapter file or directory, or NAME=PATH for a bank task; repeat for several."),
    adapter_kind: Optional[str] = typer.Option(None, "--adapter-kind", help="Override detection: lora | bitfit."),
    target: str = typer.Option("cpu", "--target", help="Target profile name (vlexport targets) or a .toml path."),
    output: Path = typer.Option(..., "-o", "--output", help="Bundle directory to write."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Run the parity check against PyTorch (default on)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="Override the target per part: vision=int8,decoder=fp16."),
    int8: Optional[str] = typer.Option(None, "--int8", help="Override the target's [int8] options: calibration=entropy,decoder=weight-only,fallback=false,form=qdq,smoothquant_alpha=0.5."),
    calib: Optional[Path] = typer.Option(None, "--calib", help="Calibration folder (images + prompts.jsonl); default calib/."),
    verify_layers: Optional[int] = typer.Option(None, "--verify-layers", help="Verify only the first N decoder layers (chosen, N=2, when the fp32 reference would not fit in memory)."),
):
    """Merge adapters into the base, export vision/embed/decoder to ONNX, lower their precision, check them and write a bundle."""
    from .build import build as run_build
    from .target import parse_precision_overrides

    with console.status("building bundle..."):
        manifest = run_build(base, adapter, output, target=target, force=force, adapter_kind=adapter_kind,
                             verify=verify, precision=parse_precision_overrides(precision), int8=int8, calib=calib,
                             verify_layers=verify_layers, log=_log)
    engines = manifest.get("engines")
    if engines and engines["status"] == "planned":
        out.print(f"[yellow]TensorRT engines were not built on this machine[/] ({engines['reason']}). "
                  f"Build them on the device: `bash {output}/engines/build.sh` or `vlexport engines {output}`.",
                  highlight=False)
    parity = manifest.get("parity")
    note = "parity passed" if parity and parity["passed"] else "parity not checked (--no-verify)"
    out.print(f"[green]bundle written:[/] {output} ({note})")


@app.command()
@_handle_errors
def run(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    image: Path = typer.Option(..., "--image", help="Image file."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Question; the base's chat template is applied."),
    raw_prompt: Optional[str] = typer.Option(None, "--raw-prompt", help="Prompt used verbatim, with the <image> placeholder."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy (default)."),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    backend: str = typer.Option("onnxruntime", "--backend", help="onnxruntime, or tensorrt for engines built on the device."),
    task: Optional[str] = typer.Option(None, "--task", help="Bank task to answer with (vlexport inspect lists them)."),
    as_json: bool = typer.Option(False, "--json", help="Print {text, token_ids, timings} as JSON."),
):
    """Answer a prompt about an image with a bundle (ONNX Runtime, no torch)."""
    from .runtime import Bundle

    if not image.is_file():
        raise VlexportError(f"--image '{image}' does not exist")
    result = Bundle(bundle, threads=threads, backend=backend).generate(
        image, prompt=prompt, raw_prompt=raw_prompt, max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, seed=seed, task=task,
    )
    if as_json:
        print(json.dumps(result.to_dict()))
    else:
        out.print(result.text, highlight=False)
        t = result.timings
        console.print(f"[dim]vision {t['vision_ms']:.0f} ms, prefill {t['prefill_ms']:.0f} ms, "
                      f"decode {t['decode_ms_per_token']:.1f} ms/token, {t['new_tokens']} tokens[/]")


@app.command()
@_handle_errors
def verify(
    bundle: Path = typer.Argument(..., help="Bundle directory."),
    base: Optional[Path] = typer.Option(None, "--base", help="Reference base (default: the one in the manifest)."),
    adapter: Optional[list[Path]] = typer.Option(None, "--adapter", help="Reference adapters (default: the manifest's)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Folder of images + prompts.jsonl (default: built-in photos)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens"),
    layers: Optional[int] = typer.Option(None, "--layers", help="Compare only the first N decoder layers (large models)."),
    backend: str = typer.Option("onnxruntime", "--backend", help="onnxruntime, or tensorrt for engines built on the device."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON report on stdout."),
    junit: Optional[Path] = typer.Option(None, "--junit", help="Write JUnit XML here."),
):
    """Prove a bundle matches the PyTorch model as trained. Exit 0 pass, 1 parity failure, 2 bad input."""
    from .parity.report import render_table, write_junit
    from .parity.verify import verify_bundle

    with console.status("verifying..."):
        report = verify_bundle(bundle, base=base, adapters=adapter or None, data=data,
                               max_new_tokens=max_new_tokens, layers=layers, backend=backend, log=_log)
    if junit:
        write_junit(report, junit)
    if as_json:
        print(json.dumps(report))
    else:
        render_table(report, out)
    if not report["passed"]:
        raise typer.Exit(1)


@app.command()
@_handle_errors
def inspect(
    path: Path = typer.Argument(..., help="A bundle directory or an adapter file/directory."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Describe a bundle (parts, I/O, adapters) or an adapter (kind, format, tensors)."""
    from rich.table import Table

    from .bundle import MANIFEST, read_manifest

    if (path / MANIFEST).exists():
        info = read_manifest(path)
        if as_json:
            print(json.dumps(info))
            return
        out.print(f"[bold]bundle[/] {path}  vlexport {info['vlexport_version']}  target {info['target']['name']}")
        table = Table("part", "file", "precision", "inputs", "outputs")
        for name, part in info["parts"].items():
            fmt = lambda vs: "\n".join(f"{v['name']} {v['dtype']}{v['shape']}" for v in vs[:4]) + (
                f"\n… {len(vs) - 4} more" if len(vs) > 4 else "")
            table.add_row(name, part["file"], part["precision"], fmt(part["inputs"]), fmt(part["outputs"]))
        out.print(table)
        for a in info["adapters"]:
            out.print(f"adapter {a['kind']} ({a['format']}) {a['path']} sha256 {a['sha256'][:12]}… merged={a['merged']}")
        for name, t in (info.get("tasks") or {}).items():
            kinds = ", ".join(f"{a['kind']} ({a['format']})" for a in t["adapters"])
            slots = ", ".join(t.get("bottleneck_parts", [])) or "none"
            out.print(f"task {name}: pack {t['pack']} ({t['bytes'] / 1024:.1f} KiB), {kinds}; "
                      f"{t['prefix_tokens']} prefix tokens, positions from {t['position_offset']}; "
                      f"bottleneck slots: {slots}", highlight=False, soft_wrap=True)
        for name, part in info["parts"].items():
            low = part.get("lowering") or {}
            if "products_total" in low:
                kept = ", ".join(f"{k['module']} ({k['emulated_rel_error']:.2g})" for k in low["kept_fp32"]) or "none"
                out.print(f"{name}: INT8 {low['form']}, {low['products_quantized']} of {low['products_total']} products "
                          f"quantized; kept in FP32: {kept}" + (f"; {low['result']}" if "result" in low else ""),
                          highlight=False, soft_wrap=True)
            elif "kept_fp32_op_types" in low:
                out.print(f"{name}: FP16, {', '.join(low['kept_fp32_op_types'])} in FP32", highlight=False, soft_wrap=True)
        if info.get("parity"):
            out.print(f"parity: {'passed' if info['parity']['passed'] else 'FAILED'} ({info['parity']['report']})")
        return
    from .adapters import load_adapter

    info = load_adapter(path).describe()
    if as_json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            out.print(f"{k}: {v}", highlight=False)


@app.command()
@_handle_errors
def bench(
    bundle: Path = typer.Argument(...),
    threads: int = typer.Option(2, "--threads", help="Threads for both ONNX Runtime and PyTorch."),
    repeats: int = typer.Option(10, "--repeats"),
    contexts: str = typer.Option("64,300,1000", "--contexts", help="Decode context lengths."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    plot_file: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG plot here."),
    markdown_file: Optional[Path] = typer.Option(None, "--markdown", help="Write a markdown table here."),
    rss: bool = typer.Option(True, "--rss/--no-rss", help="Measure peak RSS in fresh processes."),
    backend: str = typer.Option("onnxruntime", "--backend", help="onnxruntime, or tensorrt for engines built on the device."),
    compare: list[Path] = typer.Option([], "--compare", help="Other bundles of the same model (e.g. FP16, INT8): per-part latency of all against PyTorch eager, in one run."),
):
    """Latency and memory of the bundle against PyTorch eager, measured in one run; ratios > 1 favour the bundle."""
    from rich.markdown import Markdown

    from .bench.run import markdown, plot, run_bench

    try:
        ctx = tuple(int(c) for c in contexts.split(","))
    except ValueError:
        raise VlexportError(f"--contexts '{contexts}': expected integers separated by commas, e.g. 64,300,1000") from None
    if compare:
        from .bench import precision

        with console.status("benchmarking parts..."):
            result = precision.run_precision_bench([bundle, *compare], threads=threads, contexts=ctx, repeats=repeats, log=_log)
        table = precision.markdown(result)
        if markdown_file:
            markdown_file.write_text(table)
        if as_json:
            print(json.dumps(result))
        else:
            out.print(Markdown(table))
        return
    with console.status("benchmarking..."):
        result = run_bench(bundle, threads=threads, contexts=ctx, repeats=repeats, measure_rss=rss, backend=backend, log=_log)
    table = markdown(result)
    if markdown_file:
        markdown_file.write_text(table)
    if plot_file:
        plot(result, plot_file)
    if as_json:
        print(json.dumps(result))
    else:
        out.print(Markdown(table))


@app.command()
def targets():
    """List the shipped target profiles (--target NAME, or pass your own .toml)."""
    from rich.table import Table

    from .target import available_targets, load_target

    table = Table("name", "backend", "device", "sm", "TensorRT", "usable GiB", "GB/s", "DLA", "precision v/e/d")
    for name in available_targets():
        t = load_target(name)
        table.add_row(name, t.backend, t.device, t.compute_capability or "-", ",".join(t.tensorrt_versions) or "-",
                      f"{t.usable_memory_gb}" if t.usable_memory_gb else "-",
                      f"{t.memory_bandwidth_gbs:g}" if t.memory_bandwidth_gbs else "-", str(t.dla_cores),
                      "/".join(t.precision[p] for p in ("vision", "embed", "decoder")))
    out.print(table)


@app.command()
@_handle_errors
def plan(
    base: Path = typer.Option(..., "--base", help="LLaVA directory; only config.json is read."),
    target: str = typer.Option(..., "--target"),
    precision: Optional[str] = typer.Option(None, "--precision", help="Override per part: vision=fp16,decoder=int8."),
    context: Optional[int] = typer.Option(None, "--context", help="Max context (default: the target's)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Will the model fit the target's memory? Exit 2 with what would fit if it does not."""
    from rich.table import Table

    from .model import check_config_dir
    from .plan import check_fits, plan_memory
    from .target import load_target, parse_precision_overrides

    config = check_config_dir(base)
    prof = load_target(target).with_precision(parse_precision_overrides(precision))
    memory = plan_memory(config, prof, context=context)
    if as_json:
        print(json.dumps(memory.to_dict()))
    else:
        table = Table("item", "GiB", title=f"memory plan: {base} on {prof.name} ({prof.device})")
        for part, gib in memory.weights_gib.items():
            table.add_row(f"weights {part} ({memory.precision[part]})", f"{gib:.2f}")
        table.add_row(f"KV cache (context {memory.context}, batch {memory.batch})", f"{memory.kv_cache_gib:.2f}")
        table.add_row("activations (peak, estimate)", f"{memory.activations_gib:.2f}")
        table.add_row("adapter packs", f"{memory.adapters_gib:.2f}")
        table.add_row("runtime overhead", f"{memory.overhead_gib:.2f}")
        table.add_row("[bold]total[/]", f"[bold]{memory.total_gib:.2f}[/]")
        table.add_row("usable on target", "-" if memory.usable_gib is None else f"{memory.usable_gib:.2f}")
        out.print(table)
    check_fits(memory, config, prof)
    if not as_json:
        out.print("[green]fits[/]")


@app.command()
@_handle_errors
def engines(
    bundle: Path = typer.Argument(...),
    adopt: bool = typer.Option(False, "--adopt", help="Record engines that engines/build.sh already built."),
):
    """On the device: build the bundle's TensorRT engines (or adopt trtexec's) and update the manifest."""
    from .engines import build_engines_on_device

    build_engines_on_device(bundle, adopt, _log)
    out.print(f"[green]engines recorded in {bundle}/manifest.json[/]")


@app.command("check-trt")
@_handle_errors
def check_trt(
    bundle: Path = typer.Argument(...),
    trt_version: str = typer.Option("10.3", "--trt-version", help="TensorRT version whose ONNX import rules apply."),
    target: Optional[str] = typer.Option(None, "--target", help="Shape ranges from this target (default: the bundle's)."),
    as_json: bool = typer.Option(False, "--json"),
):
    """Check every part against TensorRT's ONNX import rules (ops, dtypes, profiles) without TensorRT. Exit 1 on a violation."""
    from .bundle import read_manifest
    from .target import Target, load_target
    from .trt.onnx_rules import check_bundle

    manifest = read_manifest(bundle)
    prof = load_target(target) if target else Target.from_dict(manifest["target"])
    found = check_bundle(bundle, manifest, trt_version, prof.shapes)
    violations = [v for vs in found.values() for v in vs]
    if as_json:
        print(json.dumps({"trt_version": trt_version, "passed": not violations,
                          "violations": [v.__dict__ for v in violations]}))
    else:
        for part, vs in found.items():
            status = "[green]ok[/]" if not vs else f"[red]{len(vs)} violation(s)[/]"
            out.print(f"{part}: {status}")
            for v in vs:
                out.print(f"  [{v.rule}] {v.message}", highlight=False)
    if violations:
        raise typer.Exit(1)


@fixture_app.command("llava")
@_handle_errors
def fixture_llava(
    out_dir: Path = typer.Argument(...),
    preset: str = typer.Option("tiny", "--preset", help="tiny | tiny-gqa | small | small-gqa | 7b-shaped (14 GB of random fp16 weights, written shard by shard)"),
    seed: int = typer.Option(0, "--seed"),
    config_only: bool = typer.Option(False, "--config-only", help="Write config.json only (enough for `vlexport plan`)."),
    outliers: bool = typer.Option(False, "--outliers", help="Inject the activation outliers of trained LLMs (same function, INT8-hostile ranges)."),
):
    """A seeded random LLaVA in the Hugging Face layout."""
    from .fixture import make_llava, write_llava_config

    if config_only:
        write_llava_config(out_dir, preset)
    else:
        make_llava(out_dir, preset, seed, outliers=outliers)
    out.print(f"wrote {preset} LLaVA to {out_dir}")


@fixture_app.command("lora")
@_handle_errors
def fixture_lora(base: Path = typer.Argument(...), out_dir: Path = typer.Argument(...), seed: int = typer.Option(1, "--seed"),
                 scale: float = typer.Option(0.1, "--scale", help="Std of A and B: 0.1 (default) makes a LoRA no parity test can miss; 0.02 is a trained LoRA's size.")):
    """A PEFT LoRA (vision, projector, language) with non-zero weights for BASE."""
    from .fixture import make_lora

    make_lora(base, out_dir, seed, scale=scale)
    out.print(f"wrote LoRA adapter to {out_dir}")


@fixture_app.command("bitfit")
@_handle_errors
def fixture_bitfit(base: Path = typer.Argument(...), out_file: Path = typer.Argument(...), seed: int = typer.Option(2, "--seed")):
    """A BitFit bias dump for BASE."""
    from .fixture import make_bitfit

    make_bitfit(base, out_file, seed)
    out.print(f"wrote BitFit biases to {out_file}")


@app.command()
@_handle_errors
def demo(
    workdir: Path = typer.Option(Path("vlexport-demo"), "--workdir", help="Where the fixture, adapters and bundle go."),
    preset: str = typer.Option("tiny", "--preset"),
):
    """The whole job on a built-in default: make a small LLaVA and adapters, build a bundle, ask it about a photo."""
    import skimage.data
    from PIL import Image

    from .build import build as run_build
    from .fixture import make_bitfit, make_llava, make_lora
    from .runtime import Bundle

    base, lora, bitfit, bundle = workdir / "llava", workdir / "lora", workdir / "bitfit.safetensors", workdir / "bundle"
    with console.status("making a LLaVA fixture and adapters..."):
        if not (base / "config.json").exists():
            make_llava(base, preset)
        make_lora(base, lora)
        make_bitfit(base, bitfit)
    _log(f"base {base}, adapters {lora} (PEFT LoRA) and {bitfit} (BitFit)")
    with console.status("building bundle (export, checks, parity)..."):
        run_build(base, [lora, bitfit], bundle, force=True, log=_log)
    photo = workdir / "astronaut.png"
    Image.fromarray(skimage.data.astronaut()).save(photo)
    question = "What is shown in this image?"
    result = Bundle(bundle).generate(photo, prompt=question, max_new_tokens=24)
    out.print(f"[bold]Q:[/] {question}  [dim]({photo})[/]")
    out.print(f"[bold]A:[/] {result.text!r}  [dim](random weights: the words are noise; the tokens match PyTorch exactly)[/]")
    out.print(f"token ids: {result.token_ids}")
    out.print(f"bundle: {bundle}  (try: vlexport run {bundle} --image {photo} --prompt \"{question}\" --json)")


def main() -> None:
    # Library chatter (weight-loading bars, deprecation notices) would bury vlexport's own messages.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    app()


if __name__ == "__main__":
    main()

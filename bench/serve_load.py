"""Load on `vlexport serve` over loopback: N concurrent chat requests across a bundle's models, against the same
requests sent one by one.

    python bench/serve_load.py BUNDLE OUT_DIR [--requests 32] [--max-batch 4] [--threads 2] [--max-tokens 8,32]
    python bench/serve_load.py --build WORKDIR [--preset small-gqa] OUT_DIR ...   # builds the tests' bank first

Starts `python -m vlexport.serve BUNDLE` on 127.0.0.1 (a free port), sends the requests with the `openai` package
(greedy, random images, random max_tokens, the models in turn), checks that every request completed once with the
tokens Bundle.generate gives for it, and writes OUT_DIR/serve.json and OUT_DIR/serve.md (--stem): p50/p99 latency, time to
first token and tokens/s, concurrent against sequential.

tests/test_serve.py imports make_requests, run_concurrent and start_server from here.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PROMPTS = ["What is shown here?", "Describe the picture.", "What colour is it?", "Count the objects."]


@dataclass
class LoadRequest:
    index: int
    model: str
    task: str | None
    prompt: str
    image: bytes  # PNG or JPEG file bytes
    max_tokens: int

    def messages(self) -> list:
        kind = "jpeg" if self.image[:2] == b"\xff\xd8" else "png"
        url = f"data:image/{kind};base64," + base64.b64encode(self.image).decode()
        return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": self.prompt}]}]


@dataclass
class LoadResult:
    index: int
    id: str | None = None
    token_ids: list | None = None
    text: str | None = None
    latency_s: float = 0.0
    first_token_s: float = 0.0
    error: str | None = None


def make_requests(n: int, models: dict[str, str | None], seed: int = 0, max_tokens=(8, 32)) -> list[LoadRequest]:
    """n requests over `models` (name -> task) in turn, each with its own random image (size, colours, format)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = list(models)
    out = []
    for i in range(n):
        h, w = (int(x) for x in rng.integers(24, 320, 2))
        base = rng.integers(0, 256, (1, 1, 3))
        pixels = np.clip(base + rng.normal(0, 60, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG" if i % 3 == 2 else "PNG")
        name = names[i % len(names)]
        out.append(LoadRequest(i, name, models[name], f"Request {i}: {PROMPTS[i % len(PROMPTS)]}", buf.getvalue(),
                               int(rng.integers(max_tokens[0], max_tokens[1] + 1))))
    return out


async def _one(client, r: LoadRequest, stream: bool) -> LoadResult:
    t0 = time.perf_counter()
    res = LoadResult(r.index)
    try:
        if stream:
            ids, text, first = [], [], None
            async for ch in await client.chat.completions.create(model=r.model, messages=r.messages(),
                                                                  max_tokens=r.max_tokens, temperature=0, stream=True):
                res.id = ch.id
                extra = (ch.model_extra or {}).get("vlexport") or {}
                ids += extra.get("token_ids", [])
                first = extra.get("timings", {}).get("first_token_s", first)  # the server's clock, as below
                if ch.choices:
                    text.append(ch.choices[0].delta.content or "")
            res.token_ids, res.text, res.first_token_s = ids, "".join(text), first or 0.0
        else:
            c = await client.chat.completions.create(model=r.model, messages=r.messages(), max_tokens=r.max_tokens,
                                                     temperature=0)
            res.id, res.text, res.token_ids = c.id, c.choices[0].message.content, c.model_extra["vlexport"]["token_ids"]
            res.first_token_s = c.model_extra["vlexport"]["timings"]["first_token_s"]
    except Exception as e:  # recorded, then reported by the caller: a load test counts errors, it does not stop
        res.error = f"{type(e).__name__}: {e}"
    res.latency_s = time.perf_counter() - t0
    return res


async def _run(base_url: str, requests: list[LoadRequest], concurrency: int, stream_every: int, timeout_s: float):
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=timeout_s)
    gate = asyncio.Semaphore(concurrency)

    async def gated(r):
        async with gate:
            return await _one(client, r, stream=stream_every > 0 and r.index % stream_every == 0)

    try:
        return await asyncio.wait_for(asyncio.gather(*(gated(r) for r in requests)), timeout_s)
    finally:
        await client.close()


def run_concurrent(base_url: str, requests: list[LoadRequest], concurrency: int | None = None, stream_every: int = 2,
                   timeout_s: float = 300.0) -> tuple[list[LoadResult], float]:
    """All requests at once (or `concurrency` at a time); every `stream_every`-th streams. -> results, wall seconds."""
    t0 = time.perf_counter()
    results = asyncio.run(_run(base_url, requests, concurrency or len(requests), stream_every, timeout_s))
    return results, time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, *options: str, port: int | None = None, log: Path | None = None,
                 wait_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """`python -m vlexport.serve BUNDLE` on 127.0.0.1; returns once /health answers ok."""
    import urllib.request

    port = port or free_port()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "vlexport.serve", str(bundle), "--host", "127.0.0.1",
                             "--port", str(port), *options], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}" + (f"; see {log}" if log else ""))
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not answer /health within {wait_s} s")


def stop_server(proc: subprocess.Popen, timeout_s: float = 60.0) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def expected_tokens(bundle_path: Path, requests: list[LoadRequest], threads: int | None = None) -> dict[int, list]:
    """What Bundle.generate answers for each request alone (greedy): the reference the server must equal."""
    import vlexport
    from PIL import Image

    bundle = vlexport.load(bundle_path, threads=threads)
    return {r.index: bundle.generate(Image.open(io.BytesIO(r.image)), prompt=r.prompt, max_new_tokens=r.max_tokens,
                                     task=r.task).token_ids for r in requests}


def step_rows(url: str) -> dict[str, float]:
    """The server's histogram of rows per decode step, as cumulative bucket counts {le: count}."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics") as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("vlexport_decode_step_rows_bucket"):
            le = line.split('le="')[1].split('"')[0]
            out[le] = float(line.split()[-1])
    return out


def _delta(after: dict, before: dict) -> dict[str, int]:
    """Steps with exactly k rows between two snapshots of the cumulative histogram."""
    keys = [k for k in after if k != "+Inf"]
    cumulative = [after[k] - before.get(k, 0.0) for k in keys]
    return {str(int(float(k))): int(c - (cumulative[i - 1] if i else 0)) for i, (k, c) in enumerate(zip(keys, cumulative))}


def summarize(results: list[LoadResult], wall_s: float) -> dict:
    ok = [r for r in results if r.error is None]
    lat = np.array([r.latency_s for r in ok]) if ok else np.zeros(1)
    ttft = np.array([r.first_token_s for r in ok]) if ok else np.zeros(1)
    tokens = sum(len(r.token_ids or []) for r in ok)
    return {"requests": len(results), "ok": len(ok), "errors": len(results) - len(ok), "wall_s": wall_s,
            "completion_tokens": tokens, "tokens_per_s": tokens / wall_s if wall_s else 0.0,
            "requests_per_s": len(ok) / wall_s if wall_s else 0.0,
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p99_s": float(np.percentile(lat, 99)),
            "first_token_p50_s": float(np.percentile(ttft, 50)), "first_token_p99_s": float(np.percentile(ttft, 99))}


def build_bank(work: Path, preset: str = "tiny-gqa", base: Path | None = None) -> Path:
    """The tests' bank on a fixture base (tiny-gqa; or small-gqa, 1/50 of LLaVA-1.5): tasks vqa (PEFT prefix, 4
    tokens), caption (AdapterHub bottlenecks, both towers), chat (AdapterHub prefix, 5 tokens, flat)."""
    import torch
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration
    from typer.testing import CliRunner

    from vlexport.cli import app
    from vlexport.fixture import make_adapterhub_bottleneck, make_adapterhub_prefix, make_llava

    work.mkdir(parents=True, exist_ok=True)
    out = work / "bank"
    if (out / "manifest.json").exists():
        return out
    if base is None:
        base = work / "llava"
        if not (base / "config.json").exists():
            make_llava(base, preset, seed=3)
    model = LlavaForConditionalGeneration.from_pretrained(str(base))
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(3.0 * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(str(work / "vqa"))
    vision = make_adapterhub_bottleneck(base, work / "caption_vision", "vision", "seqbn", seed=32)
    language = make_adapterhub_bottleneck(base, work / "caption_language", "language", "double_seqbn", seed=33)
    chat = make_adapterhub_prefix(base, work / "chat", prefix_length=5, flat=True, seed=7)
    r = CliRunner().invoke(app, ["build", "--base", str(base), "--adapter", f"vqa={work / 'vqa'}",
                                 "--adapter", f"caption={vision}", "--adapter", f"caption={language}",
                                 "--adapter", f"chat={chat}", "-o", str(out), "--no-verify"])
    if r.exit_code != 0:
        raise RuntimeError(f"build failed: {r.output}")
    return out


def _machine() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()[:12]
    except OSError:
        lscpu = []
    return {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count(),
            "lscpu": lscpu, "loadavg_before": os.getloadavg()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path, nargs="?", help="bundle directory (or give --build-tiny WORKDIR)")
    p.add_argument("out", type=Path, nargs="?", help="directory for serve.json and serve.md")
    p.add_argument("--build", type=Path, metavar="WORKDIR", help="build the tests' bank in WORKDIR and load that")
    p.add_argument("--preset", default="tiny-gqa", help="fixture base for --build (tiny-gqa, small-gqa)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-tokens", default="8,32", help="range of max_tokens, LOW,HIGH")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--request-timeout", type=float, default=600.0, help="the server's --request-timeout")
    p.add_argument("--note", default="", help="what else ran on the machine")
    p.add_argument("--stem", default="serve", help="output file names: STEM.json, STEM.md (default serve)")
    a = p.parse_args(argv)
    if a.build:  # one positional then: OUT
        a.out, a.bundle = a.bundle, build_bank(a.build, a.preset)
    if a.bundle is None or a.out is None:
        p.error("give BUNDLE OUT_DIR, or --build WORKDIR OUT_DIR")
    bundle = a.bundle
    a.out.mkdir(parents=True, exist_ok=True)
    low, high = (int(x) for x in a.max_tokens.split(","))
    opts = ["--max-batch", str(a.max_batch), "--max-queue", str(a.requests), "--request-timeout", str(a.request_timeout)]
    if a.threads:
        opts += ["--threads", str(a.threads)]
    machine = _machine()
    proc, url = start_server(bundle, *opts, log=a.out / f"{a.stem}-server.log")
    try:
        import urllib.request

        with urllib.request.urlopen(f"{url}/v1/models") as r:
            models = {m["id"]: m["vlexport"]["task"] for m in json.load(r)["data"]}
        requests = make_requests(a.requests, models, a.seed, (low, high))
        run_concurrent(url, make_requests(len(models), models, a.seed + 1, (4, 4)))  # warm-up: every task's sessions
        before = step_rows(url)
        concurrent, wall_c = run_concurrent(url, requests, timeout_s=a.request_timeout + 60)
        middle = step_rows(url)
        sequential, wall_s = run_concurrent(url, requests, concurrency=1, timeout_s=4 * a.request_timeout)
        after = step_rows(url)
    finally:
        code = stop_server(proc)
    expected = expected_tokens(bundle, requests, a.threads)
    mismatched = [r.index for r in concurrent + sequential if r.error is None and r.token_ids != expected[r.index]]
    errors = [f"{r.index}: {r.error}" for r in concurrent + sequential if r.error]
    ids = [r.id for r in concurrent]
    steps = {"concurrent": _delta(middle, before), "sequential": _delta(after, middle)}
    result = {
        "bundle": str(bundle), "models": models, "max_batch": a.max_batch, "threads": a.threads,
        "requests": [{"index": r.index, "model": r.model, "max_tokens": r.max_tokens, "image_bytes": len(r.image)}
                     for r in requests],
        "concurrent": summarize(concurrent, wall_c), "sequential": summarize(sequential, wall_s),
        "all_tokens_equal_bundle_generate": not mismatched, "mismatched": mismatched, "errors": errors,
        "duplicate_ids": len(ids) - len(set(ids)), "server_exit_code": code, "decode_steps_by_rows": steps,
        "machine": {**machine, "loadavg_after": os.getloadavg()}, "note": a.note,
    }
    (a.out / f"{a.stem}.json").write_text(json.dumps(result, indent=2))
    c, s = result["concurrent"], result["sequential"]
    rows = [("wall time (s)", "wall_s", 2), ("tokens/s", "tokens_per_s", 1), ("requests/s", "requests_per_s", 2),
            ("latency p50 (s)", "latency_p50_s", 3), ("latency p99 (s)", "latency_p99_s", 3),
            ("first token p50 (s)", "first_token_p50_s", 3), ("first token p99 (s)", "first_token_p99_s", 3)]
    md = [f"# vlexport serve: {a.requests} requests over loopback", "",
          f"Bundle `{bundle}`, models {', '.join(models)}; `--max-batch {a.max_batch}`"
          f"{f', `--threads {a.threads}`' if a.threads else ''}. Greedy, max_tokens {low}-{high}, one random image each "
          "(PNG/JPEG, 24-320 px), every second request streamed. Concurrent: all at once; sequential: one by one, "
          "same requests, same server.", "",
          "| | concurrent | one by one |", "|---|---|---|"]
    md += [f"| {label} | {c[k]:.{d}f} | {s[k]:.{d}f} |" for label, k, d in rows]
    md += [f"| completed / errors | {c['ok']} / {c['errors']} | {s['ok']} / {s['errors']} |", "",
           f"Every answer equals Bundle.generate's tokens for the same request alone: "
           f"{'yes' if not mismatched else f'NO ({mismatched})'}. Duplicate response ids: {result['duplicate_ids']}. "
           f"Server exit code after SIGTERM: {code}.", "",
           "Decode steps by rows in the step (from `/metrics`, histogram `vlexport_decode_step_rows`):", "",
           "| rows | " + " | ".join(str(k) for k in steps["concurrent"]) + " |",
           "|---|" + "---|" * len(steps["concurrent"]),
           *(f"| {phase} | " + " | ".join(str(v) for v in steps[phase].values()) + " |" for phase in steps), "",
           "Machine:", "", "```", *machine["lscpu"], f"load average before {machine['loadavg_before']}, after "
           f"{result['machine']['loadavg_after']}", "```"]
    if a.note:
        md += ["", a.note]
    (a.out / f"{a.stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if not (mismatched or errors or result["duplicate_ids"]) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Run the whole benchmark of one bundle and write JSON, a markdown table and a plot."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from ..progress import track
from .bandwidth import decode_bytes_per_token, measure_read_bandwidth
from .latency import BundleSide, TorchSide, prompt_ids, timed


def machine() -> dict:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import onnxruntime
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem, 1), "platform": platform.platform(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}


def merged_torch_model(manifest: dict):
    """The bundle's weights in PyTorch: its base with its adapters merged, exactly as the build made them."""
    from ..adapters import load_adapter, merge_adapters
    from ..model import load_llava

    model = load_llava(Path(manifest["base"]["path"]))
    merge_adapters(model, [load_adapter(a["path"], a["kind"]) for a in manifest["adapters"]])
    return model


def peak_rss_mb(side: str, bundle: Path, threads: int, backend: str = "onnxruntime") -> float:
    """Peak RSS of a fresh process that loads one side and generates 32 tokens (the OS's own accounting)."""
    done = subprocess.run([sys.executable, "-m", "vlexport.bench.rss", side, str(bundle), str(threads), backend],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"peak-RSS run for {side} failed: {done.stderr[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def _where(metric: str, where: dict) -> str:
    """'decode_ms context 300': the note of a progress step."""
    return " ".join([metric, *(f"{k} {v}" for k, v in where.items())])


def _row(metric: str, bundle_t, torch_t, higher_is_better: bool = False, **extra) -> dict:
    b, p = (bundle_t.p50, torch_t.p50) if hasattr(bundle_t, "p50") else (bundle_t, torch_t)
    row = {"metric": metric, **extra, "bundle": round(b, 3), "pytorch": round(p, 3),
           "ratio": round((b / p) if higher_is_better else (p / b), 3)}
    if hasattr(bundle_t, "p90"):
        row.update(bundle_p90=round(bundle_t.p90, 3), pytorch_p90=round(torch_t.p90, 3))
    return row


def run_bench(bundle_dir: Path, threads: int = 2, contexts=(64, 300, 1000), prompt_lengths=None, repeats: int = 10,
              warmup: int = 2, e2e_tokens: int = 32, measure_rss: bool = True, backend: str = "onnxruntime",
              peer: str | None = None, rounds: int = 3, log: Callable[[str], None] = lambda m: None) -> dict:
    """peer "onnxruntime-genai": the model builder's decoder from the same merged weights, built in a temporary
    directory for this run (bench/peer.py); decode and prefill of both are then timed in `rounds` interleaved
    rounds through each one's generate-step API, and those timings fill the rows' bundle and peer columns."""
    import tempfile

    import torch

    from ..runtime import Bundle
    from .peer import check_peer

    check_peer(peer)
    torch.set_num_threads(threads)
    bundle = Bundle(bundle_dir, threads=threads, backend=backend)
    manifest = bundle.manifest
    model = merged_torch_model(manifest)
    with tempfile.TemporaryDirectory(prefix="vlexport-peer-") as tmp:
        peer_side = _open_peer(peer, model, manifest, Path(tmp), threads, log) if peer else None
        return _run(bundle, model, peer_side, threads, contexts, prompt_lengths, repeats, warmup, e2e_tokens,
                    measure_rss, backend, rounds, log)


def _open_peer(peer: str, model, manifest: dict, work: Path, threads: int, log):
    from .peer import PeerSide, build_peer, peer_precision, write_llama_dir

    precision = peer_precision(manifest)
    llama = write_llama_dir(model, Path(manifest["base"]["path"]), work / "llama")
    side = PeerSide(build_peer(llama, work / "peer", precision, threads, log))
    side.name, side.precision = peer, precision
    return side


def _run(bundle, model, peer_side, threads, contexts, prompt_lengths, repeats, warmup, e2e_tokens, measure_rss,
         backend, rounds, log) -> dict:
    from ..plan import parameter_counts

    bundle_dir, manifest = bundle.path, bundle.manifest
    rng = np.random.default_rng(0)
    ours, theirs = BundleSide(bundle), TorchSide(model)
    n_img = bundle.num_image_tokens
    prompt_lengths = prompt_lengths or (n_img + 16, n_img + 128, n_img + 512)
    pixels = ours.pixels()
    few = max(3, repeats // 2)
    # (metric, where, bundle callable, PyTorch callable, warm-ups, repeats)
    cases = [("vision_ms", {"images": 1}, ours.vision(pixels), theirs.vision(pixels), warmup, repeats)]
    feats = bundle.image_features(pixels)
    for length in prompt_lengths:
        ids = prompt_ids(bundle, length, rng)
        where = {"prompt_tokens": int(ids.shape[1])}
        cases.append(("ttft_ms", where, ours.ttft(pixels, ids), theirs.ttft(pixels, ids), 1, few))
        cases.append(("prefill_ms", where, ours.prefill(ids, feats), theirs.prefill(bundle.embed(ids, feats)), 1, few))
    for context in contexts:
        cases.append(("decode_ms", {"context": context}, ours.decode(context), theirs.decode(context, rng), warmup, 2 * repeats))
    # All bundle timings, then all PyTorch timings: ONNX Runtime's worker threads spin briefly after each run and
    # would steal cores from PyTorch if the two alternated.
    log("timing the bundle")
    peer_t: list = [None] * len(cases)
    with track(log, "bench: bundle", total=len(cases)) as advance:
        ours_t = []
        for i, c in enumerate(cases):
            if peer_side is not None and c[0] in ("prefill_ms", "decode_ms"):
                ours_t.append(None)  # timed below, in rounds interleaved with the peer
            else:
                ours_t.append(timed(c[2], c[4], c[5]))
            advance(1, _where(c[0], c[1]))
    if peer_side is not None:
        log(f"timing the bundle and the peer ({peer_side.name}, {peer_side.precision}) in {rounds} interleaved rounds")
        from .latency import Timing
        from .peer import bundle_decode_round, bundle_prefill_round, interleaved

        with track(log, "bench: bundle vs peer", total=sum(c[0] in ("prefill_ms", "decode_ms") for c in cases)) as advance:
            for i, (metric, where, *_rest) in enumerate(cases):
                if metric not in ("prefill_ms", "decode_ms"):
                    continue
                n = where.get("context") or where.get("prompt_tokens")
                ids = rng.integers(3, bundle.image_token_id - 1, size=(1, n), dtype=np.int64)
                if metric == "decode_ms":
                    ours_fn, peer_fn = (lambda: bundle_decode_round(bundle, ids, 2 * repeats),
                                        lambda: peer_side.decode_round(ids, 2 * repeats))
                    bundle_decode_round(bundle, ids, warmup)  # warm-up, both sides
                    peer_side.decode_round(ids, warmup)
                else:
                    ours_fn, peer_fn = (lambda: bundle_prefill_round(bundle, ids, few),
                                        lambda: peer_side.prefill_round(ids, few))
                    bundle_prefill_round(bundle, ids, 1)
                    peer_side.prefill_round(ids, 1)
                a, b = interleaved(ours_fn, peer_fn, rounds)
                ours_t[i], peer_t[i] = Timing(a), Timing(b)
                advance(1, _where(metric, where))
    time.sleep(1.0)
    log("timing PyTorch")
    with track(log, "bench: PyTorch", total=len(cases)) as advance:
        theirs_t = []
        for c in cases:
            theirs_t.append(timed(c[3], c[4], c[5]))
            advance(1, _where(c[0], c[1]))

    config = json.loads((Path(manifest["base"]["path"]) / "config.json").read_text())
    decoder_params = parameter_counts(config)["decoder"]
    # The decoder's weights as stored (FP32, or INT8/INT4 bytes where it was lowered) are what one decode step
    # streams; the bandwidth is measured over a working set of that size (a 440 MB model still partly fits a
    # large shared L3, a 7B one does not).
    from .precision import decoder_bytes

    weight_bytes = decoder_bytes(bundle_dir, manifest)
    working_set_mb = max(64, weight_bytes // 2**20)
    log(f"read bandwidth over {working_set_mb} MB")
    bandwidth = measure_read_bandwidth(threads, megabytes=working_set_mb)
    m = manifest["model"]
    rows = []
    for (metric, where, *_), b, p, q in zip(cases, ours_t, theirs_t, peer_t):
        extra = dict(where)
        if metric == "decode_ms":
            floor_ms = 1000 * decode_bytes_per_token(weight_bytes, 1, m["num_layers"], m["num_kv_heads"],
                                                     m["head_dim"], where["context"]) / bandwidth
            extra.update(floor_ms=round(floor_ms, 3), floor_ratio=round(b.p50 / floor_ms, 3))
        if q is not None:  # peer / bundle, so > 1 means vlexport is faster, as for PyTorch
            extra.update(peer=round(q.p50, 3), peer_p90=round(q.p90, 3), peer_ratio=round(q.p50 / b.p50, 3))
        rows.append(_row(metric, b, p, **extra))

    log("end to end")
    import skimage.data
    from PIL import Image
    from transformers import AutoProcessor

    from ..backends.torch_reference import reference_generate

    image = Image.fromarray(skimage.data.astronaut())
    text = bundle.chat_prompt("Describe the image.")
    processor = AutoProcessor.from_pretrained(manifest["base"]["path"])
    tok_b, tok_p = [], []
    with track(log, "bench: end to end", total=3) as advance:
        for _ in range(3):
            t = time.perf_counter()
            n = len(bundle.generate(image, raw_prompt=text, max_new_tokens=e2e_tokens).token_ids)
            tok_b.append(n / (time.perf_counter() - t))
            t = time.perf_counter()
            n = len(reference_generate(model, processor, image, text, e2e_tokens))
            tok_p.append(n / (time.perf_counter() - t))
            advance()
    rows.append(_row("e2e_tokens_per_s", float(np.median(tok_b)), float(np.median(tok_p)), higher_is_better=True,
                     new_tokens=e2e_tokens))
    if measure_rss:
        log("peak RSS (fresh processes)")
        with track(log, "bench: peak RSS", total=2) as advance:
            ours_rss = peak_rss_mb("bundle", bundle_dir, threads, backend)
            advance(1, "bundle")
            theirs_rss = peak_rss_mb("pytorch", bundle_dir, threads, backend)
            advance(1, "pytorch")
        rows.append(_row("peak_rss_mb", ours_rss, theirs_rss))
    return {
        "bundle": str(bundle_dir), "target": manifest["target"]["name"], "backend": backend, "threads": threads,
        "repeats": repeats, "machine": machine(), "read_bandwidth_gbs": round(bandwidth / 1e9, 2),
        "bandwidth_working_set_mb": working_set_mb, "decoder_weight_bytes": weight_bytes,
        "model": {"decoder_params": decoder_params, "num_layers": m["num_layers"], "hidden_size": m["hidden_size"],
                  "vocab_size": m["vocab_size"], "num_image_tokens": n_img},
        "pytorch": "eager fp32, the bundle's merged weights, transformers' modules, same thread count",
        "decoder_form": manifest["parts"]["decoder"].get("form", "portable"),
        "peer": None if peer_side is None else {
            "name": peer_side.name, "precision": peer_side.precision, "rounds": rounds,
            "method": "onnxruntime-genai's model builder on the bundle's merged language model (a Llama directory); "
                      "both sides through their generate-step API (Bundle.prefill/step + greedy pick; og.Generator "
                      "append_tokens/generate_next_token), fresh state per round, rounds interleaved; prefill and "
                      "decode rows' bundle column is from those same rounds"},
        "rows": rows,
        "build": manifest.get("build", {}),
    }


def markdown(result: dict) -> str:
    lines = [
        f"Bundle `{Path(result['bundle']).name}` (target {result['target']}), {result['threads']} threads, "
        f"{result['machine']['cpu']} ({result['machine']['cores']} cores, {result['machine']['memory_gib']} GiB), "
        f"onnxruntime {result['machine']['onnxruntime']}, torch {result['machine']['torch']}. "
        f"Read bandwidth {result['read_bandwidth_gbs']} GB/s.",
        "",
        "| metric | at | vlexport p50 | p90 | PyTorch p50 | p90 | ratio (>1: vlexport better) | floor | vs floor "
        "| peer p50 | vs peer (>1: vlexport faster) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    peer = result.get("peer")
    if peer:
        lines[0] += (f" Peer: {peer['name']} model builder at {peer['precision']}, {peer['rounds']} interleaved rounds "
                     f"(decoder form {result.get('decoder_form', 'portable')}).")
    for r in result["rows"]:
        at = r.get("context", r.get("prompt_tokens", r.get("images", r.get("new_tokens", ""))))
        at = f"context {at}" if "context" in r else f"{at} tokens" if "prompt_tokens" in r else at
        lines.append(f"| {r['metric']} | {at} | {r['bundle']:.2f} | {r.get('bundle_p90', '')} | {r['pytorch']:.2f} | "
                     f"{r.get('pytorch_p90', '')} | {r['ratio']:.2f}x | {r.get('floor_ms', '')} | "
                     f"{str(r['floor_ratio']) + 'x' if 'floor_ratio' in r else ''} | {r.get('peer', '')} | "
                     f"{str(r['peer_ratio']) + 'x' if 'peer_ratio' in r else ''} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["metric"] in ("vision_ms", "ttft_ms", "prefill_ms", "decode_ms")]
    labels = [f"{r['metric'][:-3]}\n{r.get('context', r.get('prompt_tokens', ''))}" for r in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 1.1), 4))
    peer = result.get("peer")
    # (label, values, offset): PyTorch, vlexport and, with --peer, the builder's model side by side
    bars = [("PyTorch eager", [r["pytorch"] for r in rows]), ("vlexport (ONNX Runtime)", [r["bundle"] for r in rows])]
    if peer:
        bars.append((f"{peer['name']} builder ({peer['precision']})", [r.get("peer", 0) for r in rows]))
    width = 0.8 / len(bars)
    offsets = [(k - (len(bars) - 1) / 2) * width for k in range(len(bars))]
    for (name, values), off in zip(bars, offsets):
        ax.bar(x + off, values, width, label=name)
    for i, r in enumerate(rows):
        if "floor_ms" in r:
            ax.hlines(r["floor_ms"], i - 0.4, i + 0.4, colors="k", linestyles="dashed", label="bandwidth floor" if i == len(rows) - 1 else None)
        ax.annotate(f"{r['ratio']:.2f}x", (i + offsets[1], r["bundle"]), ha="center", va="bottom", fontsize=8)
        if "peer_ratio" in r:
            ax.annotate(f"{r['peer_ratio']:.2f}x", (i + offsets[2], r["peer"]), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("ms (p50)")
    ax.set_yscale("log")
    ax.set_title(f"{Path(result['bundle']).name}: {result['threads']} threads, {result['machine']['cpu']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

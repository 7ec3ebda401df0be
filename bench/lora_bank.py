"""Swappable LoRA on the small fixture (issue 15): what the slots cost, what switching costs, what a mixed batch
buys, and how big a bank is.

    python bench/lora_bank.py WORKDIR OUT_DIR [--threads 2] [--rounds 5]

Builds in WORKDIR (kept between runs):
  - plain: the bare base, no adapters (no slot inputs in any graph);
  - r16: a bank of four rank-16 LoRA tasks on q,k,v,o,gate,up,down of the language model (PEFT, trained size,
    N(0, 0.02^2)), each fed through the LoRA slots of the one base decoder;
  - bank: the issue's bank (a DoRA; an rsLoRA with rank/alpha patterns and lm_head; a LoRA over the vision tower,
    projector and language model; an AdapterHub bottleneck task; a PEFT prefix task), with build-time verify.
Measures on ONNX Runtime CPU with `--threads` threads, in one process, rounds interleaved:
  - decode ms/step at context 300: plain; r16 with no task (empty slots, rank 0); r16 with a task fed (rank 16);
  - switch: the lookups a request of another task makes before its first run (slot feeds of vision and decoder, the
    prefix), warm (the task's feed already built once) and cold (first use after open); and the cost, per decode
    step, of alternating tasks on consecutive steps against staying on one;
  - mixed batch: 4 requests over the 4 tasks of r16, in one generate_batch call against the same 4 requests run one by
    one with generate (tokens per second over the whole call, vision and prefill included), tokens checked equal;
  - size: each bundle's bytes against the base's weight files plus the adapters' files.
The floor is the decoder's weight bytes plus the KV cache at context 300, read at the measured bandwidth.
Writes OUT_DIR/lora-bank.json and OUT_DIR/lora-bank.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LANGUAGE = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
R16_TASKS = ("t1", "t2", "t3", "t4")
PROMPT = "USER: <image>\nWhat is in the picture? ASSISTANT:"
CONTEXT = 300


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def build(args: list, out: Path) -> float:
    if (out / "manifest.json").exists():
        return float("nan")  # kept from an earlier run
    t = time.perf_counter()
    subprocess.run(["vlexport", "build", *map(str, args), "-o", str(out), "--force", "--quiet"], check=True)
    return time.perf_counter() - t


def make_inputs(work: Path) -> tuple[Path, dict, dict]:
    from vlexport.fixture import make_adapterhub_bottleneck, make_llava, make_lora

    base = work / "small"
    if not (base / "config.json").exists():
        log("making the small fixture")
        make_llava(base, "small")
    r16 = {}
    for i, name in enumerate(R16_TASKS):
        path = work / f"lora16-{name}"
        if not (path / "adapter_model.safetensors").exists():
            make_lora(base, path, seed=100 + i, scale=0.02, r=16, lora_alpha=32, target_modules=LANGUAGE)
        r16[name] = path
    bank = {
        "dora": (work / "dora", dict(seed=41, use_dora=True,
                                     target_modules=r".*language_model.*\.(q_proj|v_proj|o_proj|down_proj)")),
        "rs": (work / "rs", dict(seed=42, use_rslora=True, rank_pattern={"k_proj": 4}, alpha_pattern={"gate_proj": 32},
                                 target_modules=LANGUAGE + r"|lm_head", save_embedding_layers=False)),
        "full": (work / "full", dict(seed=43)),
    }
    adapters = {}
    for name, (path, options) in bank.items():
        save_embedding_layers = options.pop("save_embedding_layers", True)
        if not (path / "adapter_model.safetensors").exists():
            make_lora(base, path, scale=0.02, **options)
            if not save_embedding_layers:
                drop_saved_lm_head(path)
        adapters[name] = path
    adapters["bn"] = work / "bn"
    if not (adapters["bn"] / "adapter_config.json").exists():
        make_adapterhub_bottleneck(base, adapters["bn"], "language", seed=44, scale=0.05)
    adapters["px"] = work / "px"
    if not (adapters["px"] / "adapter_config.json").exists():
        make_prefix(base, adapters["px"])
    return base, r16, adapters


def drop_saved_lm_head(path: Path) -> None:
    """PEFT saves the frozen lm_head next to a LoRA on it unless save_embedding_layers=False; keep the LoRA alone."""
    from safetensors.torch import load_file, save_file

    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    save_file({k: v for k, v in tensors.items() if k != "base_model.model.lm_head.base_layer.weight"}, str(file))


def make_prefix(base: Path, out: Path) -> None:
    import torch
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    model = get_peft_model(LlavaForConditionalGeneration.from_pretrained(str(base)),
                           PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16))
    g = torch.Generator().manual_seed(45)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(out))


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(1000 * (time.perf_counter() - t))
    return float(np.median(samples))


def weight_bytes(base: Path) -> int:
    return sum(f.stat().st_size for f in base.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("work", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--build-only", action="store_true", help="make the inputs and bundles, time nothing")
    ap.add_argument("--no-bank", action="store_true", help="leave the issue's bank out (its build-time verify is long)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    a.out.mkdir(parents=True, exist_ok=True)

    base, r16, adapters = make_inputs(a.work)
    seconds = {"plain": build(["--base", base, "--no-verify"], a.work / "plain")}
    log("building the rank-16 bank")
    seconds["r16"] = build(["--base", base, "--no-verify", *sum((["--adapter", f"{n}={p}"] for n, p in r16.items()), [])],
                           a.work / "r16")
    if not a.no_bank:
        log("building the issue's bank (with build-time verify)")
        seconds["bank"] = build(["--base", base, *sum((["--adapter", f"{n}={p}"] for n, p in adapters.items()), [])],
                                a.work / "bank")
    if a.build_only:
        return

    import skimage.data
    from PIL import Image
    import torch

    import vlexport
    from vlexport.bench.bandwidth import measure_read_bandwidth
    from vlexport.bench.latency import BundleSide

    torch.set_num_threads(a.threads)
    plain = vlexport.load(a.work / "plain", threads=a.threads)
    bank16 = vlexport.load(a.work / "r16", threads=a.threads)
    for b in (plain, bank16):
        assert b.decoder_form() == "ort-native", b.decoder_form()

    # -- decode ms/step at context 300, rounds interleaved ---------------------------------------------------------
    steps = {"plain": BundleSide(plain).decode(CONTEXT), "r16, no task (empty slots)": BundleSide(bank16).decode(CONTEXT),
             "r16, task t1 (rank 16 fed)": BundleSide(bank16).decode(CONTEXT, "t1")}
    rounds = {k: [] for k in steps}
    log("timing decode")
    for _ in range(a.rounds):
        for name, fn in steps.items():
            rounds[name].append(median_ms(fn, repeats=40))
    decode = {k: float(np.median(v)) for k, v in rounds.items()}

    # -- switching ----------------------------------------------------------------------------------------------------
    def switch(task):
        bank16.prefix(task)
        bank16.slot_feed("vision", task)
        bank16.slot_feed("decoder", task)

    warm = []
    for task in [*R16_TASKS, None] * 40:
        t = time.perf_counter()
        switch(task)
        warm.append(1000 * (time.perf_counter() - t))
    cold = []
    for task in R16_TASKS:
        bank16._slot_feeds.clear()  # first use after open: the task's feed is built (padded to one rank per part)
        t = time.perf_counter()
        switch(task)
        cold.append(1000 * (time.perf_counter() - t))
    side = BundleSide(bank16)
    per_task = {t: side.decode(CONTEXT, t) for t in R16_TASKS[:2]}
    same, alternating = [], []
    for _ in range(a.rounds):
        same.append(median_ms(lambda: (per_task["t1"](), per_task["t1"]()), repeats=20) / 2)
        alternating.append(median_ms(lambda: (per_task["t1"](), per_task["t2"]()), repeats=20) / 2)
    switch_step_ms = float(np.median(alternating) - np.median(same))

    # -- mixed batch -----------------------------------------------------------------------------------------------
    photo = Image.fromarray(skimage.data.astronaut())
    requests = [vlexport.Request(photo, raw_prompt=PROMPT, task=t, max_new_tokens=a.new_tokens) for t in R16_TASKS]
    solo_tokens = [bank16.generate(photo, raw_prompt=PROMPT, max_new_tokens=a.new_tokens, task=t).token_ids
                   for t in R16_TASKS]
    batch_tokens = [g.token_ids for g in bank16.generate_batch(requests)]
    assert batch_tokens == solo_tokens, "a mixed batch must give each request's tokens alone"
    assert len({tuple(t) for t in solo_tokens}) > 1, "the tasks should answer differently"
    total = sum(len(t) for t in solo_tokens)
    log("timing mixed batch")
    # Whole calls (vision and prefill of each request included, the same work both ways), and the decode phase
    # alone (the tokens after each request's first, which its prefill gives).
    one_by_one, together, decode_solo, decode_batch = [], [], [], []
    for _ in range(3):
        t = time.perf_counter()
        runs = [bank16.generate(photo, raw_prompt=PROMPT, max_new_tokens=a.new_tokens, task=task) for task in R16_TASKS]
        one_by_one.append(time.perf_counter() - t)
        decode_solo.append(sum(g.timings["decode_ms_per_token"] * (len(g.token_ids) - 1) for g in runs) / 1000)
        t = time.perf_counter()
        batch = bank16.generate_batch(requests)
        together.append(time.perf_counter() - t)
        decode_batch.append(batch[0].timings["batch_decode_ms"] / 1000)
    tps_solo, tps_batch = total / float(np.median(one_by_one)), total / float(np.median(together))
    stepped = total - len(requests)
    dps_solo, dps_batch = stepped / float(np.median(decode_solo)), stepped / float(np.median(decode_batch))

    # -- sizes and floor -----------------------------------------------------------------------------------------
    sizes = {}
    for name, adapter_paths in [("plain", {}), ("r16", r16)] + ([] if a.no_bank else [("bank", adapters)]):
        bundle_bytes, base_bytes = size(a.work / name), weight_bytes(base)
        adapter_bytes = sum(size(p) for p in adapter_paths.values())
        sizes[name] = {"bundle": bundle_bytes, "base_weights": base_bytes, "adapters": adapter_bytes,
                       "ratio": bundle_bytes / (base_bytes + adapter_bytes)}
    manifest = {"parity": {"passed": None}, "tasks": {}} if a.no_bank else json.loads((a.work / "bank" / "manifest.json").read_text())
    m = plain.manifest["model"]
    bandwidth = measure_read_bandwidth(a.threads)
    decoder_bytes = size(a.work / "plain" / "decoder.onnx") + size(a.work / "plain" / "decoder.onnx.data")
    kv_bytes = 2 * m["num_layers"] * plain.num_kv_heads * plain.head_dim * CONTEXT * 4
    floor_ms = 1000 * (decoder_bytes + kv_bytes) / bandwidth

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; threads {a.threads}",
        "versions": {"onnxruntime": __import__("onnxruntime").__version__, "torch": torch.__version__},
        "decode_ms_context_300": decode, "decode_rounds": rounds, "floor_ms": floor_ms,
        "ratios": {"empty slots / plain": decode["r16, no task (empty slots)"] / decode["plain"],
                   "rank 16 fed / plain": decode["r16, task t1 (rank 16 fed)"] / decode["plain"],
                   "plain / floor": decode["plain"] / floor_ms},
        "switch_ms": {"warm_median": float(np.median(warm)), "warm_max": float(np.max(warm)),
                      "cold_median": float(np.median(cold)), "cold_max": float(np.max(cold)),
                      "alternating_step_extra_ms": switch_step_ms},
        "mixed_batch": {"requests": len(requests), "new_tokens_total": total,
                        "one_by_one_s": one_by_one, "batch_s": together, "tokens_per_s_one_by_one": tps_solo,
                        "tokens_per_s_batch": tps_batch, "speedup": tps_batch / tps_solo,
                        "decode_phase_tokens_per_s_one_by_one": dps_solo, "decode_phase_tokens_per_s_batch": dps_batch,
                        "decode_phase_speedup": dps_batch / dps_solo},
        "sizes": sizes, "build_seconds": seconds,
        "bank_parity_passed": manifest["parity"]["passed"],
        "bank_task_bytes": {k: v.get("bytes") for k, v in manifest["tasks"].items()},
    }
    (a.out / "lora-bank.json").write_text(json.dumps(result, indent=2))
    r, s = result["ratios"], result["switch_ms"]
    lines = [
        f"# Swappable LoRA on the small fixture (issue 15): {result['machine']}", "",
        f"onnxruntime {result['versions']['onnxruntime']}, torch {result['versions']['torch']}. "
        f"Script: `python bench/lora_bank.py WORK OUT --threads {a.threads} --rounds {a.rounds}`. "
        "All figures from one run; decode rounds interleaved (median of per-round medians of 40 steps).", "",
        "| decode at context 300 (ORT-native decoder) | ms/step | vs plain | goal |", "|---|---|---|---|",
        f"| plain (bare base, no slot inputs) | {decode['plain']:.2f} | 1.00x | |",
        f"| rank-16 bank, no task (empty slots) | {decode['r16, no task (empty slots)']:.2f} | "
        f"{r['empty slots / plain']:.3f}x | <= 1.03x |",
        f"| rank-16 bank, task fed (q,k,v,o,gate,up,down) | {decode['r16, task t1 (rank 16 fed)']:.2f} | "
        f"{r['rank 16 fed / plain']:.3f}x | <= 1.10x |",
        f"| bandwidth floor (decoder weights + KV at 300) | {floor_ms:.2f} | plain is {r['plain / floor']:.2f}x the floor | |",
        "",
        f"Task switch (slot feeds of vision and decoder, prefix): warm median {s['warm_median'] * 1000:.1f} us, max "
        f"{s['warm_max'] * 1000:.1f} us; cold (first use after open) median {s['cold_median']:.3f} ms, max "
        f"{s['cold_max']:.3f} ms (goal <= 1 ms). Alternating two tasks on consecutive decode steps costs "
        f"{s['alternating_step_extra_ms']:+.3f} ms per step against staying on one.", "",
        f"Mixed batch: {len(requests)} requests over 4 rank-16 tasks, {a.new_tokens} new tokens max each "
        f"({total} in all, tokens equal to each request alone): one by one {tps_solo:.1f} tok/s, one generate_batch "
        f"{tps_batch:.1f} tok/s: **{result['mixed_batch']['speedup']:.2f}x** (goal >= 2x). The decode phase alone "
        f"(tokens after each request's first): {dps_solo:.1f} against {dps_batch:.1f} tok/s, "
        f"**{dps_batch / dps_solo:.2f}x**. Vision and prefill (576 image tokens per request) are the same work both "
        "ways and run one request at a time.", "",
        "| bundle | bundle bytes | base weights + adapter files | ratio | goal |", "|---|---|---|---|---|",
    ]
    for name, z in sizes.items():
        goal = "<= 1.05" if name != "plain" else ""
        lines.append(f"| {name} | {z['bundle'] / 1e6:.1f} MB | {(z['base_weights'] + z['adapters']) / 1e6:.1f} MB | "
                     f"{z['ratio']:.3f} | {goal} |")
    if not a.no_bank:
        lines += ["", f"The issue's bank (dora, rs, full, bn, px) passed build-time verify per task: "
                  f"{'yes' if result['bank_parity_passed'] else 'NO'}.", ""]
    (a.out / "lora-bank.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

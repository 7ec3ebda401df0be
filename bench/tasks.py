"""Cost of swappable adapters on the small fixture: task-switch time, and what the bottleneck slots cost.

    python bench/tasks.py WORKDIR OUT_DIR

Builds (in WORKDIR) the small fixture with the demo's LoRA + BitFit merged, once as a plain bundle and once as a
bank with an AdapterHub SeqBn vision adapter + Houlsby language adapter task, a PEFT prefix task and a ParBn task,
then measures on ONNX Runtime at 2 threads:
  - switch: the time to change task between requests (what generate() does before its first run),
  - vision and decode (context 300) of the bank fed "no adapter" and fed each task, against the plain bundle.
Writes OUT_DIR/tasks.json and OUT_DIR/tasks.md.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def sh(*args):
    subprocess.run([str(a) for a in args], check=True, stdout=subprocess.DEVNULL)


def timed(fn, repeats=20, warmup=3):
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(1000 * (time.perf_counter() - t))
    return float(np.median(samples))


def main(work: Path, out: Path):
    import torch

    from vlexport.bench.latency import BundleSide
    from vlexport.fixture import make_adapterhub_bottleneck, make_bitfit, make_llava, make_lora

    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    base = work / "small"
    if not (base / "config.json").exists():
        make_llava(base, "small")
    lora, bitfit = make_lora(base, work / "lora"), make_bitfit(base, work / "bitfit.safetensors")
    vision = make_adapterhub_bottleneck(base, work / "vqa_vision", "vision", "seqbn", seed=1, scale=0.05)
    language = make_adapterhub_bottleneck(base, work / "vqa_language", "language", "double_seqbn", seed=2, scale=0.05)
    parbn = make_adapterhub_bottleneck(base, work / "cap_language", "language", "parbn", seed=3, scale=0.05)
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    prefix = work / "prefix"
    pm = get_peft_model(LlavaForConditionalGeneration.from_pretrained(str(base)),
                        PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16))
    pm.save_pretrained(str(prefix))

    t = time.perf_counter()
    sh("vlexport", "build", "--base", base, "--adapter", lora, "--adapter", bitfit, "-o", work / "plain", "--force", "--no-verify")
    plain_s = time.perf_counter() - t
    t = time.perf_counter()
    sh("vlexport", "build", "--base", base, "--adapter", lora, "--adapter", bitfit,
       "--adapter", f"vqa={vision}", "--adapter", f"vqa={language}", "--adapter", f"chat={prefix}",
       "--adapter", f"caption={parbn}", "-o", work / "bank", "--force")
    bank_s = time.perf_counter() - t

    import vlexport

    plain, bank = vlexport.load(work / "plain", threads=2), vlexport.load(work / "bank", threads=2)
    torch.set_num_threads(2)
    pixels = BundleSide(plain).pixels()
    rows = {"plain": {}, "bank (no task)": {}}
    for name, bundle, task in [("plain", plain, None), ("bank (no task)", bank, None), ("bank vqa", bank, "vqa"),
                               ("bank caption", bank, "caption"), ("bank chat", bank, "chat")]:
        rows[name] = {
            "vision_ms": timed(lambda: bundle.image_features(pixels, task), repeats=10),
            "decode_ms_context_300": timed(BundleSide(bundle).decode(300, task)),
        }
    switches = []
    for task in ["vqa", "chat", "caption", None] * 25:
        t = time.perf_counter()
        bank.prefix(task)
        bank.slot_feed("vision", task)
        bank.slot_feed("decoder", task)
        switches.append(1000 * (time.perf_counter() - t))
    manifest = json.loads((work / "bank" / "manifest.json").read_text())
    result = {
        "fixture": "small (LoRA + BitFit merged) on ONNX Runtime CPU, 2 threads",
        "switch_ms_median": float(np.median(switches)), "switch_ms_max": float(np.max(switches)),
        "rows": rows,
        "build_seconds": {"plain (no verify)": plain_s, "bank (verify of 3 tasks + base)": bank_s},
        "bank_parity_passed": manifest["parity"]["passed"],
        "pack_bytes": {k: v["bytes"] for k, v in manifest["tasks"].items()},
    }
    (out / "tasks.json").write_text(json.dumps(result, indent=2))
    lines = [f"Task switching on the {result['fixture']}: median {result['switch_ms_median']:.3f} ms, "
             f"max {result['switch_ms_max']:.3f} ms over 100 switches (goal: <= 50 ms).", "",
             "| bundle / task | vision ms | decode ms (context 300) |", "|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['vision_ms']:.1f} | {r['decode_ms_context_300']:.2f} |")
    lines += ["", f"Packs: {result['pack_bytes']} bytes. Bank parity (every task and the base, against PyTorch): "
              f"{'passed' if result['bank_parity_passed'] else 'FAILED'}.", ""]
    (out / "tasks.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))

#!/usr/bin/env python
# Usage: vlexport build --base TINY --no-verify -o B && python bench/inspect_large.py B   (B is changed: its weights grow)
"""Time `vlexport inspect` on a bundle with a 7B's file sizes: the tiny bundle with its parts' weight files grown
(sparse) to llava-1.5-7b's FP16 part sizes, then sealed again."""
import json, os, subprocess, sys, time
from pathlib import Path
from vlexport.bundle import reseal
b = Path(sys.argv[1])
sizes = {"vision.onnx.data": 624_000_000, "embed.onnx.data": 262_000_000, "decoder.onnx.data": 13_214_000_000}
for name, size in sizes.items():
    f = b / name
    if f.exists():
        os.truncate(f, size)
t = time.time(); reseal(b); print(f"reseal (hash {sum(sizes.values())/1e9:.1f} GB): {time.time()-t:.1f} s")
total = sum(p.stat().st_size for p in b.rglob("*") if p.is_file())
print(f"bundle bytes: {total/1e9:.2f} GB")
for args in (["inspect", str(b)], ["inspect", str(b), "--json"]):
    times = []
    for _ in range(5):
        t = time.time(); r = subprocess.run(["vlexport", *args], capture_output=True); times.append(time.time() - t)
        assert r.returncode == 0, r.stderr
    times.sort(); print(" ".join(args[:1] + args[2:]), f"min {times[0]:.2f} s, median {times[2]:.2f} s, max {times[-1]:.2f} s")
t = time.time(); r = subprocess.run(["vlexport", "inspect", str(b), "--verify"], capture_output=True); print(f"inspect --verify: {time.time()-t:.1f} s rc={r.returncode}")
t = time.time(); r = subprocess.run([sys.executable, "-c", "import vlexport.cli"], capture_output=True); print(f"python -c 'import vlexport.cli': {time.time()-t:.2f} s")

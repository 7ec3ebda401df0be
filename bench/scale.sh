#!/usr/bin/env bash
# Reproduce bench/results/*/scale-7b-*: LLaVA-1.5-7B's dimensions with random fp16 weights (14 GB) and a trained-size
# LoRA, built for cpu-fp16 on this machine. Needs about 30 GB of free disk; about 10 minutes on a 2-core machine.
# The last step tries one answer from the bundle and records how it ends: ONNX Runtime's CPU provider runs FP16
# matrix products through inserted casts, and a 7B did not fit in 24 GB that way (see the results README).
# Usage: bash bench/scale.sh [OUT_DIR]
set -euo pipefail
out="${1:-bench/results/$(date +%Y-%m-%d)-$(nproc)core}"
work="$(mktemp -d)"
mkdir -p "$out"
python -c "from skimage import data; from PIL import Image; Image.fromarray(data.astronaut()).save('$work/astronaut.png')"
/usr/bin/time -v vlexport fixture llava "$work/llava7b" --preset 7b-shaped 2> "$out/scale-7b-fixture-time.txt"
/usr/bin/time -v vlexport fixture lora "$work/llava7b" "$work/lora" --scale 0.02 2> "$out/scale-7b-lora-time.txt"
/usr/bin/time -v vlexport build --base "$work/llava7b" --adapter "$work/lora" --target cpu-fp16 -o "$work/b7" \
    2> "$out/scale-7b-build-time.txt"
python -c "import json; m = json.load(open('$work/b7/manifest.json')); print(json.dumps({'build': m['build'], \
    'parts': {k: {f: v[f] for f in ('file', 'precision', 'export_check')} for k, v in m['parts'].items()}, \
    'memory_plan': m['memory_plan']}, indent=2))" > "$out/scale-7b-stages.json"
cp "$work/b7/parity_report.json" "$out/scale-7b-parity.json"
/usr/bin/time -v vlexport run "$work/b7" --image "$work/astronaut.png" --prompt "What is in the picture?" \
    --max-new-tokens 8 --json > "$out/scale-7b-run.json" 2> "$out/scale-7b-run-time.txt" || true
rm -rf "$work"
echo "results in $out"

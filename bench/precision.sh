#!/usr/bin/env bash
# Reproduce bench/results/*/precision.*: the small fixture with a LoRA and a bottleneck bank task, built at FP32, FP16
# and INT8 (cpu, cpu-fp16, cpu-int8), then per-part latency of all three against PyTorch eager FP32 in one run.
# About 20 minutes on a 2-core machine. Usage: bash bench/precision.sh [OUT_DIR]
set -euo pipefail
out="${1:-bench/results/$(date +%Y-%m-%d)-$(nproc)core}"
work="$(mktemp -d)"
mkdir -p "$out"
vlexport fixture llava "$work/small" --preset small
vlexport fixture lora "$work/small" "$work/lora" --scale 0.02
python -c "from vlexport.fixture import make_adapterhub_bottleneck as m; m('$work/small', '$work/bn', 'language', scale=0.05)"
for target in cpu cpu-fp16 cpu-int8; do
  /usr/bin/time -v vlexport build --base "$work/small" --adapter "$work/lora" --adapter "vqa=$work/bn" \
      --target "$target" -o "$work/$target" 2> "$out/precision-build-$target.txt"
  cp "$work/$target/parity_report.json" "$out/precision-parity-$target.json"
done
vlexport bench "$work/cpu" --compare "$work/cpu-fp16" --compare "$work/cpu-int8" --threads 2 --contexts 64,300 \
    --json --markdown "$out/precision.md" > "$out/precision.json"
echo "results in $out"

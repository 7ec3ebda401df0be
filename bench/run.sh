#!/usr/bin/env bash
# Reproduce bench/results/: build the tiny and small fixture bundles (LoRA + BitFit) and benchmark them against
# PyTorch eager at 2 threads. Takes about 10 minutes on a 2-core machine. Usage: bash bench/run.sh [OUT_DIR]
set -euo pipefail
out="${1:-bench/results/$(date +%Y-%m-%d)-$(nproc)core}"
work="$(mktemp -d)"
mkdir -p "$out"
for preset in tiny small; do
  vlexport fixture llava "$work/$preset" --preset "$preset"
  vlexport fixture lora "$work/$preset" "$work/$preset-lora"
  vlexport fixture bitfit "$work/$preset" "$work/$preset-bitfit.safetensors"
  /usr/bin/time -v vlexport build --base "$work/$preset" --adapter "$work/$preset-lora" \
      --adapter "$work/$preset-bitfit.safetensors" -o "$work/$preset-bundle" 2> "$out/$preset-build-time.txt"
  vlexport bench "$work/$preset-bundle" --threads 2 --json --plot "$out/$preset.png" --markdown "$out/$preset.md" \
      > "$out/$preset.json"
done
echo "results in $out"

#!/usr/bin/env bash
# The small fixture (no adapters) at cpu and cpu-int8, each against onnxruntime-genai's model builder at the same
# precision (vlexport bench --peer), plus chunked vs one-shot prefill on ~1000-token prompts (bench/prefill_chunks.py).
# Usage: bash bench/peer.sh [OUT_DIR] [WORK_DIR]
set -euo pipefail
out="${1:-bench/results/$(date +%Y-%m-%d)-$(nproc)core}"
work="${2:-$(mktemp -d)}"
mkdir -p "$out"
[ -d "$work/small" ] || vlexport fixture llava "$work/small" --preset small
for target in cpu cpu-int8; do
  [ -d "$work/small-$target" ] || vlexport build --base "$work/small" -o "$work/small-$target" --target "$target" --no-verify -q
  vlexport bench "$work/small-$target" --threads 2 --peer onnxruntime-genai --contexts 64,300,1000,2000 --no-rss -q \
      --json --plot "$out/peer-small-$target.png" --markdown "$out/peer-small-$target.md" > "$out/peer-small-$target.json"
done
python bench/prefill_chunks.py "$work/small-cpu" "$out/prefill-chunks"
echo "results in $out"

#!/usr/bin/env bash
# INT4 weight-only on the small LLaVA-1.5-shaped outlier fixture (issue 16): build at cpu-int4 (verify with the
# [parity.int4] gates), then decode against PyTorch eager FP32, the INT4 bandwidth floor and onnxruntime-genai's
# int4 builder model on the same weights, in one run. Results: bench/results/2026-12-02-epyc-2core/int4-small*.md (the speed run used --no-verify --int4 fallback=false)
set -euo pipefail
W="${W:-/tmp/vlexport-int4}"
OUT="${OUT:-bench/results/2026-12-02-epyc-2core}"
mkdir -p "$W" "$OUT"
vlexport fixture llava -o "$W/small-outliers" --preset small --outliers
/usr/bin/time -v vlexport build --base "$W/small-outliers" --target cpu-int4 -o "$W/small-int4" --force \
    2> >(tee "$W/build.time" >&2)
cp "$W/small-int4/parity_report.json" "$OUT/int4-small-parity_report.json"
vlexport bench "$W/small-int4" --threads 2 --contexts 64,300 --peer onnxruntime-genai --no-rss \
    --markdown "$OUT/int4-small-decode.md" --json > "$OUT/int4-small-decode.json"

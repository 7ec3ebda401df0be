#!/usr/bin/env bash
# INT4 weight-only on the small LLaVA-1.5-shaped outlier fixture (issue 16).
# 1. Build at cpu-int4 with verify and the [parity.int4] gates; keep the parity report.
# 2. Speed: every product INT4 (--no-verify --int4 fallback=false, which fails the gate on this random-weight
#    fixture), lm_head INT8 (the default) and INT4 (as onnxruntime-genai's builder writes it), each decoding against
#    PyTorch eager FP32, the INT4 bandwidth floor and the builder's int4 model on the same weights, in one run.
# Results: bench/results/2026-12-02-xeon-2core/int4-small*.md (earlier runs: bench/results/2026-12-02-epyc-2core/).
set -euo pipefail
W="${W:-/tmp/vlexport-int4}"
OUT="${OUT:-bench/results/2026-12-02-xeon-2core}"
mkdir -p "$W" "$OUT"
[ -d "$W/small-outliers" ] || vlexport fixture llava -o "$W/small-outliers" --preset small --outliers
if [ "${SKIP_GATE:-0}" != 1 ]; then
  /usr/bin/time -v vlexport build --base "$W/small-outliers" --target cpu-int4 -o "$W/small-int4" --force \
      2> >(tee "$W/build.time" >&2) || true  # exit 1 when verify fails: the report says why
  [ -f "$W/small-int4/parity_report.json" ] && cp "$W/small-int4/parity_report.json" "$OUT/int4-small-parity_report.json"
fi
for head in int8 int4; do
  vlexport build --base "$W/small-outliers" --target cpu-int4 -o "$W/speed-$head" --force --no-verify -q \
      --int4 "fallback=false,lm_head=$head"
  vlexport bench "$W/speed-$head" --threads 2 --contexts 64,300,1000 --peer onnxruntime-genai --no-rss --repeats 5 \
      --markdown "$OUT/int4-small-decode-lm_head-$head.md" --json > "$OUT/int4-small-decode-lm_head-$head.json"
done

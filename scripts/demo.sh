#!/usr/bin/env bash
# Quantize the shipped SmolLM2-135M with nearest and greedy rounding, then compare perplexity
# on held-out text (calibration: Python docs; evaluation: fortunes and FOLDOC).
# Evaluation runs in float32 (--dtype float32, printed in the report): the bf16 weights upcast
# exactly, and fp32 matmuls are ~7x faster than bf16 on AVX2-only CPUs. Drop it on a CPU with AMX.
set -euo pipefail
OUT=${OUT:-out/demo}
MODEL=$(python -m awqkit.shipped smollm2)
for rounding in nearest greedy; do
  awqkit quantize "$MODEL" --out "$OUT/$rounding" --rounding "$rounding" --calib-data python-doc \
    --n-calib "${N_CALIB:-128}" --seq-len 512 --overwrite
done
awqkit eval "$MODEL" "$OUT/nearest" "$OUT/greedy" --datasets fortunes,foldoc --seq-len 512 \
  --max-windows "${MAX_WINDOWS:-30}" --dtype float32 --json "$OUT/eval.json" --plot "$OUT/eval.png"

#!/usr/bin/env bash
# Quantize the shipped SmolLM2-135M with nearest and greedy rounding, then compare perplexity
# on held-out text (calibration: Python docs; evaluation: fortunes and FOLDOC).
set -euo pipefail
OUT=${OUT:-out/demo}
MODEL=$(python -m awqkit.shipped smollm2)
for rounding in nearest greedy; do
  awqkit quantize "$MODEL" --out "$OUT/$rounding" --rounding "$rounding" --calib-data python-doc \
    --n-calib "${N_CALIB:-128}" --seq-len 512 --overwrite
done
awqkit eval "$MODEL" "$OUT/nearest" "$OUT/greedy" --datasets fortunes,foldoc --seq-len 512 \
  --max-windows "${MAX_WINDOWS:-40}" --json "$OUT/eval.json" --plot "$OUT/eval.png"

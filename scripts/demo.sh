#!/usr/bin/env bash
# Quantize the shipped SmolLM2-135M (nearest and greedy rounding, calibrated on the Python docs),
# then print its perplexity on held-out text (fortunes, FOLDOC) next to the original's, with
# paired 95% CIs. Needs no network once scripts/setup.sh has run.
#
#   scripts/demo.sh                 # 128 x 512 calibration tokens, 30 windows of 512 per corpus
#   N_CALIB=16 MAX_WINDOWS=8 scripts/demo.sh     # a quick look
set -euo pipefail
cd "$(dirname "$0")/.."
[ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ] && . .venv/bin/activate
OUT=${OUT:-out/demo}
for rounding in nearest greedy; do
  awqkit quantize smollm2 --out "$OUT/$rounding" --rounding "$rounding" --calib-data python-doc \
    --n-calib "${N_CALIB:-128}" --seq-len 512 --overwrite
done
awqkit eval smollm2 "$OUT/nearest" "$OUT/greedy" --datasets fortunes,foldoc --seq-len 512 \
  --max-windows "${MAX_WINDOWS:-30}" --dtype "${EVAL_DTYPE:-auto}" --json "$OUT/eval.json" --plot "$OUT/eval.png"

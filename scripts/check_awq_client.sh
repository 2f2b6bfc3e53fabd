#!/usr/bin/env bash
# Opt-in check that awqkit's AutoAWQ-GEMM export loads and runs in a real client on CPU:
# transformers + gptqmodel, compared against the fake-quant export of the same run.
#
#   scripts/check_awq_client.sh [AWQ_DIR FAKE_DIR] [-- extra args for check_awq_client.py]
#
# Without folders it quantizes the shipped SmolLM2-135M twice (--format awq and --format fake;
# runs are deterministic, so both hold the same quantized weights) into out/check_awq_client/.
#
# gptqmodel lives in its own venv (.venv-gptq/), never in awqkit's dependencies: it requires
# torch>=2.14.1, which pip would satisfy with a multi-GB CUDA wheel. We install the CPU torch
# first, gptqmodel with --no-deps, and its runtime deps under a constraints file pinning torch, so
# nothing can replace it. gptqmodel 7.7.0 works with torch 2.13 on CPU (AWQ via torch's ATen int4 op).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-gptq
TORCH_VERSION=2.13.0
GPTQMODEL_VERSION=${GPTQMODEL_VERSION:-7.7.0}
# gptqmodel's requirements.txt less torch (pinned above), torchao (only for FP4/NVFP4 and
# Hadamard paths, imported inside try/except) and maturin (a build tool it never imports).
GPTQMODEL_DEPS=(accelerate safetensors threadpoolctl packaging device-smi protobuf pillow requests
  pypcre tokenicer logbar jinja2 ninja datasets pyarrow dill defuser)

setup_venv() {
  local start=$SECONDS constraints
  constraints=$(mktemp)
  echo "torch==$TORCH_VERSION" >"$constraints"
  python3 -m venv "$VENV"
  local pip=("$VENV/bin/pip" install --quiet -c "$constraints")
  "${pip[@]}" "torch==$TORCH_VERSION"  # the local index serves the CPU build
  "${pip[@]}" "transformers>=5,<6"
  "$VENV/bin/pip" install --quiet --no-deps "gptqmodel==$GPTQMODEL_VERSION"
  "${pip[@]}" "${GPTQMODEL_DEPS[@]}"
  "${pip[@]}" -e .
  rm -f "$constraints"
  # Stamp last, so an interrupted setup is redone rather than half-used.
  touch "$VENV/.ready"
  echo "venv $VENV ready in $((SECONDS - start)) s ($(du -sh "$VENV" | cut -f1))"
}

[[ -f $VENV/.ready ]] || setup_venv
# shellcheck disable=SC1091
source "$VENV/bin/activate"

if [[ $# -ge 2 && $1 != -- ]]; then
  awq_dir=$1 fake_dir=$2
  shift 2
else
  awq_dir=out/check_awq_client/awq fake_dir=out/check_awq_client/fake
  model=$(python -m awqkit.model.shipped smollm2)
  for pair in "awq:$awq_dir" "fake:$fake_dir"; do
    format=${pair%%:*} dir=${pair#*:}
    [[ -f $dir/model.safetensors ]] && continue  # reuse the pair from an earlier run
    awqkit quantize "$model" --out "$dir" --overwrite --scales shared --objective module \
      --format "$format" --group-size 64 --n-calib 4 --seq-len 128 --n-grid 2 \
      --calib-data python-doc --quiet
  done
fi
[[ ${1:-} == -- ]] && shift
python scripts/check_awq_client.py "$awq_dir" "$fake_dir" "$@"

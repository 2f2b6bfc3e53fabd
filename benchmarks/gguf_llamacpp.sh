#!/usr/bin/env bash
# awqkit's GGUF export scored by llama.cpp (llama-cpp-python, built from source in its own venv).
#
#   benchmarks/gguf_llamacpp.sh --json docs/gguf-llamacpp.json
#   benchmarks/gguf_llamacpp.sh --n-calib 16 --eval-windows 8     # a quick look
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=benchmarks/.venv-llamacpp
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # PyPI ships llama-cpp-python as source: gcc and cmake build it (several minutes on 2 cores)
  CMAKE_ARGS="-DGGML_NATIVE=ON" "$VENV/bin/pip" install -q llama-cpp-python numpy
fi
[ -x .venv/bin/awqkit ] || scripts/setup.sh
.venv/bin/python -m awqkit.model.shipped smollm2 gemma3 >/dev/null
exec .venv/bin/python -m benchmarks.gguf_llamacpp --llamacpp-python "$VENV/bin/python" "$@"

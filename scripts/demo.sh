#!/usr/bin/env bash
# Set up (scripts/setup.sh) and stream an answer from SmolLM2-135M-Instruct about a long document on CPU, with a
# ZeroMerge cache holding 10 % of the context window (the retrieval preset: plain ZeroMerge forgets the facts the
# question asks about; see docs/retrieval.md). On CPU the decode step runs eagerly (zmzoo.load's compile="auto").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m zmzoo generate --model smollm2-135m --prompt-file docs/demo_prompt.txt --chat \
    --max-seq-len 4096 --kv-ratio 0.1 --preset retrieval --cache-setting lookahead=48 --cache-setting lookahead_greedy=16 \
    --max-new-tokens 96 "$@"

#!/usr/bin/env bash
# Set up (scripts/setup.sh) and stream an answer from SmolLM2-135M-Instruct about a long document on CPU, with a
# ZeroMerge cache holding 10 % of the context window.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# On CPU the decode step runs eagerly: inductor takes minutes to compile SmolLM2's 30 layers for a 96-token answer.
extra=()
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || extra=(--no-compile)
.venv/bin/python -m zmzoo generate --model smollm2-135m --prompt-file docs/demo_prompt.txt --chat \
    --max-seq-len 4096 --kv-ratio 0.1 --max-new-tokens 96 "${extra[@]}" "$@"

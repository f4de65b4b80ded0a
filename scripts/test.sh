#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the whole test suite on CPU; Triton kernels run in Triton's interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"

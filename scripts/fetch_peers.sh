#!/usr/bin/env bash
# Put gpt-fast's files that bench.peers.gptfast_peer imports into .peers/gpt-fast/ (ignored by git: gpt-fast's code is
# never committed to zmzoo). Only model.py, quantize.py, generate.py, what they import at module level (tokenizer.py;
# quantize.py's optional GPTQ/eval imports are left out, as its try/except allows) and gpt-fast's LICENSE (BSD-3), plus
# a COMMIT file naming the source and commit that the benchmark records.
#
#   scripts/fetch_peers.sh                      # clone github.com/meta-pytorch/gpt-fast at the pinned commit
#   scripts/fetch_peers.sh /path/to/gpt-fast    # a local clone or bare git directory instead (no network)
#   GPTFAST_REV=<commit> scripts/fetch_peers.sh # another commit (e.g. one before the flex-attention decode)
#
# The GPU machine has no network: run this here, then carry the folder (about 70 KB) with the device tool,
#   run(command="python -m bench.decode ... --peers gptfast ...", carry=[".peers/gpt-fast"])
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${GPTFAST_REV:-6ecad9b5b6b987d17ac4303965545873d0192086}  # meta-pytorch/gpt-fast main, 2025-08-22
SRC=${1:-https://github.com/meta-pytorch/gpt-fast.git}
FILES=(model.py quantize.py generate.py tokenizer.py LICENSE)
DEST=.peers/gpt-fast
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -d "$SRC" ]; then  # a local repository, bare or not
    gitdir=$(git -C "$SRC" rev-parse --absolute-git-dir)
else
    git init -q --bare "$tmp/repo"
    git --git-dir="$tmp/repo" fetch -q --depth 1 "$SRC" "$REV"
    gitdir=$tmp/repo
fi
commit=$(git --git-dir="$gitdir" rev-parse --verify "$REV^{commit}")
rm -rf "$DEST" && mkdir -p "$DEST"
git --git-dir="$gitdir" archive "$commit" "${FILES[@]}" | tar -x -C "$DEST"
printf '%s %s\n' "$commit" "$SRC" >"$DEST/COMMIT"
echo "gpt-fast $commit from $SRC -> $DEST ($(du -sh "$DEST" | cut -f1)):"
ls -l "$DEST"

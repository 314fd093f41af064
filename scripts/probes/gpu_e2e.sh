#!/usr/bin/env bash
# On the GPU machine: `sgdiff bench --e2e` for FLUX.1-dev (issue 26's baseline).
# $1: warm (1 prompt, median of 2, then 4 prompts) | cold (page cache dropped) | quick (one warm round)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log-$1.txt") 2>&1
pip install --no-index --no-deps --target /tmp/site -q .wheels/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
B="python -c 'from sgdiff.cli.main import main; main()' bench --model flux.1-dev --e2e --checkpoint-dir /tmp/flux-dev-e2e"
case "$1" in
  warm)
    eval $B --warmup 1 --repeat 2 --json "$OUT/e2e-warm-1.json"
    eval $B --warmup 0 --repeat 1 --prompts 4 --json "$OUT/e2e-warm-4.json" ;;
  cold) eval $B --warmup 0 --repeat 1 --cold --json "$OUT/e2e-cold-1.json" ;;
  quick) eval $B --warmup 1 --repeat 1 --json "$OUT/e2e-quick.json" ;;
esac

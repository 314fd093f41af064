#!/usr/bin/env bash
# On the GPU machine: one warm `sgdiff bench --e2e` round for FLUX.1-dev (after an untimed one).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
pip install --no-index --no-deps --target /tmp/site -q .wheels/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD
python -c 'from sgdiff.cli.main import main; main()' bench --model flux.1-dev --e2e --checkpoint-dir /tmp/flux-dev-e2e \
    --warmup 1 --repeat 1 --json "$OUT/e2e.json"

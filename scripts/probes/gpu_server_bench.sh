#!/usr/bin/env bash
# On the GPU machine (device tool): sgdiff serve with a full-size random FLUX.1-dev checkpoint,
# measured by scripts/bench_server.py. Carry .wheels (diffusers, typer<=0.20, FastAPI and the rest).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
pip install --no-index --no-deps --target /tmp/site -q .wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
[ -d /tmp/flux-dev ] || python scripts/make_random_checkpoint.py --model flux.1-dev --out /tmp/flux-dev
SPEED=(--serve-arg=--enable-fused-projections --serve-arg=--enable-fused-gelu --serve-arg=--enable-fused-norms)
python scripts/bench_server.py --model-path /tmp/flux-dev --device cuda --size 1024x1024 --steps 28 \
    --concurrency 4 --requests 8 --latency-requests 3 --delay 50 "${SPEED[@]}" --json "$OUT/server.json"
# FLUX.1-schnell (4 steps): where a request's fixed costs weigh more (the disk holds one checkpoint)
rm -rf /tmp/flux-dev
[ -d /tmp/flux-schnell ] || python scripts/make_random_checkpoint.py --model flux.1-schnell --out /tmp/flux-schnell
python scripts/bench_server.py --model-path /tmp/flux-schnell --device cuda --size 1024x1024 --steps 4 \
    --concurrency 4 --requests 8 --latency-requests 3 --delay 20 "${SPEED[@]}" --json "$OUT/server-schnell.json"

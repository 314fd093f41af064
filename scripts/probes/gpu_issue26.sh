#!/usr/bin/env bash
# On the GPU machine, one call for issue 26: start-up probe, the safetensors reader against safe_open,
# `sgdiff bench --e2e` one prompt with defaults (one warm-up round, one timed), then with
# --enable-torch-compile (the warm-up round fills the compile cache, the timed round loads from it).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
bash scripts/probes/start_up.sh
export PYTHONPATH=/tmp/site:$PWD
timeout 120 python scripts/probes/load_speed.py --gb 8 2>&1 | tee "$OUT/load_speed.txt"
timeout 240 bash scripts/probes/gpu_e2e.sh quick
B="python -c 'from sgdiff.cli.main import main; main()' bench --model flux.1-dev --e2e --checkpoint-dir /tmp/flux-dev-e2e"
eval timeout 200 $B --warmup 1 --repeat 1 --enable-torch-compile --json "$OUT/e2e-compile.json" 2>&1 | tee "$OUT/log-compile.txt"
for f in "$OUT"/e2e-*.json; do
  python -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1], d['device'], d['speed_flags']); [print(' ', s, round(r['wall'],2), {k: round(v,2) for k,v in r['phases'].items()}, r.get('load_parts'), r.get('speed')) for s,rs in d['runs'].items() for r in rs]" "$f"
done

#!/usr/bin/env bash
# On the GPU machine, one call for issue 26 (fits 600 s): the start-up probe, the safetensors reader
# against safe_open, `sgdiff bench --e2e` FLUX.1-dev one prompt with defaults (a warm-up round, a timed
# one), Wan2.1-T2V-1.3B one round, then FLUX with --enable-torch-compile (the warm-up round fills the
# compile cache, the timed round loads from it) in whatever time is left. A table of every JSON last.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
SECONDS=0
LIMIT=${LIMIT:-580}  # seconds this call may take
pip install --no-index --no-deps --target /tmp/site -q .wheels/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD
if [ -z "${SKIP_PROBES:-}" ]; then  # the start-up and reader probes
  bash scripts/probes/start_up.sh > /dev/null 2>&1
  timeout 60 python scripts/probes/load_speed.py --gb 4 > "$OUT/load_speed.txt" 2>&1
fi
B="python -c 'from sgdiff.cli.main import main; main()' bench --e2e"
eval timeout 230 $B --model flux.1-dev --checkpoint-dir /tmp/flux-dev-e2e --warmup 1 --repeat 1 --json "$OUT/e2e-flux.json" > "$OUT/log-flux.txt" 2>&1
echo "flux done at $SECONDS s"
[ -z "${SKIP_WAN:-}" ] && eval timeout $((LIMIT - 50 - SECONDS)) $B --model wan2.1-t2v-1.3b --checkpoint-dir /tmp/wan-e2e --warmup 0 --repeat 1 --json "$OUT/e2e-wan.json" > "$OUT/log-wan.txt" 2>&1
echo "wan done at $SECONDS s"
if [ $SECONDS -lt $((LIMIT - 110)) ]; then
  eval timeout $((LIMIT - 20 - SECONDS)) $B --model flux.1-dev --checkpoint-dir /tmp/flux-dev-e2e --warmup 1 --repeat 1 --enable-torch-compile --json "$OUT/e2e-compile.json" > "$OUT/log-compile.txt" 2>&1
fi
[ -z "${SKIP_PROBES:-}" ] && tail -32 "$OUT/log-start-up.txt" && tail -4 "$OUT/load_speed.txt"
for f in "$OUT"/e2e-*.json; do
  python -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1], d['device'], d['speed_flags'], 'ckpt written', round(d['checkpoint_written_seconds'],1)); [print(' ', s, round(r['wall'],2), {k: round(v,2) for k,v in r['phases'].items()}, {k: round(v,2) for k,v in (r.get('load_parts') or {}).items()}, r.get('speed'), [round(x, 3) for x in (r.get('step_seconds') or [])[:3]], round(sorted(r.get('step_seconds') or [0])[len(r.get('step_seconds') or [0])//2], 4)) for s,rs in d['runs'].items() for r in rs]" "$f"
done
for f in "$OUT"/log-*.txt; do echo "== $f"; tail -n 5 "$f"; done

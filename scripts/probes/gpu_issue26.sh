#!/usr/bin/env bash
# On the GPU machine, one call for issue 26 (fits 600 s). STEPS picks, in order, from:
#   checkpoint  write the FLUX.1-dev e2e checkpoint only (for variants before flux)
#   first_step  where the first denoising step's extra time goes (scripts/probes/first_step.py)
#   flux        `sgdiff bench --e2e` FLUX.1-dev, one prompt, defaults (a warm-up round, a timed one)
#   variants    load configurations side by side, sgdiff alone, FLUX one prompt (scripts/probes/load_variants.py;
#               after flux, whose checkpoint it reuses)
#   load        the reader's variants on the FLUX transformer's largest file (scripts/probes/load_speed.py)
#   four        FLUX.1-dev, four prompts in one process, one timed round
#   cold        FLUX.1-dev one prompt with the page cache dropped before each run (needs root)
#   wan         Wan2.1-T2V-1.3B, one timed round
#   compile     FLUX.1-dev with --enable-torch-compile (the warm-up round compiles each block kind ahead into the
#               cache; the timed round loads the programs: the perf dump's torch_compile_cache says built/loaded)
#   compile_jit the same with --torch-compile-mode just-in-time (torch.compile; graphs from inductor's disk cache)
# Each step runs while time is left under LIMIT; a table of every JSON last, logs in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
SECONDS=0
LIMIT=${LIMIT:-580}
STEPS=${STEPS:-first_step flux load four wan compile}
pip install --no-index --no-deps --target /tmp/site -q .wheels/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD
B="python -c 'from sgdiff.cli.main import main; main()' bench --e2e"
FLUX="--model flux.1-dev --checkpoint-dir /tmp/flux-dev-e2e"
left() { echo $((LIMIT - 15 - SECONDS)); }
for step in $STEPS; do
  [ "$(left)" -lt 30 ] && { echo "no time left for $step"; continue; }
  echo "== $step at $SECONDS s"
  case $step in
    checkpoint) timeout "$(left)" python -c "from pathlib import Path; from sgdiff.bench.end_to_end import \
                  ensure_checkpoint; ensure_checkpoint('flux.1-dev', Path('/tmp/flux-dev-e2e'), False)" ;;
    first_step) timeout "$(left)" python scripts/probes/first_step.py > "$OUT/first_step.txt" 2>&1 ;;
    flux) eval timeout "$(left)" $B $FLUX --warmup "${FLUX_WARMUP:-1}" --repeat 1 --json "$OUT/e2e-flux.json" > "$OUT/log-flux.txt" 2>&1 ;;
    variants) timeout "$(left)" python scripts/probes/load_variants.py --checkpoint /tmp/flux-dev-e2e \
                --rounds "${VARIANT_ROUNDS:-2}" --json "$OUT/variants.json" > "$OUT/variants.txt" 2>&1 ;;
    load) timeout "$(left)" python scripts/probes/load_speed.py \
            --path "$(ls -S /tmp/flux-dev-e2e/transformer/*.safetensors | head -1)" > "$OUT/load_speed.txt" 2>&1 ;;
    four) eval timeout "$(left)" $B $FLUX --prompts 4 --warmup 0 --repeat 1 --json "$OUT/e2e-four.json" > "$OUT/log-four.txt" 2>&1 ;;
    cold) eval timeout "$(left)" $B $FLUX --cold --warmup 0 --repeat 1 --json "$OUT/e2e-cold.json" > "$OUT/log-cold.txt" 2>&1 ;;
    wan) eval timeout "$(left)" $B --model wan2.1-t2v-1.3b --checkpoint-dir /tmp/wan-e2e --warmup 0 --repeat 1 \
           --json "$OUT/e2e-wan.json" > "$OUT/log-wan.txt" 2>&1 ;;
    compile) eval timeout "$(left)" $B $FLUX --warmup 1 --repeat 1 --enable-torch-compile \
               --json "$OUT/e2e-compile.json" > "$OUT/log-compile.txt" 2>&1 ;;
    compile_jit) eval timeout "$(left)" $B $FLUX --warmup 1 --repeat 1 --enable-torch-compile \
                   --torch-compile-mode just-in-time --json "$OUT/e2e-compile-jit.json" > "$OUT/log-compile-jit.txt" 2>&1 ;;
  esac
done
echo "== done at $SECONDS s"
for f in "$OUT"/first_step.txt "$OUT"/load_speed.txt "$OUT"/variants.txt; do [ -f "$f" ] && { echo "== $f"; grep -v "^ *aten::\|^---\|^Name\|^Self" "$f" | head -40; }; done
for f in "$OUT"/e2e-*.json; do
  python -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1], d['device'], d['speed_flags'], 'ckpt written', round(d['checkpoint_written_seconds'],1)); [print(' ', s, round(r['wall'],2), {k: round(v,2) for k,v in r['phases'].items()}, r.get('load_parts'), r.get('speed'), [round(x, 3) for x in (r.get('step_seconds') or [])[:3]], round(sorted(r.get('step_seconds') or [0])[len(r.get('step_seconds') or [0])//2], 4)) for s,rs in d['runs'].items() for r in rs]; print('  machine', d.get('machine'))" "$f"
done
for f in "$OUT"/log-*.txt; do echo "== $f"; tail -n 4 "$f"; done

#!/usr/bin/env bash
# On the GPU machine (issue 27, item 10): FlashAttention 4 (`--attention-backend fa`) against cuDNN (`auto`
# as it is without FlashAttention), attention alone (scripts/probes/flash_attention_check.py: bf16
# agreement, ms and TFLOP/s at FLUX.1-dev and Wan2.1 shapes, auto's pick) and `sgdiff bench` forward and
# step times for Wan2.1-T2V-1.3B and FLUX.1-dev. A table last; the log and two JSON files in $OUT.
#
# FA4's wheels with the ones the image lacks are ~100 MB (nvidia-cutlass-dsl-libs-cu13 alone is 92 MB), more
# than one call carries beside the tree (64 MiB with the tree's ~20 MB), so they travel xz-compressed in three
# parts, one call each on one warm machine (its /tmp keeps what the calls before staged; make each call straight
# after the one before). scripts/probes/build_gpu_wheels.sh makes the folders (gitignored):
#   call 1: carry [".wheels-fa/call1"]   part 00 and the .wheels the image lacks (diffusers, typer, ...; no
#           imageio-ffmpeg) -> /tmp; runs the steps that need no FlashAttention (the cuDNN baselines)
#   call 2: carry [".wheels-fa/call1b"]  part 01 -> /tmp (what time is left: more baselines)
#   call 3: carry [".wheels-fa/call2"]   part 02 and the checksum -> /tmp; joins and checks the parts, installs
#           into /tmp/site-fa, runs the rest
# Each: bash scripts/probes/gpu_flash_attention.sh   (STEPS= to choose, LIMIT= seconds, default 490)
# Steps done are kept in /tmp/fa-results and skipped: a further call (no carry) on the still warm machine
# finishes what call 3 had no time for, and prints the whole table again.
# The wheels must include nvidia-cutlass-dsl-libs-core (1.6 MB): from 4.6 on it holds the DSL's Python
# (`cutlass/__init__.py`, `cutlass/cute/`), which libs-base and libs-cu12/cu13 lack (../shared/GPU_NOTES.md).
set -uo pipefail
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/fa-stage /tmp/fa-results
exec > >(tee -a "$OUT/log.txt") 2>&1
SECONDS=0
LIMIT=${LIMIT:-490}
left() { echo $((LIMIT - 10 - SECONDS)); }

for folder in .wheels-fa/call1 .wheels-fa/call1b .wheels-fa/call2; do
  [ -d "$folder" ] && cp "$folder"/fa.tar.xz.* /tmp/fa-stage/ && echo "staged $(ls "$folder" | grep -c part) part(s) from $folder"
done
if [ -d .wheels-fa/call1/base ]; then
  pip install -q --no-index --no-deps --target /tmp/site .wheels-fa/call1/base/*.whl 2>&1 | grep -v WARNING
elif [ -d .wheels ]; then
  pip install -q --no-index --no-deps --target /tmp/site .wheels/*.whl 2>&1 | grep -v WARNING
fi
[ -d /tmp/site/diffusers ] || echo "no diffusers in /tmp/site: carry .wheels-fa/call1 (or .wheels) once"

parts=$(ls /tmp/fa-stage | grep -c '\.part')
if [ ! -d /tmp/site-fa/flash_attn ] && [ "$parts" = 3 ]; then
  cat /tmp/fa-stage/fa.tar.xz.part* > /tmp/fa-stage/fa.tar.xz
  (cd /tmp/fa-stage && sha256sum -c fa.tar.xz.sha256) || { echo "the joined parts are corrupt"; exit 1; }
  python3 -c "import tarfile; tarfile.open('/tmp/fa-stage/fa.tar.xz', 'r:xz').extractall('/tmp/fa-wheels')"
  pip install -q --no-index --no-deps --target /tmp/site-fa /tmp/fa-wheels/*.whl 2>&1 | grep -v WARNING
  echo "installed at $SECONDS s: $(ls /tmp/fa-wheels)"
fi
HAVE_FA=0
[ -d /tmp/site-fa/flash_attn ] && HAVE_FA=1
if [ $HAVE_FA = 0 ] && [ -d .wheels-fa/call2 ]; then
  echo "a part is missing ($parts of 3 staged): the machine was given back between calls. Make calls 1-3 again."
  exit 1
fi
[ $HAVE_FA = 1 ] || echo "FlashAttention not installed yet ($parts of 3 parts in /tmp/fa-stage): make the next call straight after"

BASE=/tmp/site:$PWD
# (installed with --target, nvidia-cutlass-dsl's .pth file is not run: its dsl_packages folder goes on the path)
WITH_FA=/tmp/site-fa:/tmp/site-fa/nvidia_cutlass_dsl/dsl_packages:$BASE
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa-cute-cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader

# steps: check (attention alone), MODEL:auto0 (auto without FlashAttention on the path: today's cuDNN),
# MODEL:fa, MODEL:auto (auto with FlashAttention installed: measures and picks), MODEL:all0 and MODEL:allfa
# (auto0 and auto with torch.compile and CUDA graphs on too: issue 27, FlashAttention under compile and graphs);
# MODEL wan or flux
DEFAULT="wan:auto0 flux:auto0"
[ $HAVE_FA = 1 ] && DEFAULT="check wan:auto0 wan:fa wan:auto flux:auto0 flux:fa flux:auto"
for step in ${STEPS:-$DEFAULT}; do
  model=${step%%:*} variant=${step#*:}
  json=/tmp/fa-results/bench-$model-$variant.json
  [ "$step" = check ] && json=/tmp/fa-results/check.json
  [ -f "$json" ] && { echo "== $step: done before ($json)"; continue; }
  [ "$(left)" -lt 60 ] && { echo "== $step: no time left"; continue; }
  echo "== $step at $SECONDS s"
  if [ "$step" = check ]; then
    PYTHONPATH=$WITH_FA timeout "$(left)" python scripts/probes/flash_attention_check.py --json "$json"
    continue
  fi
  name=$([ "$model" = wan ] && echo wan2.1-t2v-1.3b || echo flux.1-dev)
  path=$WITH_FA toggles=""
  case $variant in auto0|all0) path=$BASE ;; esac
  case $variant in all0|allfa) toggles="--enable-torch-compile --enable-cuda-graph" ;; esac
  backend=$([ "$variant" = fa ] && echo fa || echo auto)
  PYTHONPATH=$path timeout "$(left)" python -c 'from sgdiff.cli.main import main; main()' bench --model "$name" \
    --attention-backend "$backend" $toggles --warmup 1 --repeat 3 --json "$json"
done
echo "== done at $SECONDS s"

python3 - <<'EOF' | tee "$OUT/table.txt"
import glob, json, os
rows = {}
for path in sorted(glob.glob("/tmp/fa-results/bench-*.json")):
    d = json.load(open(path))
    rows[os.path.basename(path)[6:-5]] = d
json.dump(rows, open(os.path.join(os.environ.get("OUT", "/tmp/out"), "bench.json"), "w"), indent=1)
print(f"{'bench':18} {'card':24} {'sgdiff fwd ms':>13} {'step ms':>9} {'diffusers step':>14} {'rel err':>8}  auto's picks")
for name, d in rows.items():
    s, ref = d["sgdiff"], d["diffusers"]
    picks = "; ".join(f"{c['q']}: {c['kernel']} {c['ms']}" for c in d.get("attention_choices") or [])
    print(f"{name:18} {d['card'][:24]:24} {s['forward_ms']:13.1f} {s['step_ms']:9.1f} {ref['step_ms']:14.1f} "
          f"{d['bf16_rel_err']:8.1e}  {picks}")
EOF
cp /tmp/fa-results/check.json "$OUT/" 2>/dev/null
[ -f "$OUT/check.json" ] && python3 -c "
import json; d = json.load(open('$OUT/check.json')); print(d['versions'], d.get('fa_kernel') or d.get('fa_error'))
print(f\"{'shape':20} {'kernel':26} {'ms':>8} {'TFLOP/s':>8} {'err fp32':>9} {'fa vs cudnn':>11}\")
for shape, r in d['shapes'].items():
    for k, ms in r.get('ms', {}).items():
        print(f\"{shape:20} {k:26} {ms:8.3f} {r['tflops'][k]:8.0f} {r['rel_err_vs_fp32'][k]:9.1e} {r.get('rel_err_fa_vs_cudnn', 0):11.1e}\")
    if 'error' in r: print(shape, r['error'])
print('auto picks:', d.get('auto_choices'))
" | tee -a "$OUT/table.txt"
true

#!/usr/bin/env bash
# On the GPU machine, one call (fits 600 s) for the newer models' numbers. STEPS picks, in order, from:
#   disk         free space of /tmp and /dev/shm (a Qwen-Image checkpoint is ~58 GB)
#   flux         `sgdiff bench --model flux.1-dev`, defaults (the hot path's per-Linear LoRA checks cost nothing)
#   qwen         `sgdiff bench --model qwen-image` at 1328x1328, defaults (issue 28: forward <= 220 ms)
#   qwen_all     the same with every toggle (compile, CUDA graphs, fused projections / GELU / norms)
#   qwen_edit    `sgdiff bench --model qwen-image-edit`, defaults
#   qwen_e2e     `sgdiff bench --model qwen-image --e2e` (1024x1024, 50 steps, true CFG 4; issue 28: <= 11 s),
#                its checkpoint written once to QWEN_DIR (default /dev/shm/qwen-e2e: the disk is 64 GiB)
#   hunyuan      `sgdiff bench --model hunyuanvideo` at 1280x720x129 (issue 29: forward <= 0.65x diffusers'),
#                one timed forward a side, no warm-up (each tens of seconds: a first call's overhead is lost in it);
#                needs a call of its own (run GE's 198 s were not enough)
#   hunyuan_small the same at 320x512 (~60 s): its bf16 rel err against diffusers (1.6e-1 in run GV, from the fused
#                LayerNorm + modulation kernel on the patch embedding's strided rows; fixed in commit c894bc1)
#   hunyuan15    `sgdiff bench --model hunyuanvideo-1.5` (480p T2V; issue 29: forward <= 0.7x diffusers')
#   fp8          FLUX.1-dev forward: every toggle in bf16, then with --dit-precision fp8 (issue 30: >= 1.3x)
#   offload      scripts/probes/offload_gpu.py: exact bf16 outputs per mode, streaming cost (issue 30)
#   vae_split    2 GPUs only: torchrun scripts/probes/bench_vae_split.py (issue 30: >= 1.7x)
#   cache        FLUX.1-dev, three prompts a process (`bench --e2e --prompts 3`, checkpoint in FLUX_DIR, default
#                /dev/shm/flux-e2e): lossless, then --cache taylorseer, then taylorseer and magcache with FP8 weights
#                and torch.compile (schedules: their skips do not depend on the weights, so random weights time them
#                truly); shell -> PNG and a request on the loaded engine (issue 31: >= 2.2x a request); CACHE_MODES
#                chooses others
#   wan_cache    Wan2.1-T2V-1.3B, two prompts a process (`bench --e2e --sgdiff-only --prompts 2`, checkpoint in
#                WAN_DIR): lossless, then each of WAN_CACHE_MODES (';' between; default TaylorSeer with FP8 weights and
#                torch.compile): the second request on the loaded engine (issue 31: Wan >= 2x); ~200 s; needs
#                imageio-ffmpeg (`iio`)
#   lora         scripts/probes/lora_cuda.py: adapters in bf16 with every toggle, compile, CUDA graphs, FP8 (issue 32)
#   lora_speed   scripts/bench_lora.py at full size, defaults then every toggle: base vs fused vs unfused per forward,
#                switching time, fused with the base copy on the GPU (issue 32: fused = base, unfused <= 5%, switch
#                <= 0.5 s)
#   aoti         scripts/probes/aoti_cuda_check.py: can AOTInductor compile CUDA programs here (--torch-compile-mode
#                ahead; CUDA headers and -lcuda), as the machine is and with a CUDA_HOME made of pip's headers (~1 min)
#   lora_switch  scripts/probes/lora_switch_profile.py: a fused switch with the base copy in page-locked CPU memory,
#                timed and profiled (~40 s; run HD saw pageable copies, 3 s a switch, before commit dcceb61)
#   flux_offload FLUX.1-dev shell -> PNG with --cpu-offload layers under a 12 GiB cap, every block streamed, then
#                --offload-resident-blocks auto (issue 30: step <= 1.5x uncapped)
#   flux_offload_fp8 the same with --dit-precision fp8 (half the bytes to stream; lossy: FP8's quality in README "Lossy
#                modes"): uncapped in memory first for the ratio, then under the cap with auto resident blocks, eager and
#                with torch.compile (issue 30: <= 1.5x); OFFLOAD_FP8_MODES chooses others
#   wan14_offload scripts/bench_offload.py: Wan2.1-T2V-14B 1280x720x81, a CFG step in memory against --cpu-offload
#                layers under each of OFFLOAD_CAPS (default 24GiB, then 32GiB: an A14B expert's step; issue 30:
#                <= 1.3x), ~200 s each
#   qwen_profile scripts/probes/profile_forward.py: Qwen-Image 1328x1328's forward by kernel kind, defaults and all toggles
#   wan_profile  the same for Wan2.1-T2V-1.3B 832x480x81 (issue 26: a step must drop from 1.09 to ~0.95 s for <= 55 s)
#   wan          `sgdiff bench --model wan2.1-t2v-1.3b`, defaults (run GH before Wan's gated-residual kernels: 550.8 ms)
#   wan_e2e      Wan2.1-T2V-1.3B shell -> MP4 (`bench --e2e`, checkpoint in WAN_DIR, default /dev/shm/wan-e2e), one
#                untimed round first; FlashAttention on the path where /tmp/site-fa has it (gpu_flash_attention.sh).
#                Both sides need imageio-ffmpeg, which the image lacks: its 68 MB wheel travels in two halves
#                (`split -n 2 -d WHEEL iio.part` into .wheels-fa/iio1 and .wheels-fa/iio2; carry iio1 in one call,
#                iio2 in the next on the warm machine: the `iio` step joins and installs them)
#   (hunyuan, hunyuan_small, qwen_all and wan_e2e put FlashAttention on the path where /tmp/site-fa has it)
#   iio          stage .wheels-fa/iio1's half in /tmp/iio; with .wheels-fa/iio2 there too, join and install
#   startup      `import torch` without bytecode, then through sgdiff's bytecode cache (sgdiff/bytecode.py) twice
#   flux_e2e     FLUX.1-dev shell -> PNG (`bench --e2e`, checkpoint in FLUX_DIR), defaults, then with compile
#                (its warm-up round fills the graph cache: the timed round is the "second run", issue 26: <= 8.5 s)
# Each step runs while time is left under LIMIT; each JSON's summary last, logs in $OUT. The wheels it installs
# (.wheels, carried) and the FlashAttention / imageio-ffmpeg parts: scripts/probes/build_gpu_wheels.sh.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
SECONDS=0
LIMIT=${LIMIT:-580}
STEPS=${STEPS:-disk qwen qwen_all hunyuan}
QWEN_DIR=${QWEN_DIR:-/dev/shm/qwen-e2e}
WAN_DIR=${WAN_DIR:-/dev/shm/wan-e2e}
FLUX_DIR=${FLUX_DIR:-/dev/shm/flux-e2e}
OFFLOAD_CAPS=${OFFLOAD_CAPS:-24GiB 32GiB}  # wan14_offload's caps
WAN_CACHE_MODES=${WAN_CACHE_MODES:-"--cache taylorseer --dit-precision fp8 --enable-torch-compile"}
# flux_offload_fp8's modes (each with --dit-precision fp8), ';' between them (empty: in GPU memory, uncapped;
# bash's read drops a trailing empty field, so it goes first)
OFFLOAD_FP8_MODES=${OFFLOAD_FP8_MODES:-";--cpu-offload layers --gpu-memory-limit 12GiB;--cpu-offload layers --gpu-memory-limit 12GiB --enable-torch-compile"}
# cache's modes, ';' between them (the first, empty: lossless)
CACHE_MODES=${CACHE_MODES:-";--cache taylorseer;--cache taylorseer --dit-precision fp8 --enable-torch-compile;--cache magcache --dit-precision fp8 --enable-torch-compile"}
pip install --no-index --no-deps --target /tmp/site -q .wheels/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD
FA=""  # FlashAttention 4 where gpu_flash_attention.sh installed it
[ -d /tmp/site-fa/flash_attn ] && FA=/tmp/site-fa:/tmp/site-fa/nvidia_cutlass_dsl/dsl_packages:
S="python -c 'from sgdiff.cli.main import main; main()' bench"
ALL="--enable-torch-compile --enable-cuda-graph --enable-fused-projections --enable-fused-gelu --enable-fused-norms"
FP8="--enable-torch-compile --enable-cuda-graph --enable-fused-projections --enable-fused-norms --dit-precision fp8"
left() { echo $((LIMIT - 15 - SECONDS)); }
for step in $STEPS; do
  [ "$(left)" -lt 30 ] && { echo "no time left for $step"; continue; }
  echo "== $step at $SECONDS s"
  case $step in
    disk) df -h /tmp /dev/shm; free -g ;;
    flux) eval timeout "$(left)" $S --model flux.1-dev --warmup 2 --repeat 5 \
            --json "$OUT/flux-defaults.json" 2>&1 | tee "$OUT/log-flux.txt" | tail -n 16 ;;
    qwen) eval timeout "$(left)" $S --model qwen-image --height 1328 --width 1328 --warmup 1 --repeat 3 \
            --json "$OUT/qwen-1328.json" 2>&1 | tee "$OUT/log-qwen.txt" | tail -n 16 ;;
    qwen_all) PYTHONPATH=$FA$PYTHONPATH eval timeout "$(left)" $S --model qwen-image --height 1328 --width 1328 --warmup 1 --repeat 3 $ALL \
                --json "$OUT/qwen-1328-all.json" 2>&1 | tee "$OUT/log-qwen-all.txt" | tail -n 16 ;;
    qwen_edit) eval timeout "$(left)" $S --model qwen-image-edit --warmup 1 --repeat 3 \
                 --json "$OUT/qwen-edit.json" 2>&1 | tee "$OUT/log-qwen-edit.txt" | tail -n 16 ;;
    qwen_e2e) eval timeout "$(left)" $S --model qwen-image --e2e --checkpoint-dir "$QWEN_DIR" --warmup 0 --repeat 1 \
                --json "$OUT/e2e-qwen.json" 2>&1 | tee "$OUT/log-qwen-e2e.txt" | tail -n 8 ;;
    hunyuan) PYTHONPATH=$FA$PYTHONPATH eval timeout "$(left)" $S --model hunyuanvideo --warmup 0 --repeat 1 \
               --json "$OUT/hunyuan.json" 2>&1 | tee "$OUT/log-hunyuan.txt" | tail -n 16 ;;
    hunyuan_small) PYTHONPATH=$FA$PYTHONPATH eval timeout "$(left)" $S --model hunyuanvideo --height 320 --width 512 \
                     --warmup 0 --repeat 1 --json "$OUT/hunyuan-small.json" 2>&1 | tee "$OUT/log-hunyuan-small.txt" \
                     | tail -n 16 ;;
    hunyuan15) eval timeout "$(left)" $S --model hunyuanvideo-1.5 --warmup 1 --repeat 2 \
                 --json "$OUT/hunyuan15.json" 2>&1 | tee "$OUT/log-hunyuan15.txt" | tail -n 16 ;;
    fp8) eval timeout "$(left)" $S --model flux.1-dev --warmup 2 --repeat 5 $ALL \
           --json "$OUT/flux-bf16-all.json" 2>&1 | tee "$OUT/log-flux-bf16.txt" | tail -n 16
         eval timeout "$(left)" $S --model flux.1-dev --warmup 2 --repeat 5 $FP8 \
           --json "$OUT/flux-fp8-all.json" 2>&1 | tee "$OUT/log-flux-fp8.txt" | tail -n 16 ;;
    offload) timeout "$(left)" python scripts/probes/offload_gpu.py 2>&1 | tee "$OUT/offload.txt" | tail -n 30 ;;
    cache) IFS=';' read -ra modes <<< "$CACHE_MODES"
           for mode in "${modes[@]}"; do
             name=$(echo "${mode:-lossless}" | sed 's/--//g; s/ /_/g')
             eval timeout "$(left)" $S --model flux.1-dev --e2e --checkpoint-dir "$FLUX_DIR" --warmup 0 --repeat 1 \
               --prompts 3 $mode --json "$OUT/e2e-flux-$name.json" 2>&1 | tee "$OUT/log-cache-$name.txt" | tail -n 7
           done ;;
    wan_cache) IFS=';' read -ra modes <<< ";$WAN_CACHE_MODES"
               for mode in "${modes[@]}"; do
                 name=$(echo "${mode:-lossless}" | sed 's/--//g; s/ /_/g')
                 PYTHONPATH=$FA$PYTHONPATH eval timeout "$(left)" $S --model wan2.1-t2v-1.3b --e2e --checkpoint-dir \
                   "$WAN_DIR" --sgdiff-only --warmup 0 --repeat 1 --prompts 2 $mode --json "$OUT/e2e-wan-$name.json" 2>&1 \
                   | tee "$OUT/log-wan-cache-$name.txt" | tail -n 7
               done ;;
    lora) timeout "$(left)" python scripts/probes/lora_cuda.py 2>&1 | tee "$OUT/lora.txt" | tail -n 20 ;;
    lora_speed) for speed in defaults all; do
                  timeout "$(left)" python scripts/bench_lora.py --speed $speed --json "$OUT/lora-speed-$speed.json" 2>&1 \
                    | tee "$OUT/lora-speed-$speed.txt" | tail -n 14
                done ;;
    aoti) timeout "$(left)" python scripts/probes/aoti_cuda_check.py 2>&1 | tee "$OUT/aoti.txt" | tail -n 20 ;;
    lora_switch) timeout "$(left)" python scripts/probes/lora_switch_profile.py 2>&1 | tee "$OUT/lora-switch.txt" \
                   | grep -v '^\s*$' | head -n 40 ;;
    startup) T=$(python -c 'import importlib.util; print(importlib.util.find_spec("torch").origin)')
             echo "torch: $T; PYTHONDONTWRITEBYTECODE=${PYTHONDONTWRITEBYTECODE:-unset}; pyc beside: $(python -c "import importlib.util, os; print(os.path.exists(importlib.util.cache_from_source('$T')))")"
             rm -rf ~/.cache/sgdiff/bytecode
             for i in 1 2; do /usr/bin/time -f "import torch, as Python does: %e s" python -c 'import torch'; done
             for i in 1 2 3; do /usr/bin/time -f "import torch, sgdiff's bytecode cache (run $i): %e s" \
               python -c 'from sgdiff.bytecode import use_bytecode_cache; print(use_bytecode_cache()); import torch'; done
             for i in 1 2; do /usr/bin/time -f "import torch._inductor, sgdiff's bytecode cache (run $i): %e s" \
               python -c 'from sgdiff.bytecode import use_bytecode_cache; use_bytecode_cache(); import torch._inductor.compile_fx'; done
             du -sh ~/.cache/sgdiff/bytecode ;;
    flux_offload) for kept in 0 auto; do
                    eval timeout "$(left)" $S --model flux.1-dev --e2e --checkpoint-dir "$FLUX_DIR" --warmup 0 --repeat 1 \
                      --cpu-offload layers --offload-resident-blocks $kept --gpu-memory-limit 12GiB \
                      --json "$OUT/e2e-flux-offload-$kept.json" 2>&1 | tee "$OUT/log-flux-offload-$kept.txt" | tail -n 14
                  done ;;
    flux_offload_fp8) IFS=';' read -ra modes <<< "$OFFLOAD_FP8_MODES"
                      for mode in "${modes[@]}"; do
                        name=$(echo "${mode:-uncapped}" | sed 's/--//g; s/ /_/g')
                        eval timeout "$(left)" $S --model flux.1-dev --e2e --checkpoint-dir "$FLUX_DIR" --sgdiff-only \
                          --warmup 0 --repeat 1 --dit-precision fp8 $mode --json "$OUT/e2e-flux-fp8-$name.json" 2>&1 \
                          | tee "$OUT/log-flux-fp8-$name.txt" | tail -n 8
                      done ;;
    wan14_offload) for cap in $OFFLOAD_CAPS; do
                     timeout "$(left)" python scripts/bench_offload.py --model wan2.1-t2v-14b --height 720 --width 1280 \
                       --gpu-memory-limit $cap --warmup 0 --repeat 2 --json "$OUT/offload-wan14-$cap.json" 2>&1 \
                       | tee "$OUT/log-offload-wan14-$cap.txt" | tail -n 6
                   done ;;
    qwen_profile) for all in "" "--all"; do
                    timeout "$(left)" python scripts/probes/profile_forward.py --model qwen-image --height 1328 --width 1328 \
                      $all 2>&1 | tee -a "$OUT/qwen-profile.txt" | tail -n 34
                  done ;;
    wan_profile) for all in "" "--all"; do
                   timeout "$(left)" python scripts/probes/profile_forward.py --model wan2.1-t2v-1.3b \
                     $all 2>&1 | tee -a "$OUT/wan-profile.txt" | tail -n 34
                 done ;;
    wan) eval timeout "$(left)" $S --model wan2.1-t2v-1.3b --warmup 1 --repeat 3 \
           --json "$OUT/wan-defaults.json" 2>&1 | tee "$OUT/log-wan.txt" | tail -n 16 ;;
    iio) mkdir -p /tmp/iio
         [ -d .wheels-fa/iio1 ] && cp .wheels-fa/iio1/iio.part00 /tmp/iio/
         if [ -d .wheels-fa/iio2 ] && [ -f /tmp/iio/iio.part00 ]; then
           cat /tmp/iio/iio.part00 .wheels-fa/iio2/iio.part01 > /tmp/iio/imageio_ffmpeg-0.8.1-py3-none-manylinux_2_28_x86_64.whl
           pip install -q --no-index --no-deps --target /tmp/site /tmp/iio/*.whl 2>&1 | grep -v WARN
         fi
         ls /tmp/site | grep -q imageio_ffmpeg && echo "imageio-ffmpeg installed" || echo "imageio-ffmpeg: half staged" ;;
    wan_e2e) PYTHONPATH=$FA$PYTHONPATH eval timeout "$(left)" $S --model wan2.1-t2v-1.3b --e2e --checkpoint-dir "$WAN_DIR" \
               --warmup 1 --repeat 1 --json "$OUT/e2e-wan.json" 2>&1 | tee "$OUT/log-wan-e2e.txt" | tail -n 8 ;;
    flux_e2e) for mode in "" "--enable-torch-compile"; do
                name=$(echo "${mode:-defaults}" | sed 's/--//g; s/ /_/g')
                eval timeout "$(left)" $S --model flux.1-dev --e2e --checkpoint-dir "$FLUX_DIR" --warmup 1 --repeat 1 $mode \
                  --json "$OUT/e2e-flux-$name.json" 2>&1 | tee "$OUT/log-e2e-$name.txt" | tail -n 14
              done ;;
    vae_split) timeout "$(left)" torchrun --nproc-per-node 2 scripts/probes/bench_vae_split.py 2>&1 \
                 | tee "$OUT/vae_split.txt" | tail -n 12 ;;
  esac
done
echo "== done at $SECONDS s"

#!/usr/bin/env bash
# Run here (PyPI reachable; the GPU machine reaches nothing): the wheels the GPU machine's image lacks, in the
# gitignored folders the GPU probes carry, each under one call's 64 MiB beside the ~20 MB tree:
#   .wheels/              diffusers 0.42.1, the server's packages, peft, accelerate, ... (~14 MB; gpu_models.sh)
#   .wheels-fa/call1/     FlashAttention 4 part 00 + base/ (a copy of .wheels)   gpu_flash_attention.sh, call 1
#   .wheels-fa/call1b/    part 01                                               the same script, call 2
#   .wheels-fa/call2/     part 02 and the checksum                               the same script, call 3
#   .wheels-fa/iio1/, iio2/  imageio-ffmpeg's 68 MB wheel in two halves           gpu_models.sh `iio`, twice
# FA4's wheels (~106 MB) are re-zipped uncompressed, tarred and `xz -9e`-ed (~73 MB; minutes on 2 cores), then
# split in 26.5 MB parts. Every call after the first must follow the one before on the still warm machine
# (its /tmp keeps what earlier calls staged; idle release ~30 s).
set -euo pipefail
cd "$(dirname "$0")/../.."
PLATFORM=(--only-binary=:all: --no-deps --python-version 3.12 --platform manylinux2014_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64
          --platform any)
mkdir -p .wheels
python3 -m pip download "${PLATFORM[@]}" -q -d .wheels diffusers==0.42.1 fastapi==0.165.0 starlette==1.10.0 \
  pydantic==2.14.4 pydantic-core==2.50.5 uvicorn==0.55.0 python-multipart==0.0.34 prometheus_client==0.26.0 \
  httpx==0.29.0 annotated-types typing-inspection anyio h11 httpcore sniffio ftfy wcwidth peft==0.21.2 \
  accelerate==1.15.0 sentencepiece "typing_extensions>=4.16"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/fa" "$work/stored" "$work/iio"
# FA4 and what the image lacks of its dependencies (libs-core holds the DSL's Python: ../shared/GPU_NOTES.md)
python3 -m pip download "${PLATFORM[@]}" -q -d "$work/fa" flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 \
  nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 \
  quack-kernels apache-tvm-ffi torch-c-dlpack-ext cuda-bindings cuda-pathfinder einops protobuf
python3 - "$work/fa" "$work/stored" <<'PY'
import pathlib, sys, zipfile
source, target = map(pathlib.Path, sys.argv[1:])
for wheel in source.glob("*.whl"):  # stored, not deflated: xz then compresses the whole far better
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(target / wheel.name, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            out.writestr(info, src.read(info), compress_type=zipfile.ZIP_STORED)
PY
(cd "$work/stored" && tar cf "$work/fa.tar" ./*.whl)
xz -9e -T2 -f "$work/fa.tar"
(cd "$work" && split -b 26500000 -d fa.tar.xz fa.tar.xz.part && sha256sum fa.tar.xz > fa.tar.xz.sha256)
rm -rf .wheels-fa && mkdir -p .wheels-fa/call1/base .wheels-fa/call1b .wheels-fa/call2 .wheels-fa/iio1 .wheels-fa/iio2
cp .wheels/*.whl .wheels-fa/call1/base/
cp "$work/fa.tar.xz.part00" .wheels-fa/call1/
cp "$work/fa.tar.xz.part01" .wheels-fa/call1b/
cp "$work/fa.tar.xz.part02" "$work/fa.tar.xz.sha256" .wheels-fa/call2/
python3 -m pip download "${PLATFORM[@]}" -q -d "$work/iio" imageio-ffmpeg==0.8.1
(cd "$work/iio" && split -n 2 -d imageio_ffmpeg-*.whl iio.part)
mv "$work/iio/iio.part00" .wheels-fa/iio1/ && mv "$work/iio/iio.part01" .wheels-fa/iio2/
du -sh .wheels .wheels-fa/*

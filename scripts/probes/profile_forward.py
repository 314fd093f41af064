"""Where one sgdiff transformer forward's GPU time goes: torch.profiler over a few forwards of a full-size
model (random weights, built as `sgdiff bench` builds it), kernels grouped by kind (GEMM, attention, fused
Triton kernels, elementwise, copies) and the 25 costliest kernels, in ms per forward.

    python scripts/probes/profile_forward.py --model qwen-image --height 1328 --width 1328 [--all] [--repeat 3]

--all: the toggles of `sgdiff bench`'s "all six" (compile, fused projections, GELU, norms) but the CUDA graph, whose
replays the profiler would not split into kernels (the kernels are the same; the graph saves their launches)."""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from sgdiff.bench.parts import BENCH_MODELS, build_transformers, transformer_inputs
from sgdiff.config import SpeedConfig
from sgdiff.models.attention import use_attention_impl
from sgdiff.pipeline.registry import family_named
from sgdiff.speed.apply import check_speed, resolve_speed, speed_up_transformer

KINDS = (  # (kind, substrings of a kernel's name), first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn_generated")),
    ("gemm", ("gemm", "sm90_xmma", "cutlass", "nvjet", "cublas", "matmul", "_mm_")),
    ("triton", ("triton",)),
    ("copy", ("copy", "memcpy", "cat", "memset")),
)


def kind_of(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, marks in KINDS if any(mark in lower for mark in marks)), "elementwise/other")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen-image", choices=sorted(BENCH_MODELS))
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda")
    model = BENCH_MODELS[args.model]
    speed = SpeedConfig()
    if args.all:
        speed = SpeedConfig(fused_projections=True, fused_gelu=True, fused_norms=True, torch_compile=True)
    speed = resolve_speed(speed, device, torch.bfloat16)
    attention = check_speed(speed, device, torch.bfloat16)
    size = dict(height=args.height or model.height, width=args.width or model.width, frames=model.frames)
    reference, ours = build_transformers(model, False, device)
    del reference  # (the same tensors as ours)
    inputs = transformer_inputs(model, ours, size, device, seed=1)
    speed_up_transformer(ours, speed, family_named(model.family))

    def forward():
        with torch.inference_mode(), use_attention_impl(attention):
            return ours(**inputs)

    for _ in range(3):
        forward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.repeat):
            forward()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    per_kind: dict[str, float] = collections.defaultdict(float)
    for event in kernels:
        per_kind[kind_of(event.key)] += event.device_time_total / 1e3 / args.repeat
    total = sum(per_kind.values())
    toggles = "all toggles but the CUDA graph" if args.all else "defaults"
    print(f"{args.model} {size['height']}x{size['width']}, {toggles}, "
          f"{torch.cuda.get_device_name(device)}: {total:.1f} ms of kernels per forward")  # fmt: skip
    for kind, ms in sorted(per_kind.items(), key=lambda item: -item[1]):
        print(f"  {kind:18} {ms:8.2f} ms  {ms / total:6.1%}")
    print("the 25 costliest kernels (ms per forward, calls per forward):")
    for event in sorted(kernels, key=lambda e: -e.device_time_total)[:25]:
        ms = event.device_time_total / 1e3 / args.repeat
        print(f"  {ms:8.2f} {event.count // args.repeat:5d}  {kind_of(event.key):12} {event.key[:110]}")


if __name__ == "__main__":
    main()

"""On a GPU: where the first denoising step's extra time goes. A FLUX.1-dev transformer at full width
but few blocks (the first-call costs are per kernel, not per block), random bf16 weights, the default
speed toggles and attention; each mode runs in a fresh process (as `sgdiff generate` does):

- `plain`: the first three forwards, timed;
- `parts`: first calls one kind at a time (import of Triton and sgdiff's kernels, a bf16 GEMM, the
  attention at the request's shape), then the first forwards: what a warm-up of each would hide;
- `profile`: the first forward under torch.profiler, the ops by CPU time.

    python scripts/probes/first_step.py [--size 1024]"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def timed(label: str, work) -> None:
    import torch

    torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    torch.cuda.synchronize()
    print(f"  {label:<40} {time.perf_counter() - start:8.3f} s", flush=True)


def run_mode(mode: str, size: int) -> None:
    import torch

    from sgdiff.config import SpeedConfig
    from sgdiff.families.flux.family import FluxFamily
    from sgdiff.models.attention import use_attention_impl
    from sgdiff.models.flux import FluxTransformer
    from sgdiff.models.flux.config import FLUX_DEV
    from sgdiff.models.flux.packing import image_position_ids, text_position_ids
    from sgdiff.speed.apply import check_speed, resolve_speed, speed_up_transformer

    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = FluxTransformer(replace(FLUX_DEV, num_layers=2, num_single_layers=4))
    torch.set_default_dtype(torch.float32)
    model.eval().requires_grad_(False)
    speed = resolve_speed(SpeedConfig(), device, dtype)
    attention = check_speed(speed, device, dtype)
    speed_up_transformer(model, speed, FluxFamily())
    side, text_len = size // 16, 512
    inputs = dict(
        hidden_states=torch.randn(1, side * side, 64, device=device, dtype=dtype),
        encoder_hidden_states=torch.randn(1, text_len, 4096, device=device, dtype=dtype),
        pooled_projections=torch.randn(1, 768, device=device, dtype=dtype),
        timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
        img_ids=image_position_ids(side, side).to(device, dtype),
        txt_ids=text_position_ids(text_len).to(device, dtype),
        guidance=torch.full((1,), 3.5, device=device),
    )
    torch.cuda.synchronize()
    print(f"{mode}: {torch.cuda.get_device_name()}, {speed}", flush=True)
    forward = lambda: model(**inputs)  # noqa: E731
    with use_attention_impl(attention), torch.inference_mode():
        if mode == "parts":
            timed("import triton + sgdiff kernels", lambda: __import__("sgdiff.kernels.triton_norm_modulate"))
            timed("import qk_norm_rope kernel", lambda: __import__("sgdiff.kernels.triton_qk_norm_rope"))
            a = torch.randn(side * side, 3072, device=device, dtype=dtype)
            timed("first bf16 GEMM", lambda: a @ a.T[:, :3072])
            timed("second bf16 GEMM", lambda: a @ a.T[:, :3072])
            q = torch.randn(1, side * side + text_len, 24, 128, device=device, dtype=dtype)
            timed("first attention at the step's shape", lambda: attention(q, q, q))
            timed("second attention", lambda: attention(q, q, q))
        if mode == "profile":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                timed("first forward (profiled)", forward)
            print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
        for index in range(3):
            timed(f"forward {index + 1}", forward)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--mode", choices=["plain", "parts", "profile"])
    args = parser.parse_args()
    if args.mode:
        return run_mode(args.mode, args.size)
    for mode in ("plain", "parts", "plain", "profile"):  # plain twice: Triton's cache is warm the second time
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--mode", mode, "--size", str(args.size)], check=False)
        print(f"  (process {time.perf_counter() - start:.2f} s)", flush=True)


if __name__ == "__main__":
    main()

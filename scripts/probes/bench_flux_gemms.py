"""FLUX.1-dev's GEMMs at one GPU's rows and at a Ulysses rank's share (one CUDA GPU)

    python scripts/probes/bench_flux_gemms.py [--ranks 2]

Times each GEMM of a FLUX.1-dev 1024x1024 forward through cuBLAS as the model runs it with every
toggle (torch.addmm; torch._addmm_activation for the MLPs' GELU epilogue), by CUDA events, median of
30: the image and text streams of the 19 double-stream blocks (4096 and 512 rows on one GPU) and the
38 single-stream blocks (4608 rows), then the same with each row count divided by --ranks. Prints
µs and TFLOP/s per GEMM and the GEMM time of a whole forward: how far the halved GEMMs fall short
of half of one GPU's.

Then the single-stream block's proj_out three ways, at both row counts: as the model runs it (two
GEMMs over the attention output, K = 3072, and the MLP output, K = 12288, accumulated into one
output), as one K = 15360 GEMM over both side by side, and what that layout costs the MLP GEMM in
GELU (its output is then a slice, where torch takes no cuBLASLt epilogue: the GELU is a pass of its
own).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: bench_common
from bench_common import time_call  # noqa: E402

DIM, MLP = 3072, 12288
# (N, K, GELU in the epilogue) of the GEMMs a block runs per stream, with fused projections and GELU
DOUBLE_STREAM = [(3 * DIM, DIM, False), (DIM, DIM, False), (MLP, DIM, True), (DIM, MLP, False)]
SINGLE_STREAM = [(3 * DIM, DIM, False), (MLP, DIM, True), (DIM, DIM, False), (DIM, MLP, False)]
BLOCKS = {"image": (19, 4096, DOUBLE_STREAM), "text": (19, 512, DOUBLE_STREAM), "single": (38, 4608, SINGLE_STREAM)}


def gpu_ms(fn, repeat: int = 30) -> float:
    """Median ms of `repeat` calls after 5 warm-up calls (CUDA events, bench_common.time_call)."""
    for _ in range(5):
        fn()
    return statistics.median(time_call(fn) for _ in range(repeat))


def gemm_ms(m: int, n: int, k: int, gelu: bool) -> float:
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, w, b = torch.randn(m, k, **bf16), torch.randn(n, k, **bf16), torch.randn(n, **bf16)
    if gelu:
        return gpu_ms(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True))
    return gpu_ms(lambda: torch.addmm(b, x, w.t()))


def forward_gemms(ranks: int) -> tuple[float, list[str]]:
    """ms of GEMMs per forward with each block's rows divided by `ranks`, and a line per GEMM."""
    total, lines = 0.0, []
    for stream, (blocks, rows, shapes) in BLOCKS.items():
        m = rows // ranks
        for n, k, gelu in shapes:
            ms = gemm_ms(m, n, k, gelu)
            total += blocks * ms
            tflops = 2 * m * n * k / ms / 1e9
            shape = f"{stream:6} M={m:5} N={n:5} K={k:5}{' +GELU' if gelu else '      '}"
            lines.append(f"{shape} {ms * 1e3:7.1f} us {tflops:5.0f} TFLOP/s")
    return total, lines


def proj_out_ways(m: int) -> dict[str, float]:
    """µs of the single-stream block's proj_out (and the GELU the joined layout adds) at m rows."""
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    joined = torch.randn(m, DIM + MLP, **bf16)  # [attention output | MLP output]
    attn, mlp = torch.randn(m, DIM, **bf16), torch.randn(m, MLP, **bf16)
    w, b = torch.randn(DIM, DIM + MLP, **bf16), torch.randn(DIM, **bf16)

    def split():
        out = torch.addmm(b, attn, w[:, :DIM].t())
        out.addmm_(mlp, w[:, DIM:].t())

    def gelu_pass():
        torch.ops.aten.gelu_(joined[:, DIM:], approximate="tanh")

    return {
        "two GEMMs, accumulated (as run)": gpu_ms(split) * 1e3,
        "one GEMM over both (K = 15360)": gpu_ms(lambda: torch.addmm(b, joined, w.t())) * 1e3,
        "GELU as its own pass on the MLP slice": gpu_ms(gelu_pass) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2, help="the Ulysses degree whose share of rows to time")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark times cuBLAS: it needs a CUDA GPU")
    whole, whole_lines = forward_gemms(1)
    share, share_lines = forward_gemms(args.ranks)
    for one, other in zip(whole_lines, share_lines, strict=True):
        print(f"{one}  |  {other}")
    excess = share - whole / args.ranks
    print(f"\n{torch.cuda.get_device_name()}: GEMMs per forward, 1 GPU {whole:.1f} ms; a Ulysses-{args.ranks} rank")
    print(f"{share:.1f} ms (1/{args.ranks} of one GPU: {whole / args.ranks:.1f}, excess {excess:.1f})")
    for m in (4608, 4608 // args.ranks):
        ways = "; ".join(f"{name} {us:.1f} us" for name, us in proj_out_ways(m).items())
        print(f"single-stream proj_out at {m} rows: {ways}")


if __name__ == "__main__":
    main()

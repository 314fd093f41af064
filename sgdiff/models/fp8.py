"""FP8 weights (--dit-precision fp8): the math of a Linear whose weight is stored in float8.

The weight [N, K] is stored as float8 e4m3 (the "fn" variant: no infinities, largest finite value
448) with one float32 scale per output channel (row); the input is quantised on the fly with one
scale per token (row of the flattened [M, K] input). The matmul runs on the FP8 tensor cores
(torch._scaled_mm with row-wise scales: Ada and Hopper GPUs and newer, bf16 output), which apply
both scales and the bf16 bias in its epilogue:

    y[m, n] = (sum_k qx[m, k] * qw[n, k]) * sx[m] * sw[n] + bias[n]

Scales: each row's largest magnitude (amax) / 448, so that value lands on e4m3's largest finite
one; a row is divided by its scale, clamped to [-448, 448] (saturation: the cast alone would not
promise it) and rounded to nearest even by the cast. An all-zero row gets a tiny scale (EPS / 448)
and stays zero. Per token, not one scale per tensor: a DiT's activations hold tokens whose
magnitudes differ by orders (FLUX's text tokens against its image tokens, a few outlier tokens), and
one scale set by the largest would push the others into e4m3's subnormals (below 2^-6, fewer bits);
a row's amax is one reduction, which torch.compile fuses with the cast.

On the CPU (no FP8 matmul worth using; the tests) the same float8 values are multiplied in float32 and
scaled after, as the tensor cores do, rounded once to the input's dtype (`scaled_mm_emulated`): the
same numbers up to the order of the float32 sums."""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(FP8).max
EPS = 1e-12  # the least amax a scale is made from (an all-zero row)
# FP8 tensor cores' fast accumulation (Hopper: partial sums kept at the MMA's own precision instead of
# promoted to float32 every few K steps): what inference recipes use (torchao's forward GEMMs)
FAST_ACCUM = True


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] float8 e4m3, scale [M, 1] float32) with x ~ q * scale, one scale per row."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=EPS) / FP8_MAX  # (amax is exact in x's dtype)
    return cast_fp8(x, scale), scale


def cast_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale (in float32) saturated to [-448, 448] and rounded to float8 e4m3 (nearest, ties to even)."""
    return (x / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear's weight [N, K] -> (q [N, K] float8 e4m3, scale [N] float32): one scale per output
    channel (a fused projection's concatenated rows keep their own Linears' scales)."""
    q, scale = quantize_rows(weight.detach())
    return q, scale.view(-1)


def scaled_mm(
    qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None, dtype
) -> torch.Tensor:
    """qx [M, K] (row-major) with sx [M, 1], times qw [N, K] with sw [N], plus bias [N] -> [M, N] in
    `dtype`, by torch._scaled_mm's row-wise mode (K and N multiples of 16; CUDA: bf16 out)."""
    # mat1 row-major (a no-op unless x came strided), mat2 [K, N] column-major (the row-major weight's
    # transposed view), scale_b [1, N]
    qx, mat2, sw = qx.contiguous(), qw.t(), sw.view(1, -1)
    return torch._scaled_mm(qx, mat2, sx, sw, bias=bias, out_dtype=dtype, use_fast_accum=FAST_ACCUM)


def scaled_mm_emulated(
    qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None, dtype
) -> torch.Tensor:
    """scaled_mm's numbers on any device, in its order: the float8 values' products summed in float32
    (each product is exact there), then both scales and the bias, rounded once to `dtype`."""
    out = (qx.float() @ qw.float().t()) * sx * sw.view(1, -1)  # [M, K] @ [K, N], scaled per row and column
    return (out if bias is None else out + bias.float()).to(dtype)


def fp8_linear(x: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """linear(x) with the float8 weight qw [N, K] and its scales sw [N]: x [.., K] -> [.., N] in x's
    dtype, its tokens quantised per row. FP8 tensor cores on CUDA, emulated elsewhere."""
    flat = x.reshape(-1, x.shape[-1])  # [B, S, K] -> [B*S, K]
    qx, sx = quantize_rows(flat)
    matmul = scaled_mm if x.is_cuda else scaled_mm_emulated
    out = matmul(qx, sx, qw, sw, bias, x.dtype)
    return out.view(*x.shape[:-1], out.shape[-1])

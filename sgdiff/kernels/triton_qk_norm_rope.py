"""The Triton side of qk_norm_rope.py (imported only when the kernel runs: Triton is a GPU package).
Launched directly; kernels/compiled_ops.py registers the same launch as an op for torch.compile."""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from sgdiff.kernels import unit_stride_rows


@triton.jit
def norm_rope_kernel(
    x_ptr, x_batch_stride, x_row_stride, w_ptr, rope_ptr, out_ptr, out_batch_stride,
    S, first_row, eps,
    H: tl.constexpr, HB: tl.constexpr, D: tl.constexpr, DB: tl.constexpr, PER_HEAD: tl.constexpr,
    ROUND_NORMED: tl.constexpr,
):  # fmt: skip
    # one program per token: its H heads of D channels as an [HB, DB] block (H, D rounded up to powers of 2)
    b, s = tl.program_id(0) // S, tl.program_id(0) % S
    heads = tl.arange(0, HB)[:, None]
    dims = tl.arange(0, DB)[None, :]
    mask = (heads < H) & (dims < D)
    x = tl.load(x_ptr + b * x_batch_stride + s * x_row_stride + heads * D + dims, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if PER_HEAD:  # FLUX: RMSNorm over each head's D channels, weight [D]
        rstd = tl.rsqrt((tl.sum(x * x, axis=1) / D + eps).to(tl.float32))[:, None]  # (compiled: eps is float64)
        w = tl.load(w_ptr + dims, mask=dims < D, other=0.0).to(tl.float32)
    else:  # Wan: over all H*D channels, weight [H*D]
        rstd = tl.rsqrt((tl.sum(tl.sum(x * x, axis=1), axis=0) / (H * D) + eps).to(tl.float32))
        w = tl.load(w_ptr + heads * D + dims, mask=mask, other=0.0).to(tl.float32)
    # round to bfloat16 (nearest, ties to even) on the bits, as float32: no compiler drops this rounding
    # (helpers are inlined by hand: torch.compile re-emits this kernel's source on its own)
    y = x * rstd
    if ROUND_NORMED:  # Qwen-Image (diffusers' RMSNorm): the normalised x rounded before the weight scales it
        bits = y.to(tl.uint32, bitcast=True)
        y = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    y = (y * w).to(tl.uint32, bitcast=True)
    y = ((y + 0x7FFF + ((y >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    real, imag = tl.split(tl.reshape(y, [HB, DB // 2, 2]))  # channel pairs (2j, 2j+1): [HB, DB/2] each
    j = tl.arange(0, DB // 2)[None, :]
    row = first_row + s  # this token's row of the joint sequence and of the rotations [S_all, D/2, 2]
    cos = tl.load(rope_ptr + row * D + 2 * j, mask=2 * j < D, other=1.0)
    sin = tl.load(rope_ptr + row * D + 2 * j + 1, mask=2 * j < D, other=0.0)
    rotated = tl.reshape(tl.join(real * cos - imag * sin, real * sin + imag * cos), [HB, DB])
    bits = rotated.to(tl.uint32, bitcast=True)
    out = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True).to(tl.bfloat16)
    tl.store(out_ptr + b * out_batch_stride + row * H * D + heads * D + dims, out, mask=mask)


def qk_norm_rope(
    parts: list[torch.Tensor], weights: list[torch.Tensor], rope: torch.Tensor, heads: int, eps: float,
    round_normed: bool = False, wrap: Callable = lambda kernel: kernel,
) -> torch.Tensor:  # fmt: skip
    """The kernel over each part's rows; `wrap`: how to launch it (torch.compile's op wraps it for tracing)."""
    batch, width = parts[0].shape[0], parts[0].shape[-1]
    total = sum(part.shape[1] for part in parts)
    out = torch.empty(batch, total, heads, width // heads, device=parts[0].device, dtype=torch.bfloat16)
    first_row = 0
    for part, weight in zip(parts, weights, strict=True):
        rows, part = part.shape[1], unit_stride_rows(part)
        wrap(norm_rope_kernel)[(batch * rows,)](
            part, part.stride(0), part.stride(1), weight, rope, out, out.stride(0),
            rows, first_row, eps, H=heads, HB=triton.next_power_of_2(heads), D=width // heads,
            DB=triton.next_power_of_2(width // heads), PER_HEAD=weight.numel() * heads == width,
            ROUND_NORMED=round_normed, num_warps=4,
        )  # fmt: skip
        first_row += rows
    return out

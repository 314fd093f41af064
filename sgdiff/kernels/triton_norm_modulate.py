"""The Triton side of norm_modulate.py (imported only when the kernel runs: Triton is a GPU package).
Launched directly; kernels/compiled_ops.py registers the same launch as an op for torch.compile."""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from sgdiff.kernels import unit_stride_rows


@triton.jit
def norm_modulate_kernel(
    x_ptr, x_batch_stride, x_row_stride, shift_ptr, scale_ptr, mod_batch_stride, mod_row_stride, out_ptr,
    S, eps, N: tl.constexpr, BLOCK: tl.constexpr, BF16_STEPS: tl.constexpr, AFFINE: tl.constexpr,
):  # fmt: skip
    # one program per token: LayerNorm (no affine) over its N channels, then * (1 + scale) + shift
    # (AFFINE: * scale + shift, the LayerNorm's own weight and bias)
    b, s = tl.program_id(0) // S, tl.program_id(0) % S
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + b * x_batch_stride + s * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    centred = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt((tl.sum(centred * centred, axis=0) / N + eps).to(tl.float32))  # (compiled: eps is float64)
    mod = b * mod_batch_stride + s * mod_row_stride + cols
    shift = tl.load(shift_ptr + mod, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + mod, mask=mask, other=0.0).to(tl.float32)
    y = centred * rstd
    if BF16_STEPS:  # FLUX: every op of layer_norm(x) * (1 + scale) + shift rounds to bf16, as eager does
        # round to bfloat16 (nearest, ties to even) on the bits, kept as float32 (inlined by hand:
        # torch.compile re-emits a user kernel's source without its helpers)
        bits = y.to(tl.uint32, bitcast=True)
        y = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        bits = (1.0 + scale).to(tl.uint32, bitcast=True)
        one_plus = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        bits = (y * one_plus).to(tl.uint32, bitcast=True)
        y = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True) + shift
    elif AFFINE:  # a float32 LayerNorm's weight and bias (Wan's cross-attention norm), rounded once at the end
        y = y * scale + shift
    else:  # Wan: in float32 throughout, rounded once at the end
        y = y * (1.0 + scale) + shift
    bits = y.to(tl.uint32, bitcast=True)
    out = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True).to(tl.bfloat16)
    tl.store(out_ptr + (b * S + s) * N + cols, out, mask=mask)


def norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, bf16_steps: bool,
    wrap: Callable = lambda kernel: kernel, affine: bool = False,
) -> torch.Tensor:  # fmt: skip
    """The kernel over x's rows; `wrap`: how to launch it (torch.compile's op wraps it for tracing)."""
    batch, rows, width = x.shape
    out = torch.empty(batch, rows, width, device=x.device, dtype=torch.bfloat16)
    x, shift, scale = unit_stride_rows(x), unit_stride_rows(shift), unit_stride_rows(scale)
    shift, scale = shift.expand(batch, rows, width), scale.expand(batch, rows, width)
    if shift.stride() != scale.stride():
        shift, scale = shift.contiguous(), scale.contiguous()
    block = triton.next_power_of_2(width)
    wrap(norm_modulate_kernel)[(batch * rows,)](
        x, x.stride(0), x.stride(1), shift, scale, shift.stride(0), shift.stride(1), out,
        rows, eps, N=width, BLOCK=block, BF16_STEPS=bf16_steps, AFFINE=affine, num_warps=8 if block >= 4096 else 4,
    )  # fmt: skip
    return out

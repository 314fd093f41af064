"""A gated residual update, x + y * gate in float32 rounded once to bf16, as one Triton kernel
(--enable-fused-norms; models/layers.py GatedResidual): one read of x, y and the gate and one write, where
eager runs five kernels and passes float32 copies of the whole sequence between them (Wan's blocks, twice
each: about 50 ms of copies and adds in a Wan2.1-1.3B forward on an H100, docs/benchmarks.md run GH).
Imported only when the kernel runs (Triton is a GPU package)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sgdiff.kernels import unit_stride_rows


@triton.jit
def gated_residual_kernel(
    x_ptr, x_batch_stride, x_row_stride, y_ptr, y_batch_stride, y_row_stride,
    gate_ptr, gate_batch_stride, gate_row_stride, out_ptr, S, N: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # one program per token: x + y * gate over its N channels in float32, rounded once to bf16
    b, s = tl.program_id(0) // S, tl.program_id(0) % S
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + b * x_batch_stride + s * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * y_batch_stride + s * y_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + b * gate_batch_stride + s * gate_row_stride + cols, mask=mask, other=0.0)
    total = x + y * gate.to(tl.float32)  # (launched without FMA contraction: two roundings, as eager's two ops)
    # round to bfloat16 (nearest, ties to even) on the bits
    bits = total.to(tl.uint32, bitcast=True)
    out = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True).to(tl.bfloat16)
    tl.store(out_ptr + (b * S + s) * N + cols, out, mask=mask)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x, y: [B, S, N] bf16 (a strided last dim is copied first); gate: [B, 1 or S, N] float32 -> [B, S, N] bf16,
    equal to (x.float() + y.float() * gate).to(bf16)."""
    batch, rows, width = x.shape
    out = torch.empty(batch, rows, width, device=x.device, dtype=torch.bfloat16)
    x, y, gate = unit_stride_rows(x), unit_stride_rows(y), unit_stride_rows(gate).expand(batch, rows, width)
    block = triton.next_power_of_2(width)
    gated_residual_kernel[(batch * rows,)](
        x, x.stride(0), x.stride(1), y, y.stride(0), y.stride(1), gate, gate.stride(0), gate.stride(1), out,
        rows, N=width, BLOCK=block, num_warps=8 if block >= 4096 else 4, enable_fp_fusion=False,
    )  # fmt: skip
    return out

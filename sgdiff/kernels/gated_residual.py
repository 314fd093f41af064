"""A gated residual update, x + y * gate in float32 rounded once to x's bf16, as one Triton kernel
(--enable-fused-norms): one read of x, y and the gate and one write, where eager runs five kernels and
passes float32 copies of the whole sequence between them (Wan's blocks, twice each: about 50 ms of
copies and adds in a Wan2.1-1.3B forward on an H100, docs/benchmarks.md run GH)."""

from __future__ import annotations

import torch


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x, y: [B, S, N] bf16 (last dim contiguous); gate: [B, 1 or S, N] float32 -> [B, S, N] bf16, equal to
    (x.float() + y.float() * gate).to(bf16). Under torch.compile the expression itself: inductor fuses it."""
    if torch.compiler.is_compiling():
        return (x.float() + y.float() * gate).type_as(x)
    from sgdiff.kernels.triton_gated_residual import gated_residual as launch

    return launch(x, y, gate)

"""sgdiff's Triton kernels as torch.library ops, for torch.compile: inductor sees through a
`triton_op` and schedules the kernel inside its graph. Imported only when something is compiled
(speed/compile.py): torch.library's Triton support imports torch._dynamo and inductor, seconds that
an eager run, which launches the kernels directly, never pays."""

from __future__ import annotations

import torch
from torch.library import triton_op, wrap_triton

from sgdiff.kernels import triton_norm_modulate, triton_qk_norm_rope


@triton_op("sgdiff::norm_modulate", mutates_args=())
def norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, bf16_steps: bool, affine: bool = False
) -> torch.Tensor:
    return triton_norm_modulate.norm_modulate(x, shift, scale, eps, bf16_steps, wrap=wrap_triton, affine=affine)


@triton_op("sgdiff::qk_norm_rope", mutates_args=())
def qk_norm_rope(
    parts: list[torch.Tensor],
    weights: list[torch.Tensor],
    rope: torch.Tensor,
    heads: int,
    eps: float,
    round_normed: bool = False,
) -> torch.Tensor:
    return triton_qk_norm_rope.qk_norm_rope(parts, weights, rope, heads, eps, round_normed, wrap=wrap_triton)

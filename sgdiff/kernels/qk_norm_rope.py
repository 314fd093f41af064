"""q or k of one attention: RMSNorm, then the rotary embedding, in one Triton kernel per stream
(--enable-fused-norms). Unfused, that is a norm kernel, a float32 rotation and copies into the
joint sequence: FLUX.1-dev's single-stream block spends ~127 us on q and k that way (inductor's
fusion) and 44 us in this kernel, against 34 us to read and write them once (H100).

Rounding as the unfused path does it: the norm's output to bf16 (with round_normed, as diffusers' own
RMSNorm does for Qwen-Image, the normalised x to bf16 first, then its product with the weight), the
rotation in float32, the result to bf16 (round to nearest even, done on the bits so that no compiler
can drop it)."""

from __future__ import annotations

import torch


def qk_norm_rope(
    parts: list[torch.Tensor],
    weights: list[torch.Tensor],
    rope: torch.Tensor,
    heads: int,
    eps: float,
    round_normed: bool = False,
) -> torch.Tensor:
    """parts: [B, S_i, H*D] bf16 (rows may be strided: slices of a fused projection), each RMSNormed
    with its weight ([D]: per head; [H*D]: over all heads), joined along the sequence and rotated by
    rope [sum S_i, D/2, 2] (cos, sin; float32) -> [B, sum S_i, H, D] contiguous."""
    if torch.compiler.is_compiling():  # the op speed/compile.py registered (kernels/compiled_ops.py)
        return torch.ops.sgdiff.qk_norm_rope(parts, weights, rope.contiguous(), heads, eps, round_normed)
    from sgdiff.kernels.triton_qk_norm_rope import qk_norm_rope as launch

    return launch(parts, weights, rope.contiguous(), heads, eps, round_normed)

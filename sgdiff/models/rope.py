"""Multi-axis rotary position embedding (FLUX: text/height/width axes; Wan: frame/row/column)."""

from __future__ import annotations

import torch

from sgdiff.kernels import kernels_run_on
from sgdiff.models.layers import RMSNorm


def rope_frequencies(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float) -> torch.Tensor:
    """ids: [S, n_axes] positions -> [S, sum(axes_dim) / 2, 2] float32 (cos, sin) of the rotation
    angles pos*freq. Channel pair (2j, 2j+1) of a head rotates by entry j."""
    # float64 angles, as the reference does, so large positions stay exact; MPS has no float64.
    real_dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    pos = ids.float().to(real_dtype)
    parts = []
    for axis, dim in enumerate(axes_dim):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=real_dtype, device=ids.device) / dim)
        angles = torch.outer(pos[:, axis], inv_freq)  # [S, dim / 2]
        parts.append(torch.polar(torch.ones_like(angles), angles))
    rotations = torch.cat(parts, dim=-1).to(torch.complex64)  # e^(i*angle), [S, D/2]
    return torch.view_as_real(rotations).contiguous()


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, D]; rope: [S, D/2, 2] (cos, sin). Each channel pair rotated in float32, back to x's
    dtype. Eager: one complex multiply (fewest kernels); traced by torch.compile: the same product in
    real arithmetic, which inductor fuses into one kernel (it does not generate complex code)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, S, H, D/2, 2]
    if torch.compiler.is_compiling():
        real, imag = pairs.unbind(-1)
        cos, sin = rope[None, :, None].unbind(-1)  # [1, S, 1, D/2]
        rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    else:
        product = torch.view_as_complex(pairs.contiguous()) * torch.view_as_complex(rope)[None, :, None, :]
        rotated = torch.view_as_real(product)
    return rotated.flatten(-2).to(x.dtype)


def norm_and_rope(parts: list[tuple[torch.Tensor, RMSNorm]], rope: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k of one attention: each [B, S_i, H*D] part RMSNormed by its norm (over each head's D
    channels or over all H*D, as the norm's size says), the parts joined along the sequence, then
    rotated by rope [sum S_i, D/2, 2] -> [B, sum S_i, H, D]. With --enable-fused-norms (norms
    with `rope_kernel` chosen, rounding alike; bf16) one Triton kernel per part does all of it."""
    xs, norms = [x for x, _ in parts], [norm for _, norm in parts]
    fused = all(norm.rope_kernel and norm.weight is not None for norm in norms)
    fused = fused and len({norm.round_normed for norm in norms}) == 1
    if fused and kernels_run_on(xs[0]) and xs[0].dtype == torch.bfloat16:
        from sgdiff.kernels.qk_norm_rope import qk_norm_rope

        eps = norms[0].eps if norms[0].eps is not None else torch.finfo(xs[0].dtype).eps
        return qk_norm_rope(xs, [norm.weight for norm in norms], rope, heads, eps, norms[0].round_normed)
    normed = [
        norm(x).unflatten(-1, (heads, -1)) if norm.normalized_shape[0] == x.shape[-1]  # over all heads
        else norm(x.unflatten(-1, (heads, -1)))  # [B, S, H*D] -> [B, S, H, D], per head
        for x, norm in parts
    ]  # fmt: skip
    return apply_rope(normed[0] if len(normed) == 1 else torch.cat(normed, dim=1), rope)

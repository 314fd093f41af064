"""Multi-axis rotary position embedding (FLUX: text/height/width axes), as complex rotations."""

from __future__ import annotations

import torch


def rope_frequencies(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float) -> torch.Tensor:
    """ids: [S, n_axes] positions -> [S, sum(axes_dim) / 2] complex64 unit rotations e^(i*pos*freq).
    Channel pair (2j, 2j+1) of a head rotates by entry j."""
    # float64 angles, as the reference does, so large positions stay exact; MPS has no float64.
    real_dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    pos = ids.float().to(real_dtype)
    parts = []
    for axis, dim in enumerate(axes_dim):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=real_dtype, device=ids.device) / dim)
        angles = torch.outer(pos[:, axis], inv_freq)  # [S, dim / 2]
        parts.append(torch.polar(torch.ones_like(angles), angles))
    return torch.cat(parts, dim=-1).to(torch.complex64)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x: [B, S, H, D]; freqs: [S, D/2] complex. One complex multiply in float32, back to x's dtype."""
    pairs = torch.view_as_complex(x.float().contiguous().unflatten(-1, (-1, 2)))  # [B, S, H, D/2]
    rotated = torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(-2)  # [B, S, H, D]
    return rotated.to(x.dtype)

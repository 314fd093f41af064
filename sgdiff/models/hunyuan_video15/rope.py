"""HunyuanVideo-1.5's rotary positions: the video tokens rotate by their (frame, row, column), the text tokens
not at all (diffusers rotates the video stream's q and k before it joins the text's)."""

from __future__ import annotations

import torch

from sgdiff.models.wan.transformer import video_position_ids

Grid = tuple[int, int, int]  # (frames, rows, columns) of tokens


def video_rope(grid: Grid, axes_dim: tuple[int, ...], theta: float, device: torch.device) -> torch.Tensor:
    """[F*H*W, sum(axes_dim) / 2, 2] float32 (cos, sin) for a token grid (F, H, W), channel pair j of a head
    rotated by entry j; frequencies and angles in float32, as diffusers' get_1d_rotary_pos_embed computes them
    for this model (models/rope.py's rope_frequencies, FLUX's and Wan's, works in float64)."""
    positions = video_position_ids(*grid, device).float()  # [S, 3]
    angles = []
    for axis, dim in enumerate(axes_dim):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
        angles.append(torch.outer(positions[:, axis], inv_freq))  # [S, dim / 2]
    joined = torch.cat(angles, dim=-1)  # [S, D / 2]
    return torch.stack([joined.cos(), joined.sin()], dim=-1)


def joint_rope(video: torch.Tensor, context_tokens: int) -> torch.Tensor:
    """The table of the joint sequence [video; context]: the video's rows, then the identity rotation (cos 1,
    sin 0) for each context token. video: [S_vid, D/2, 2] -> [S_vid + S_ctx, D/2, 2]."""
    identity = torch.zeros(context_tokens, *video.shape[1:], dtype=video.dtype, device=video.device)
    identity[..., 0] = 1
    return torch.cat([video, identity])

"""HunyuanVideo's rotary positions (diffusers' HunyuanVideoRotaryPosEmbed).

The video tokens sit at (frame, row, column) of the patch grid, in the order the patch embedding
lays them out; theta 256, the head's channels split over the axes as rope_axes_dim says, angles in
float32 as diffusers computes them. The text tokens are not rotated: their rows of the joint table
are the identity rotation (cos 1, sin 0), which leaves q and k exactly as they are, so one table
covers the joint sequence [video; text] and the shared joint-attention path (models/attention.py)
rotates every stream alike.
"""

from __future__ import annotations

import torch

from sgdiff.models.wan.transformer import video_position_ids

Grid = tuple[int, int, int]  # (frames, rows, cols) of the video tokens after patching


def video_rope(grid: Grid, axes_dim: tuple[int, ...], theta: float, device: torch.device) -> torch.Tensor:
    """[F*R*C, head_dim / 2, 2] (cos, sin) of the video tokens, raster order (frame, row, column);
    channel pair (2j, 2j+1) of a head rotated by entry j. Angles, cosines and sines in float32, computed
    as diffusers computes them (Qwen-Image's table, through torch.polar, can differ in the last bit)."""
    ids = video_position_ids(*grid, device)  # [S_vid, 3]
    angles = []
    for axis, dim in enumerate(axes_dim):
        inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
        angles.append(torch.outer(ids[:, axis].float(), inv_freq))  # [S_vid, dim / 2]
    joined = torch.cat(angles, dim=-1)  # [S_vid, D / 2]
    return torch.stack([joined.cos(), joined.sin()], dim=-1)


def joint_rope(video: torch.Tensor, text_len: int) -> torch.Tensor:
    """The table of the joint sequence [video; text]: video [S_vid, D/2, 2], then text_len identity rows."""
    identity = video.new_zeros(text_len, *video.shape[1:])  # [S_txt, D/2, 2]
    identity[..., 0] = 1.0  # cos 1, sin 0
    return torch.cat([video, identity])

"""Qwen-Image's rotary positions (diffusers' QwenEmbedRope, scale_rope=True).

Axes (frame, row, col). Image i of a batch item (0: the noise latents; 1, 2, ...: the Edit pipelines'
input images, their tokens after the noise tokens) sits at frame i; its rows and columns are centred
on 0 (a grid of 5 rows: -3 .. 1). The text sits on the diagonal (p, p, p), p counting up from the
largest half-size of the grids, so it never shares a position with the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

Grid = tuple[int, int, int]  # (frames, rows, cols) of one image's tokens, in raster order


def image_grids(img_shapes: Sequence[Sequence[Grid]], batch: int, image_tokens: int) -> list[Grid]:
    """The grids of every batch item's image tokens (one rotary table serves the whole batch, as in
    diffusers, so the items must agree; diffusers only warns and uses the first)."""
    if len(img_shapes) != batch:
        raise ValueError(f"img_shapes has {len(img_shapes)} entries for a batch of {batch}")
    grids: list[Grid] = [(f, h, w) for f, h, w in img_shapes[0]]
    if any([(f, h, w) for f, h, w in item] != grids for item in img_shapes[1:]):
        raise ValueError(f"every batch item needs the same img_shapes; got {list(img_shapes)}")
    if sum(math.prod(grid) for grid in grids) != image_tokens:
        raise ValueError(
            f"img_shapes {grids} make {sum(map(math.prod, grids))} tokens, hidden_states has {image_tokens}"
        )
    return grids


def grid_positions(index: int, grid: Grid, device: torch.device) -> torch.Tensor:
    """[frames*rows*cols, 3] (frame, row, col) of image `index`'s tokens, raster order."""
    frames, rows, cols = grid
    axes = (
        torch.arange(index, index + frames, device=device),
        torch.arange(rows, device=device) - (rows - rows // 2),  # centred: -ceil(rows/2) .. floor(rows/2) - 1
        torch.arange(cols, device=device) - (cols - cols // 2),
    )
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)  # [F, R, C, 3] -> [S, 3]


def position_ids(grids: list[Grid], text_len: int, device: torch.device) -> torch.Tensor:
    """[S_txt + S_img, 3] positions of the joint sequence, text first."""
    start = max(max(rows // 2, cols // 2) for _, rows, cols in grids)
    text = torch.arange(start, start + text_len, device=device)[:, None].expand(-1, 3)  # [S_txt, 3]
    images = [grid_positions(i, grid, device) for i, grid in enumerate(grids)]
    return torch.cat([text, *images])


def rope_table(ids: torch.Tensor, axes_dim: tuple[int, ...], theta: float = 10000.0) -> torch.Tensor:
    """ids: [S, 3] -> [S, sum(axes_dim) / 2, 2] (cos, sin), channel pair (2j, 2j+1) of a head
    rotated by entry j. Angles in float32, as the reference computes them (FLUX's, in
    models/rope.py, are float64): the same rounding, so the same numbers."""
    angles = []
    for axis, dim in enumerate(axes_dim):
        inv_freq = 1.0 / torch.pow(theta, torch.arange(0, dim, 2, dtype=torch.float32, device=ids.device) / dim)
        angles.append(torch.outer(ids[:, axis].float(), inv_freq))  # [S, dim / 2]
    joined = torch.cat(angles, dim=-1)  # [S, D / 2]
    return torch.view_as_real(torch.polar(torch.ones_like(joined), joined)).contiguous()

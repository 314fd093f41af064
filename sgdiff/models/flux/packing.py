"""FLUX folds each 2x2 patch of VAE latents into channels and feeds tokens in raster order."""

from __future__ import annotations

import torch


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)*(W/2), C*4]."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # [B, H/2, W/2, C, 2, 2]
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[B, (H/2)*(W/2), C*4] -> [B, C, H, W] for latent height H and width W."""
    b, _, c4 = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # [B, C, H/2, 2, W/2, 2]
    return patches.reshape(b, c4 // 4, height, width)


def image_position_ids(rows: int, cols: int) -> torch.Tensor:
    """[rows*cols, 3] ids (0, row, col) for the rotary embedding, raster order."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3)


def text_position_ids(length: int) -> torch.Tensor:
    """Text tokens all sit at position (0, 0, 0)."""
    return torch.zeros(length, 3)

"""HunyuanVideo-1.5's input embedders: the latents' patches, the timestep(s), the ByT5 glyph-text features and
the SigLIP image features, each to the model width. Parameter names match diffusers'."""

from __future__ import annotations

import torch
from torch import nn

from sgdiff.models.layers import Linear, MLPEmbedder, timestep_embedding


class PatchEmbed(nn.Module):
    """Conv3d over (frames, rows, columns) patches: [B, C, F, H, W] -> [B, F'*H'*W', D], tokens frame-major."""

    def __init__(self, patch: tuple[int, int, int], in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj(latents).flatten(2).transpose(1, 2).contiguous()  # [B, D, F', H', W'] -> [B, S, D]


class TimeEmbedding(nn.Module):
    """diffusers' HunyuanVideo15TimeEmbedding: timestep [B] (0..1000) -> [B, D]; with meanflow, plus the
    embedding of timestep_r (the step the sample goes to)."""

    def __init__(self, dim: int, use_meanflow: bool):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.timestep_embedder_r = MLPEmbedder(256, dim) if use_meanflow else None

    def forward(self, timestep: torch.Tensor, timestep_r: torch.Tensor | None) -> torch.Tensor:
        """timestep, timestep_r: [B] in the model's dtype (their sinusoids are cast to it, as diffusers' are)."""
        emb = self.timestep_embedder(timestep_embedding(timestep).to(timestep.dtype))
        if timestep_r is not None:
            if self.timestep_embedder_r is None:
                raise ValueError("this HunyuanVideo-1.5 transformer has no meanflow embedding: pass timestep_r=None")
            emb = emb + self.timestep_embedder_r(timestep_embedding(timestep_r).to(timestep.dtype))
        return emb


class ByT5Projection(nn.Module):
    """diffusers' HunyuanVideo15ByT5TextProjection: LayerNorm, then three Linears with (erf) GELUs between."""

    def __init__(self, in_dim: int, dim: int, hidden: int = 2048):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.linear_1 = Linear(in_dim, hidden)
        self.linear_2 = Linear(hidden, hidden)
        self.linear_3 = Linear(hidden, dim)

    def forward(self, glyphs: torch.Tensor) -> torch.Tensor:
        x = nn.functional.gelu(self.linear_1(self.norm(glyphs)))
        return self.linear_3(nn.functional.gelu(self.linear_2(x)))


class ImageProjection(nn.Module):
    """diffusers' HunyuanVideo15ImageProjection: LayerNorm, Linear, (erf) GELU, Linear, LayerNorm."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.norm_in = nn.LayerNorm(in_dim)
        self.linear_1 = Linear(in_dim, in_dim)
        self.linear_2 = Linear(in_dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.norm_out(self.linear_2(nn.functional.gelu(self.linear_1(self.norm_in(image)))))

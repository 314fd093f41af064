"""HunyuanVideo-1.5's text token refiner (diffusers' HunyuanVideo15TokenRefiner, `context_embedder`): the
Qwen2.5-VL hidden states projected to the model width, then a few blocks of self-attention among the text
tokens and a SiLU MLP, gated by a conditioning made of the timestep and the prompt's mean token.

It gets a prompt's valid tokens only (transformer.py's module docstring says why that is diffusers' masked
result): its attention then needs no mask, and the mean is over exactly those tokens. Its blocks are
HunyuanVideo's (the same math and parameter names); its conditioning embeds the timestep and mean token only."""

from __future__ import annotations

import torch
from torch import nn

from sgdiff.models.hunyuan_video.refiner import TokenRefinerStack
from sgdiff.models.layers import Linear, MLPEmbedder, timestep_embedding


class TimeTextEmbedding(nn.Module):
    """diffusers' CombinedTimestepTextProjEmbeddings: timestep [B] and the mean text token [B, C] -> [B, D]."""

    def __init__(self, dim: int, text_dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.text_embedder = MLPEmbedder(text_dim, dim)  # (linear_1, SiLU, linear_2: PixArt's projection)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.timestep_embedder(timestep_embedding(timestep).to(pooled.dtype)) + self.text_embedder(pooled)


class TokenRefiner(nn.Module):
    """Qwen2.5-VL hidden states [B, L, C] (each row's valid tokens only) -> text tokens [B, L, D]."""

    def __init__(self, text_dim: int, heads: int, head_dim: int, layers: int):
        super().__init__()
        dim = heads * head_dim
        self.time_text_embed = TimeTextEmbedding(dim, text_dim)
        self.proj_in = Linear(text_dim, dim)
        self.token_refiner = TokenRefinerStack(dim, heads, layers)

    def forward(self, text: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if text.shape[1] == 0:
            raise ValueError("encoder_hidden_states holds no valid token: a prompt has at least its template's")
        # the mean over the valid tokens, summed in float32 as diffusers' masked mean is: [B, L, C] -> [B, C]
        pooled = (text.float().sum(dim=1) / text.shape[1]).to(text.dtype)
        temb = self.time_text_embed(timestep, pooled)
        return self.token_refiner(self.proj_in(text), temb)

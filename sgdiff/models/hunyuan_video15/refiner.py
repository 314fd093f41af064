"""HunyuanVideo-1.5's text token refiner (diffusers' HunyuanVideo15TokenRefiner, `context_embedder`): the
Qwen2.5-VL hidden states projected to the model width, then a few blocks of self-attention among the text
tokens and a SiLU MLP, gated by a conditioning made of the timestep and the prompt's mean token.

It gets a prompt's valid tokens only (transformer.py's module docstring says why that is diffusers' masked
result): its attention then needs no mask, and the mean is over exactly those tokens."""

from __future__ import annotations

import torch
from torch import nn

from sgdiff.models.attention import attention
from sgdiff.models.layers import Linear, MLPEmbedder, project, timestep_embedding


class RefinerAttention(nn.Module):
    """Self-attention without q/k norms or rotary positions (to_q/to_k/to_v, to_out.0)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = Linear(dim, dim)
        self.to_k = Linear(dim, dim)
        self.to_v = Linear(dim, dim)
        self.to_out = nn.ModuleList([Linear(dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = project(x, self.to_q, self.to_k, self.to_v)  # [B, S, H*D] each
        q, k, v = (t.unflatten(-1, (self.heads, -1)) for t in (q, k, v))  # -> [B, S, H, D]
        return self.to_out[0](attention(q, k, v).flatten(2))  # [B, S, H, D] -> [B, S, H*D]


class SiLUProjection(nn.Module):
    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = Linear(dim, inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(self.proj(x))


class SiLUFeedForward(nn.Module):
    """SiLU MLP stored as `net.0.proj` / `net.2` (diffusers' FeedForward with activation_fn="linear-silu")."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.net = nn.ModuleList([SiLUProjection(dim, inner_dim), nn.Identity(), Linear(inner_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class Gates(nn.Module):
    """SiLU -> Linear(D, 2D): the gates of the attention and of the MLP, [B, 1, D] each (HunyuanVideo15AdaNorm)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = Linear(dim, 2 * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(nn.functional.silu(temb))[:, None].chunk(2, dim=-1)  # [B, 2D] -> 2 x [B, 1, D]


class RefinerBlock(nn.Module):
    """diffusers' HunyuanVideo15IndividualTokenRefinerBlock."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefinerAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ff = SiLUFeedForward(dim, int(dim * mlp_ratio))
        self.norm_out = Gates(dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        gate_attn, gate_mlp = self.norm_out(temb)
        x = x + self.attn(self.norm1(x)) * gate_attn
        return x + self.ff(self.norm2(x)) * gate_mlp


class RefinerBlocks(nn.Module):
    """`token_refiner.refiner_blocks`, as diffusers nests them."""

    def __init__(self, dim: int, heads: int, layers: int):
        super().__init__()
        self.refiner_blocks = nn.ModuleList(RefinerBlock(dim, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in self.refiner_blocks:
            x = block(x, temb)
        return x


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
        self.token_refiner = RefinerBlocks(dim, heads, layers)

    def forward(self, text: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if text.shape[1] == 0:
            raise ValueError("encoder_hidden_states holds no valid token: a prompt has at least its template's")
        # the mean over the valid tokens, summed in float32 as diffusers' masked mean is: [B, L, C] -> [B, C]
        pooled = (text.float().sum(dim=1) / text.shape[1]).to(text.dtype)
        temb = self.time_text_embed(timestep, pooled)
        return self.token_refiner(self.proj_in(text), temb)

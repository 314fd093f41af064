"""HunyuanVideo's text token refiner (diffusers' HunyuanVideoTokenRefiner, the transformer's
`context_embedder`): the Llama hidden states projected to the model width and refined by a few
self-attention blocks of their own, gated by a conditioning vector made from the timestep and the
mean of the text tokens.

Math only; parameter names match diffusers. The text comes cut to its own tokens (no padding, no
mask: see transformer.py's module docstring), so the mean is over every token given, as diffusers'
masked mean is over the valid ones.
"""

from __future__ import annotations

import torch
from torch import nn

from sgdiff.models.attention import attention
from sgdiff.models.flux.transformer import TimeTextEmbedding
from sgdiff.models.layers import Linear, project

REFINER_MLP_RATIO = 4.0  # diffusers builds the refiner with its default ratio, not the config's mlp_ratio


class RefinerAttention(nn.Module):
    """Plain self-attention (to_q/to_k/to_v, to_out.0): no q/k norms, no rotary embedding."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = Linear(dim, dim)
        self.to_k = Linear(dim, dim)
        self.to_v = Linear(dim, dim)
        self.to_out = nn.ModuleList([Linear(dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [B, S, H*D] -> [B, S, H, D] each
        q, k, v = (t.unflatten(-1, (self.heads, -1)) for t in project(x, self.to_q, self.to_k, self.to_v))
        return self.to_out[0](attention(q, k, v).flatten(2).type_as(q))  # [B, S, H, D] -> [B, S, H*D]


class SiLUProjection(nn.Module):
    """proj -> SiLU (diffusers' LinearActivation, the "linear-silu" MLP's first layer)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.proj = Linear(dim, inner_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.silu(self.proj(x))


class SiLUFeedForward(nn.Module):
    """SiLU MLP stored as `net.0.proj` / `net.2`, as diffusers names it."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.net = nn.ModuleList([SiLUProjection(dim, inner_dim), nn.Identity(), Linear(inner_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class RefinerGates(nn.Module):
    """SiLU -> Linear(D, 2D): the gates of a refiner block's attention and MLP (diffusers'
    HunyuanVideoAdaNorm). Not an AdaModulation: it modulates no LayerNorm, and reads the refiner's own
    conditioning, not the transformer's temb."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = Linear(dim, 2 * dim)

    def forward(self, temb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # temb: [B, D] -> 2 x [B, 1, D]
        return self.linear(nn.functional.silu(temb))[:, None, :].chunk(2, dim=-1)


class RefinerBlock(nn.Module):
    """diffusers' HunyuanVideoIndividualTokenRefinerBlock."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefinerAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ff = SiLUFeedForward(dim, int(dim * REFINER_MLP_RATIO))
        self.norm_out = RefinerGates(dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        gate_attn, gate_mlp = self.norm_out(temb)
        x = x + self.attn(self.norm1(x)) * gate_attn
        return x + self.ff(self.norm2(x)) * gate_mlp


class TokenRefinerStack(nn.Module):
    """diffusers' HunyuanVideoIndividualTokenRefiner: the blocks, stored as `refiner_blocks`."""

    def __init__(self, dim: int, heads: int, layers: int):
        super().__init__()
        self.refiner_blocks = nn.ModuleList(RefinerBlock(dim, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        for block in self.refiner_blocks:
            x = block(x, temb)
        return x


class TokenRefiner(nn.Module):
    """Llama hidden states [B, L, C_txt] -> refined text tokens [B, L, D]."""

    def __init__(self, text_dim: int, heads: int, head_dim: int, layers: int):
        super().__init__()
        dim = heads * head_dim
        self.time_text_embed = TimeTextEmbedding(dim, text_dim, guidance_embeds=False)
        self.proj_in = Linear(text_dim, dim)
        self.token_refiner = TokenRefinerStack(dim, heads, layers)

    def forward(self, text: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """text: [B, L, C_txt], every token valid; timestep: [B] in 0..1000."""
        # the mean as diffusers' masked mean rounds it: a float32 sum over the tokens, divided by their count
        pooled = (text.float().sum(dim=1) / text.shape[1]).to(text.dtype)  # [B, C_txt]
        temb = self.time_text_embed(timestep, None, pooled)  # [B, D]
        return self.token_refiner(self.proj_in(text), temb)

"""Building blocks shared by the DiTs. Parameter names follow diffusers so that
checkpoints load as they are (`linear_1`, `net.0.proj`, ...)."""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cosine half first. t: [B] -> [B, dim] (float32)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class MLPEmbedder(nn.Module):
    """linear_1 -> SiLU (or tanh GELU) -> linear_2 (diffusers' TimestepEmbedding and text projections)."""

    def __init__(self, in_dim: int, dim: int, activation: str = "silu"):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear_1(x)
        x = nn.functional.silu(x) if self.activation == "silu" else nn.functional.gelu(x, approximate="tanh")
        return self.linear_2(x)


class GELUProjection(nn.Module):
    def __init__(self, dim: int, inner_dim: int, approximate: str = "tanh"):
        super().__init__()
        self.proj = nn.Linear(dim, inner_dim)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """GELU MLP stored as `net.0.proj` / `net.2`, as diffusers names it (tanh GELU by default)."""

    def __init__(self, dim: int, inner_dim: int | None = None, out_dim: int | None = None, approximate: str = "tanh"):
        super().__init__()
        inner_dim = inner_dim or 4 * dim
        self.net = nn.ModuleList(
            [GELUProjection(dim, inner_dim, approximate), nn.Identity(), nn.Linear(inner_dim, out_dim or dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class AdaModulation(nn.Module):
    """SiLU -> Linear producing `chunks` modulation vectors from the conditioning [B, D]."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # emb: [B, D] -> chunks x [B, 1, D], ready to broadcast over the sequence
        return self.linear(nn.functional.silu(emb))[:, None, :].chunk(self.chunks, dim=-1)


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the last dim without affine parameters."""
    return nn.functional.layer_norm(x, (x.shape[-1],), eps=eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return layer_norm(x) * (1 + scale) + shift


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype, returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return nn.functional.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class FusedProjection:
    """Several Linears over the same input as one GEMM: their weights (and biases) concatenated into
    one matrix, each Linear's own weight re-pointed at its slice (parameter names, and the state dict,
    stay as they were; no extra memory). Made by speed/fuse.py; `project` uses it."""

    def __init__(self, linears: tuple[nn.Linear, ...]):
        if any(linear.bias is None for linear in linears):
            raise ValueError("FusedProjection fuses Linears that all have a bias")
        self.sizes = [linear.out_features for linear in linears]
        self.weight = torch.cat([linear.weight.detach() for linear in linears])  # [sum(out), in]
        self.bias = torch.cat([linear.bias.detach() for linear in linears])  # [sum(out)]
        start = 0
        for linear, size in zip(linears, self.sizes, strict=True):
            linear.weight = nn.Parameter(self.weight[start : start + size], requires_grad=False)
            linear.bias = nn.Parameter(self.bias[start : start + size], requires_grad=False)
            start += size

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return nn.functional.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def project(x: torch.Tensor, *linears: nn.Linear) -> tuple[torch.Tensor, ...]:
    """Each of `linears` applied to x: one GEMM when they were fused (a FusedProjection kept on the
    first of them), else one each."""
    fused = getattr(linears[0], "fused_projection", None)
    if fused is not None and len(fused.sizes) == len(linears):
        return fused(x)
    return tuple(linear(x) for linear in linears)

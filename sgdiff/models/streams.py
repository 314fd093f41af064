"""The streams of a joint attention, handed over before their projections (FLUX: the text and the
image stream of a double-stream block, the one stream of a single-stream block).

A model that describes its attention this way (models/attention.py `joint_attention`) lets an
implementation choose where the q/k/v projections run: one GPU projects its tokens for every head
(`project_streams`, the math the model would write itself); Ulysses-2 may instead move the
streams' inputs and project every rank's tokens for its own heads only (`head_rows`,
parallel/input_exchange.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sgdiff.models.layers import Linear, RMSNorm, project
from sgdiff.models.lora import LowRank
from sgdiff.models.rope import norm_and_rope


@dataclass(frozen=True)
class Stream:
    """One stream: its input [B, S, C] (normalised and modulated), the Linears projecting it to q, k
    and v, and the RMSNorms of q and k (per head, over D, or over all H*D channels)."""

    x: torch.Tensor
    linears: tuple[Linear, Linear, Linear]
    norms: tuple[RMSNorm, RMSNorm]

    def per_head_norms(self, head_dim: int) -> bool:
        return all(norm.normalized_shape[0] == head_dim for norm in self.norms)


def project_streams(streams: list[Stream], rope: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, sum S_i, H, D] of the streams' tokens joined in order: each stream projected
    (one GEMM where its Linears were fused), q and k normed per stream and rotated by rope
    [sum S_i, D/2, 2]."""
    projected = [project(s.x, *s.linears) for s in streams]  # per stream: q, k, v [B, S_i, H*D]
    q = norm_and_rope([(p[0], s.norms[0]) for p, s in zip(projected, streams, strict=True)], rope, heads)
    k = norm_and_rope([(p[1], s.norms[1]) for p, s in zip(projected, streams, strict=True)], rope, heads)
    values = [p[2] for p in projected]
    v = values[0] if len(values) == 1 else torch.cat(values, dim=1)
    return q, k, v.unflatten(-1, (heads, -1))  # [B, S, H*D] -> [B, S, H, D]


def head_rows(linears: tuple[Linear, ...], heads: slice, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of q's, k's and v's weights and biases that make heads `heads`, stacked: one GEMM
    of x [.., C] with them gives [.., 3 * h * D] (q, k, v of those heads). A copy (the rows of
    three Linears are not one block of memory)."""
    rows = slice(heads.start * head_dim, heads.stop * head_dim)
    weight = torch.cat([linear.weight.detach()[rows] for linear in linears])  # [3*h*D, C]
    bias = torch.cat([  # [3*h*D]
        linear.bias.detach()[rows] if linear.bias is not None else linear.weight.new_zeros(rows.stop - rows.start)
        for linear in linears
    ])  # fmt: skip
    return weight, bias


def head_adapters(linears: tuple[Linear, ...], heads: slice, head_dim: int) -> list[tuple[slice, LowRank, slice]]:
    """The unfused LoRA adapters beside q's, k's and v's Linears, for heads `heads`: (the columns of
    head_rows' output they add to, the adapters, their rows of their Linear's output). Views, no copies:
    made each forward, so that the adapters applied and their scales are always the model's own."""
    rows = slice(heads.start * head_dim, heads.stop * head_dim)
    width = rows.stop - rows.start
    return [
        (slice(i * width, (i + 1) * width), linear.lora, rows)
        for i, linear in enumerate(linears)
        if linear.lora is not None
    ]

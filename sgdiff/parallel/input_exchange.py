"""Ulysses-2 with the attention's input on the wire instead of q, k and v.

Ulysses gives each rank its head group of every token. Sending q, k and v, a rank sends each peer
3 * C / U values per token of its own (C = H * D: the peer's heads of q, k and v) and gets back as
many outputs. A model that hands its streams over before their projections (models/streams.py,
`joint_attention`) lets a rank send its tokens' input instead, C values per token, and project
every rank's tokens for its own heads: the same GEMM work (every token's rows times my heads'
columns instead of my tokens' rows times every head's columns). That is C against 3 * C / U values
per token and peer: 2/3 of the bytes at U = 2 (with the outputs' way back, 3/4), as many at U = 3,
more beyond; so only Ulysses-2 does it (SequenceParallelAttention.over_streams).

The projections land where Ulysses' exchange would have put q, k and v: one buffer [B, U*S_loc, 3,
h, D] holding rank r's tokens at rows r*S_loc.. (its streams in order), so the rotary table in rank
order, the padded keys cut out and the outputs' way back are Ulysses' as they were. The input
travels by NCCL's all-gather, or on one host through symmetric memory (symmetric_exchange.py
SymmetricUlysses.input_attention): plain memcpys on a side stream, by the copy engines, while the
compute stream projects the rank's own tokens and runs the work alongside.

Each rank keeps its heads' rows of every stream's q/k/v weights in one matrix (models/streams.py
`head_rows`, made on first use): 3 * h * D * C more values per stream, 2.1 GB per GPU for
FLUX.1-dev in bf16. Unfused LoRA adapters stay beside the Linears: each adds its update of those
rows (`head_adapters`), at the scales of the moment.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sgdiff.models.rope import norm_and_rope
from sgdiff.models.streams import Stream, head_rows


class HeadWeights:
    """Each stream's q/k/v weights cut to one rank's heads, made once per stream (and kept)."""

    def __init__(self):
        self.made: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, stream: Stream, heads: slice, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = stream.linears[0].weight
        key = (*(id(linear) for linear in stream.linears), heads.start, heads.stop, first.data_ptr(), first.dtype)
        if key not in self.made:
            self.made[key] = head_rows(stream.linears, heads, head_dim)
        return self.made[key]


def project_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor) -> None:
    """out = x @ weight.T + bias, written in place: x [B, n, C], out [B, n, N] (rows of a buffer:
    one block of memory when B = 1, then the GEMM writes there directly)."""
    if out.is_contiguous() and x.is_contiguous():
        torch.addmm(bias, x.view(-1, x.shape[-1]), weight.t(), out=out.view(-1, out.shape[-1]))
    else:
        out.copy_(F.linear(x, weight, bias))


def project_rank(
    buffer: torch.Tensor, rank: int, inputs: list[torch.Tensor], weights: list[tuple], adapters: list[list[tuple]]
) -> None:
    """Rank `rank`'s tokens projected for this rank's heads into buffer [B, U*S_loc, 3, h, D], rows
    rank*S_loc on: inputs, its streams' [B, S_i, C] in order, with each stream's (weight, bias) and its
    unfused LoRA adapters (models/streams.py head_adapters; most often none)."""
    start = rank * sum(x.shape[1] for x in inputs)
    for x, (weight, bias), beside in zip(inputs, weights, adapters, strict=True):
        rows = buffer[:, start : start + x.shape[1]].flatten(2)  # [B, S_i, 3, h, D] -> [B, S_i, 3*h*D]
        project_rows(x, weight, bias, rows)
        for columns, lora, lora_rows in beside:
            rows[..., columns] += lora.rows(x, lora_rows)
        start += x.shape[1]


def normed_qkv(buffer: torch.Tensor, streams: list[Stream], rope: torch.Tensor, degree: int) -> tuple:
    """q and k of buffer [B, U*S_loc, 3, h, D] (every rank's tokens, its streams in order) normed by
    their stream's norms and rotated by rope [U*S_loc, D/2, 2]; v a view: each [B, U*S_loc, h, D]."""
    parts: list[list] = []  # [rows, stream] in sequence order; neighbours of one stream as one part
    start = 0
    for _ in range(degree):
        for stream in streams:
            end = start + stream.x.shape[1]
            if parts and parts[-1][1] is stream and parts[-1][0].stop == start:
                parts[-1][0] = slice(parts[-1][0].start, end)
            else:
                parts.append([slice(start, end), stream])
            start = end
    heads = buffer.shape[3]
    q, k = (
        norm_and_rope([(buffer[:, rows, i].flatten(2), stream.norms[i]) for rows, stream in parts], rope, heads)
        for i in (0, 1)
    )  # fmt: skip
    return q, k, buffer[:, :, 2]


def gather_tokens(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every rank's x ([S_loc, ...]) in rank order: [U*S_loc, ...]."""
    out = x.new_empty(dist.get_world_size(group) * x.shape[0], *x.shape[1:])
    # all_gather_single: torch 2.13's name (it deprecates all_gather_into_tensor), absent before
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, x.contiguous(), group=group)
    return out


def gather_inputs(streams: list[Stream], group: dist.ProcessGroup) -> list[list[torch.Tensor]]:
    """Every rank's streams' inputs by NCCL (or gloo): [rank][stream] -> [B, S_i, C]."""
    local = torch.cat([s.x for s in streams], dim=1).transpose(0, 1)  # [S_loc, B, C]
    every = gather_tokens(local, group).transpose(0, 1)  # [B, U*S_loc, C]
    s_loc, out = local.shape[0], []
    for rank in range(dist.get_world_size(group)):
        split = every[:, rank * s_loc : (rank + 1) * s_loc].split([s.x.shape[1] for s in streams], dim=1)
        out.append([part.contiguous() for part in split])
    return out

"""Sequence parallelism applied to a built pipeline's transformers: each family's shard plan
(ModelFamily.shard, in sgdiff/families/) says where its tokens are split and joined, with forward
hooks on its blocks (the model code stays single-GPU math); the pieces plans share live here."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sgdiff.errors import UserError
from sgdiff.models.attention import AttentionImpl, sdpa_attention
from sgdiff.parallel.cache_agreement import AgreedDecisions
from sgdiff.parallel.groups import ParallelGroups
from sgdiff.parallel.sequence import SequenceParallelAttention
from sgdiff.pipeline.family import ModelFamily


class ShardCache:
    """Shards of tensors every block receives whole (the rotary table, per-token modulation),
    made once per forward."""

    def __init__(self):
        self.shards: dict[int, torch.Tensor] = {}

    def get(self, tensor: torch.Tensor, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = id(tensor)
        if key not in self.shards:
            self.shards[key] = make()
        return self.shards[key]


def check_heads(heads: int, ulysses_degree: int, ring_degree: int = 1) -> None:
    """A clear error where Ulysses cannot split the model's heads evenly, naming the Ulysses x ring
    split of the same sequence-parallel ranks that can (a ring splits the sequence, not the heads)."""
    if heads % ulysses_degree:
        ranks = ulysses_degree * ring_degree
        fits = max(u for u in range(1, ranks + 1) if ranks % u == 0 and heads % u == 0)
        instead = f"`ring_degree` {ranks}" if fits == 1 else f"`ulysses_degree` {fits} `ring_degree` {ranks // fits}"
        raise UserError(
            f"`ulysses_degree` {ulysses_degree} must divide the model's {heads} attention heads; "
            f"for {ranks} sequence-parallel ranks pass {instead} (ring attention splits the sequence, not the heads)",
            field="ulysses_degree",
        )


def apply_sequence_parallel(
    models: list[nn.Module],
    family: ModelFamily,
    groups: ParallelGroups,
    inner: AttentionImpl = sdpa_attention,
    exchange: str = "auto",
) -> SequenceParallelAttention:
    """Shard every transformer of a pipeline by its family's plan; returns the attention implementation
    to install (it runs `inner`, the single-GPU kernel, on what each rank holds; `exchange`:
    SequenceParallelAttention's)."""
    attn = SequenceParallelAttention(groups, inner, exchange)
    for model in models:
        family.shard(model, attn, groups)
        attn.hooks.append(AgreedDecisions(model, groups.sp_group))  # --cache: every rank skips the same steps
    return attn

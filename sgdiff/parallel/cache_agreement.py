"""A step cache (speed/step_cache/) on sequence-parallel ranks: each rank holds a shard of the tokens, so
the change that decides a skip is summed over the sequence-parallel group, and every rank of it skips the
same steps (CFG parallel needs nothing: each CFG rank runs its own branch, with its own cache)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sgdiff.speed.step_cache import step_cache_of


class AgreedDecisions:
    """Sums the cache's signal change over `group` until removed (one of SequenceParallelAttention.hooks).
    Tokens that only pad a shard (parallel/sequence.py) count too: where a segment does not divide evenly
    over the ranks the sums differ slightly from one process's."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup):
        self.cache = step_cache_of(model)
        if self.cache is not None:
            self.cache.agree = self.agree
        self.group = group

    def agree(self, sums: torch.Tensor) -> torch.Tensor:
        sums = sums.clone()
        dist.all_reduce(sums, group=self.group)  # [2] float32: a few bytes, once per forward
        return sums

    def remove(self) -> None:
        if self.cache is not None:
            self.cache.agree = lambda sums: sums

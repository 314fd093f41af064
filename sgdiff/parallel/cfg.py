"""CFG parallel: the prompt branch runs on the ranks of CFG rank 0, the negative branch on those of
CFG rank 1; each step's two velocities are exchanged so every rank combines the same pair."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from sgdiff.parallel.groups import ParallelGroups
from sgdiff.pipeline.base import ComposedPipeline, ParallelMode


class CfgParallelBranches:
    """A BranchRunner for DenoisingStage over the two ranks of a CFG group."""

    def __init__(self, groups: ParallelGroups):
        self.groups = groups

    def __call__(
        self, run_cond: Callable[[], torch.Tensor], run_uncond: Callable[[], torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mine = (run_cond if self.groups.cfg_rank == 0 else run_uncond)().contiguous()
        both = [torch.empty_like(mine), torch.empty_like(mine)]
        dist.all_gather(both, mine, group=self.groups.cfg_group)  # group rank = CFG rank
        return both[0], both[1]


def apply_cfg_parallel(pipeline: ComposedPipeline, groups: ParallelGroups) -> None:
    """Every stage that declares CFG_SPLIT runs its branches on the two CFG ranks."""
    for stage in pipeline.stages:
        if stage.parallel is ParallelMode.CFG_SPLIT:
            stage.branches = CfgParallelBranches(groups)  # type: ignore[attr-defined]  # a CFG_SPLIT stage has it

"""Process groups of one parallel run. Rank layout (outermost first): cfg, ring, ulysses —
rank = (cfg_rank * ring_degree + ring_rank) * ulysses_degree + ulysses_rank, so a Ulysses group is
contiguous ranks (on one host, the fastest links) and a sequence-parallel group is cfg-major."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from sgdiff.config import ParallelConfig


@dataclass(frozen=True)
class ParallelGroups:
    rank: int
    world_size: int
    config: ParallelConfig  # resolved
    cfg_group: dist.ProcessGroup  # the ranks holding the same sequence shard, one per CFG branch
    sp_group: dist.ProcessGroup  # the ranks splitting one branch's sequence (ring x ulysses)
    ulysses_group: dist.ProcessGroup
    ring_group: dist.ProcessGroup
    ring_ranks: tuple[int, ...]  # global ranks of this rank's ring group, in ring order

    @property
    def ulysses_degree(self) -> int:
        assert self.config.ulysses_degree is not None  # set in a resolved config
        return self.config.ulysses_degree

    @property
    def ring_degree(self) -> int:
        assert self.config.ring_degree is not None  # set in a resolved config
        return self.config.ring_degree

    @property
    def cfg_rank(self) -> int:
        return self.rank // (self.ring_degree * self.ulysses_degree)

    @property
    def sp_rank(self) -> int:
        return self.rank % (self.ring_degree * self.ulysses_degree)

    @property
    def ring_rank(self) -> int:
        return self.sp_rank // self.ulysses_degree

    @property
    def ulysses_rank(self) -> int:
        return self.sp_rank % self.ulysses_degree

    @property
    def sp_degree(self) -> int:
        return self.ring_degree * self.ulysses_degree


def build_groups(config: ParallelConfig) -> ParallelGroups:
    """Every rank creates every group, in the same order (torch.distributed requires it)."""
    config = config.resolved()
    rank, world = dist.get_rank(), dist.get_world_size()
    if world != config.num_gpus:
        raise RuntimeError(f"the process group has {world} ranks, the parallel config wants {config.num_gpus}")
    u, r, c = config.ulysses_degree, config.ring_degree, config.cfg_degree
    assert u is not None and r is not None  # set in a resolved config
    layout = [[[(ci * r + ri) * u + ui for ui in range(u)] for ri in range(r)] for ci in range(c)]
    mine: dict[str, dist.ProcessGroup] = {}  # every rank is in one group of each kind
    ring_ranks: tuple[int, ...] = ()

    def group(name: str, ranks: list[int]) -> None:
        handle = dist.new_group(ranks)
        if rank in ranks:
            mine[name] = handle

    for ci in range(c):
        group("sp", [x for ring in layout[ci] for x in ring])
        for ri in range(r):
            group("ulysses", layout[ci][ri])
        for ui in range(u):
            ranks = [layout[ci][ri][ui] for ri in range(r)]
            group("ring", ranks)
            if rank in ranks:
                ring_ranks = tuple(ranks)
    for ri in range(r):
        for ui in range(u):
            group("cfg", [layout[ci][ri][ui] for ci in range(c)])
    return ParallelGroups(rank, world, config, mine["cfg"], mine["sp"], mine["ulysses"], mine["ring"], ring_ranks)

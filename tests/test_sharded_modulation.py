"""FLUX's adaLN modulation Linears split over the sequence-parallel ranks (parallel/modulation.py):
each rank computes its own range of their rows, the ranks' ranges cover every row once, the
original Linears do not run, the output is the one process's, and `remove()` restores the model."""

from __future__ import annotations

import pytest

from sgdiff.config import ParallelConfig
from sgdiff.testing.distributed import run_on_ranks, sharded_flux_modulation


@pytest.mark.parametrize(
    ("config", "batch"),
    [
        (ParallelConfig(2), 1),
        (ParallelConfig(2), 2),
        pytest.param(ParallelConfig(3, ring_degree=3), 1, marks=pytest.mark.slow),
    ],
    ids=["ulysses-2", "ulysses-2-batch-2", "ring-3"],
)
def test_each_rank_computes_its_share_of_the_modulation(config, batch):
    ranks = run_on_ranks(config, sharded_flux_modulation, batch)
    sizes = ranks[0]["sizes"]
    total, degree = sum(sizes), len(ranks)
    share = -(-total // degree)  # rows per rank; the last rank's may be fewer
    covered = [0] * total
    for rank, result in enumerate(ranks):
        assert result["sharded"] <= 1e-5, f"rank {rank}: max abs diff {result['sharded']} from one process"
        assert result["after_remove"] == 0.0, f"rank {rank}: remove() left the model changed"
        assert result["original_calls"] == 0, f"rank {rank}: the whole modulation Linears still ran"
        computed = sum(end - first for _, first, end in result["rows"])
        assert computed == min(share, total - rank * share), f"rank {rank} computed {computed} rows, not 1/{degree}"
        for index, first, end in result["rows"]:
            for row in range(sum(sizes[:index]) + first, sum(sizes[:index]) + end):
                covered[row] += 1
    assert covered == [1] * total, "every modulation row is computed by exactly one rank"

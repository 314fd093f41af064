"""Ring attention's key/value blocks through symmetric memory, for the ring ranks of one host (CUDA).

Over NCCL a ring passes the blocks one step at a time (send to the next rank, receive from the
previous one), and NCCL moves them with kernels that take SMs from the attention beside them. On one
host every rank can write into every other's memory: here each rank copies its block (k and v, one
contiguous tensor) into its slot of every other ring rank's inbox at once, as plain peer-to-peer
memcpys that the copy engines carry without SMs, on a side stream, while the compute stream attends
the rank's own block. A barrier (symmetric_exchange.SignalBarrier) says every block has arrived; the
other blocks' attentions follow in the ring's order (so the merge adds the partials in the same
order as over NCCL). A second barrier, after those attentions, says every rank has read its inbox,
so the next attention's copies may overwrite it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

from sgdiff.parallel.symmetric_exchange import SymmetricBuffers, post_to_peers

Partial = TypeVar("Partial")


def ring_sources(rank: int, degree: int) -> list[int]:
    """The ring ranks whose blocks `rank` attends, in the order a ring passes them: its own, then
    rank - 1, rank - 2, ... (the merge adds the partials in this order, over NCCL or not)."""
    return [(rank - step) % degree for step in range(degree)]


class SymmetricRing(SymmetricBuffers):
    """The K/V blocks of one ring group, in symmetric memory."""

    def over_blocks(self, kv: torch.Tensor, attend: Callable[[int, torch.Tensor], Partial]) -> list[Partial]:
        """kv: my block, [2, B, S_blk, h, D] (k and v stacked). Returns attend(source, that ring rank's
        block) for every ring rank, mine first, then the others in the order a ring would pass them
        (ring rank - 1, - 2, ...). Mine is attended while the blocks travel."""
        inboxes = self.boxes((self.degree, *kv.shape), kv)  # each [R (source), 2, B, S_blk, h, D]
        compute, side = torch.cuda.current_stream(), self.side
        side.wait_stream(compute)  # kv is ready
        with torch.cuda.stream(side):
            post_to_peers([kv], inboxes, self.rank)  # one contiguous block: a memcpy to each peer
            self.barrier()  # every block is in every inbox
            arrived = side.record_event()
        mine, *others = ring_sources(self.rank, self.degree)
        partials = [attend(mine, kv)]
        # (kv was made on the compute stream, which now waits for the side stream's last read of it)
        compute.wait_event(arrived)
        partials += [attend(source, inboxes[self.rank][source]) for source in others]
        self.barrier()  # every rank has read its inbox: the next copies may overwrite it
        return partials

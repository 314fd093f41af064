"""A barrier between the GPUs of one host on their streams, through symmetric memory's signal pads
(imported only when it runs: Triton is a GPU package). Used by parallel/symmetric_exchange.py."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def signal_barrier_kernel(pad_table, count_ptr, rank, WORLD: tl.constexpr):
    # arrival number n (kept on the GPU, so a replayed CUDA graph counts on): store n in slot `rank`
    # of every peer's pad, then wait until every peer has stored n (or more) in its slot of mine.
    # Counts only grow, so no slot needs resetting (a flag protocol must reset them, and a missed or
    # stale flag hangs or passes a barrier early). (Each thread of the one warp runs these scalar ops;
    # repeating an idempotent store or a read is harmless.)
    n = tl.load(count_ptr) + 1
    own = tl.load(pad_table + rank).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        if peer != rank:
            theirs = tl.load(pad_table + peer).to(tl.pointer_type(tl.int32))
            tl.atomic_xchg(theirs + rank, n, sem="release", scope="sys")
    for peer in tl.static_range(WORLD):
        if peer != rank:
            seen = tl.atomic_add(own + peer, 0, sem="acquire", scope="sys")
            while seen < n:
                seen = tl.atomic_add(own + peer, 0, sem="acquire", scope="sys")
    tl.store(count_ptr, n)


def signal_barrier(pad_table: torch.Tensor, count: torch.Tensor, rank: int) -> None:
    """pad_table: int64 [world], every rank's signal pad address; count: int32 [1], this rank's arrivals."""
    signal_barrier_kernel[(1,)](pad_table, count, rank, WORLD=pad_table.numel(), num_warps=1)

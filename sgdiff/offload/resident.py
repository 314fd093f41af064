"""Which of `cpu_offload` layers' streamed blocks stay on the compute device while a stage runs them
(`offload_resident_blocks`), so that only the rest cross the bus at every forward.

Streaming every block costs a step about (the blocks' bytes / the host-to-device rate) where the blocks
compute faster than they copy: FLUX.1-dev's 22 GiB of blocks at 55 GB/s is 0.43 s a step against 0.13 s
on the GPU (docs/benchmarks.md). A GPU with room for part of them need not stream that part. A count keeps
that many blocks, spread evenly over the order they run in (so that the copies of the streamed ones overlap
the resident ones' compute), from the stage's first block on. `auto` lets the first whole forward of the
stage run streamed, on an allocator whose cache was emptied when the stage began: its reserve then covers
that forward at its fullest (its activations, the ring, the weights that stay on the device); the blocks
kept are as many as fit in what the process may hold beyond that (`gpu_memory_limit`, else the device's
free memory), less a margin for the allocator's fragments. They go back to streaming when the stage ends
(streaming.py release), which gives their memory to the VAE's decode and the next stage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

MARGIN_BYTES = 2**29  # beside the margin's share: room for the allocator's rounding and fragments
MARGIN_SHARE = 0.05  # of what the process may hold


@dataclass(frozen=True)
class ResidentBlocks:
    count: int | None  # blocks to keep; None: auto
    limit: int | None  # what this process may allocate on the device (gpu_memory_limit); None: all it can

    def stage_started(self, device: torch.device) -> None:
        """At the stage's first block: `auto` empties the allocator's cache (the text encoders' loans, the last
        request's activations), so that its reserve after one forward measures that forward."""
        if self.count is None and device.type == "cuda":
            torch.cuda.empty_cache()

    def room(self, device: torch.device) -> int:
        """Bytes the kept blocks may take now, after one whole forward (CUDA; 0 elsewhere: the CPU computes
        where the blocks live, nothing to save)."""
        if device.type != "cuda":
            return 0
        reserved = torch.cuda.memory_reserved(device)
        free, _ = torch.cuda.mem_get_info(device)
        allowed = free + reserved if self.limit is None else min(self.limit, free + reserved)
        return int(allowed - reserved - MARGIN_BYTES - MARGIN_SHARE * allowed)

    def choose(self, candidates: Sequence[int], sizes: Sequence[int], device: torch.device) -> list[int]:
        """The blocks to keep among `candidates` (indices in the order they run; `sizes[i]`: block i's bytes)."""
        if self.count is not None:
            return spread(candidates, min(self.count, len(candidates)))
        room = self.room(device)
        for count in range(len(candidates), 0, -1):
            chosen = spread(candidates, count)
            if sum(sizes[index] for index in chosen) <= room:
                return chosen
        return []


def spread(candidates: Sequence[int], count: int) -> list[int]:
    """`count` of `candidates`, evenly spaced (each the middle one of its share)."""
    n = len(candidates)
    return [candidates[(2 * i + 1) * n // (2 * count)] for i in range(count)]

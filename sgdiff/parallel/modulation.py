"""A transformer's adaLN modulation Linears split over the sequence-parallel ranks.

Each FLUX.1 block turns the conditioning vector temb [B, D] into its shifts, scales and gates with
a Linear of its own (models/layers.py AdaModulation: 6D outputs per double-stream block and stream,
3D per single-stream block, 2D for the output norm). In FLUX.1-dev these Linears hold 3.2 of the
12 billion weights: 6.5 GB read every step for ~1 M outputs, ~2 ms of an H100's memory bandwidth,
and every sequence-parallel rank spent them on the same vectors (every sp rank holds the same temb).

Here the outputs of all of a model's modulation Linears, laid end to end, are cut into one range per
sp rank. Right after temb is made, each rank computes its range (row blocks of the Linears' weights:
views, no copies; FP8 weights through their scaled matmul), and one all-gather gives every rank all
of them, end to end in one buffer. Each AdaModulation's Linear is stood in for by GatheredRows, which
returns its slice of that buffer. Each rank reads 1/N of the weights; every output is computed once,
by one rank, from the same temb. Unfused LoRA adapters (models/lora.py) stay on the Linears and add
their updates of the rank's rows, at the scales of the moment (a server switches them per request).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sgdiff.models.fp8 import fp8_linear
from sgdiff.models.layers import AdaModulation, Linear


def fp8_rows(linear: Linear, first: int, end: int, e: torch.Tensor) -> torch.Tensor:
    """Rows first..end of a Linear with FP8 weights (models/layers.py Linear.to_fp8) for e [B, D]: [B, rows].
    Computed over the rows widened to multiples of 16 (torch._scaled_mm's; an FP8 Linear's out_features
    is one), then cut: a rank's range may start or end anywhere."""
    low, high = first // 16 * 16, min(-(-end // 16) * 16, linear.out_features)
    bias = linear.bias[low:high] if linear.bias is not None else None
    out = fp8_linear(e, linear.weight[low:high], linear.weight_scale[low:high], bias)  # [B, high - low]
    return out[:, first - low : end - low]


class GatheredRows(nn.Module):
    """Stands in for a modulation Linear: returns the output ShardedModulation gathered for it this
    forward, [B, out_features] (a slice of the gathered buffer)."""

    value: torch.Tensor  # a buffer

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.register_buffer("value", torch.empty(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value


class ShardedModulation:
    """Every AdaModulation of `model` computed 1/degree per sp rank after `conditioning` (the module
    whose output is the temb they all read) and all-gathered. `remove()` puts the Linears back."""

    def __init__(self, model: nn.Module, conditioning: nn.Module, group: dist.ProcessGroup, rank: int, degree: int):
        self.group, self.degree = group, degree
        self.owners = [m for m in model.modules() if isinstance(m, AdaModulation)]
        self.linears = [m.linear for m in self.owners]
        sizes = [linear.out_features for linear in self.linears]
        self.starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self.share = -(-sum(sizes) // degree)  # outputs per rank (the last rank's range may be shorter)
        mine = range(rank * self.share, min((rank + 1) * self.share, sum(sizes)))
        # (linear, its first row, its end row) for each part of my range, in order
        self.pieces = [
            (linear, max(mine.start - start, 0), min(mine.stop - start, size))
            for linear, start, size in zip(self.linears, self.starts, sizes, strict=True)
            if start < mine.stop and start + size > mine.start
        ]
        self.stand_ins = [GatheredRows(size) for size in sizes]
        for owner, stand_in in zip(self.owners, self.stand_ins, strict=True):
            owner.linear = stand_in  # type: ignore[assignment]  # a stand-in for the Linear (its out_features too)
        self.hook = conditioning.register_forward_hook(self.after_conditioning)

    def after_conditioning(self, module: nn.Module, args, temb: torch.Tensor) -> None:
        """temb [B, D] -> every modulation Linear's output, handed to its stand-in."""
        e = F.silu(temb)
        b = e.shape[0]
        send = e.new_empty(self.share, b)  # my range of the outputs: [share, B]
        row = 0
        for linear, first, end in self.pieces:
            mine = send[row : row + end - first]  # [rows, B]
            if linear.fp8:  # FP8 weights (--dit-precision fp8)
                mine.copy_(fp8_rows(linear, first, end, e).t())
            else:
                bias = linear.bias[first:end, None] if linear.bias is not None else e.new_zeros(end - first, 1)
                # [rows, D] @ [D, B] -> [rows, B]: my rows of this Linear for every batch item
                torch.addmm(bias, linear.weight[first:end], e.t(), out=mine)
            if linear.lora is not None:  # unfused LoRA adapters: their updates of my rows, at this request's scales
                mine += linear.lora.rows(e, slice(first, end)).t()
            row += end - first
        every = e.new_empty(self.degree * self.share, b)  # [N * share, B]: all outputs, in order
        getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(every, send, group=self.group)
        table = every.view(1, -1) if b == 1 else every.t().contiguous()  # [B, N * share]
        for stand_in, start in zip(self.stand_ins, self.starts, strict=True):
            stand_in.value = table[:, start : start + stand_in.out_features]

    def remove(self) -> None:
        self.hook.remove()
        for owner, linear in zip(self.owners, self.linears, strict=True):
            owner.linear = linear

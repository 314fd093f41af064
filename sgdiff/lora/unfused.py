"""Adapters kept beside the Linears (unfused): each targeted Linear computes its low-rank updates too
(models/lora.py LowRank), which costs a little per step and lets a server switch adapters between
requests at once.

Every adapter of one apply_loras sits beside its Linears from then on, stacked along the rank; switching
(set_scales) only writes each rank's scale (0: that adapter off) into tensors that already exist. No
shape changes and no module is swapped, so torch.compile does not compile again, and a CUDA graph
captured before replays the new scales. The cost: every adapter applied runs at every step, also at scale
0; so apply the set a server offers, not every adapter there is. Adding or dropping an adapter from the
set is a new apply_loras (a new shape: compiled code compiles once more).

The factors are stored in the dtype the Linear computes in (its weight's; with FP8 weights, its bias's),
on its device. A fused projection (speed/fuse.py) adds each Linear's updates to its slice of the group's
output (models/layers.py `project`); a Linear whose GELU ran in its GEMM's epilogue runs it after the
updates instead."""

from __future__ import annotations

import torch

from sgdiff.lora.match import Update, by_linear
from sgdiff.models.layers import Linear
from sgdiff.models.lora import LowRank


class UnfusedLoras:
    mode = "unfused"

    def __init__(self, adapters: list[list[Update]], scales: list[float]):
        self.by_linear = by_linear(adapters)  # Linear -> (adapter index, its update)
        for linear, pairs in self.by_linear.items():
            dtype, device = compute_dtype(linear), linear.weight.device
            down = torch.cat([update.down for _, update in pairs]).to(device, dtype)  # [R, in]
            up = torch.cat([update.up for _, update in pairs], dim=1).to(device, dtype)  # [out, R]
            linear.lora = LowRank(down, up, rank_scales(pairs, scales).to(device, dtype))

    def set_scales(self, scales: list[float]) -> None:
        for linear, pairs in self.by_linear.items():
            lora = linear.lora
            assert lora is not None  # (set in __init__, until remove)
            lora.scale.copy_(rank_scales(pairs, scales))

    def remove(self) -> None:
        for linear in self.by_linear:
            linear.lora = None


def rank_scales(updates: list[tuple[int, Update]], scales: list[float]) -> torch.Tensor:
    """[R] float32: each rank's adapter scale * alpha / rank, the updates' ranks in order."""
    return torch.cat([
        torch.full((update.down.shape[0],), scales[index] * update.factor, dtype=torch.float32)
        for index, update in updates
    ])  # fmt: skip


def compute_dtype(linear: Linear) -> torch.dtype:
    """The dtype of the Linear's output: its weight's, or with FP8 weights its bias's (bf16 without one)."""
    if not linear.fp8:
        return linear.weight.dtype
    return linear.bias.dtype if linear.bias is not None else torch.bfloat16

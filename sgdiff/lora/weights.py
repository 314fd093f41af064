"""A LoRA adapter as sgdiff holds it after reading, whatever names its file used (lora/keys.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraLayer:
    """One low-rank update, of the weights of `targets` stacked by rows (one Linear mostly; the original
    trainers' joint q/k/v projection covers three): delta W = (alpha / rank) * up @ down."""

    targets: tuple[str, ...]  # module names as sgdiff (and diffusers) name them, in their rows' order
    down: torch.Tensor  # A [rank, in]
    up: torch.Tensor  # B [sum of the targets' out, rank]
    alpha: float | None  # None: the rank (a factor of 1)
    key: str  # the file's name of it, for messages

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def factor(self) -> float:
        """alpha / rank: what the update is multiplied by, before the adapter's own scale."""
        return 1.0 if self.alpha is None else self.alpha / self.rank


@dataclass(frozen=True)
class LoraWeights:
    """Every update of one adapter file, as read (read_lora); `name` says which file, in messages."""

    name: str
    layers: tuple[LoraLayer, ...]

"""A LoRA adapter as sgdiff holds it after reading, whatever names its file used (lora/keys.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Reading:
    """One way to read a file's module name: the layers of ours it updates, stacked by rows (one Linear mostly; the
    original trainers' joint q/k/v projection covers three), and its up factor for them."""

    targets: tuple[str, ...]  # module names as sgdiff (and diffusers) name them, in their rows' order
    up: torch.Tensor  # B [sum of the targets' out, rank]
    alpha: float | None  # None: the rank (a factor of 1)

    @property
    def factor(self) -> float:
        """alpha / rank: what the update is multiplied by, before the adapter's own scale."""
        return 1.0 if self.alpha is None else self.alpha / self.up.shape[1]


@dataclass(frozen=True)
class LoraLayer:
    """One low-rank update: delta W = (alpha / rank) * up @ down of the layers of its reading that the model has.

    Most names can be read one way only. A few mean different layers in different families: FLUX.1's original
    `img_in` is its `x_embedder`, Qwen-Image's `img_in` is its own; kohya's `transformer_blocks_0_attn_to_q` is
    a diffusers name with its dots spelled as underscores. The readings are kept, most likely first, and the
    model they meet (lora/match.py) picks."""

    key: str  # the file's name of it, for messages
    down: torch.Tensor  # A [rank, in]
    readings: tuple[Reading, ...]  # never empty

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def targets(self) -> tuple[str, ...]:
        """The layers of its first reading: what it updates, as far as can be told before it meets a model."""
        return self.readings[0].targets


@dataclass(frozen=True)
class LoraWeights:
    """Every update of one adapter file, as read (read_lora); `name` says which file, in messages."""

    name: str
    layers: tuple[LoraLayer, ...]

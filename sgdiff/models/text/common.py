"""What the text encoders share: transformers' activations by name, an uninitialised embedding, the output."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sgdiff.errors import UserError


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """transformers' "gelu_new": the tanh approximation, written out as it does."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


# transformers' ACT2FN names -> the function
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def embedding(count: int, dim: int) -> nn.Embedding:
    """An nn.Embedding left uninitialised (its weights always come from a checkpoint): initialising one on the
    meta device runs normal_'s reference implementation, which imports torch._dynamo (~0.4 s of start-up)."""
    return nn.Embedding(count, dim, _weight=torch.empty(count, dim))


class TextEncoding(NamedTuple):
    """What transformers' text models return that the pipelines read (`output[0]` is the last hidden state)."""

    last_hidden_state: torch.Tensor  # [B, S, D]
    pooler_output: torch.Tensor | None = None  # [B, D] (CLIP)


def refuse_activation(source: str, name: str, value: str) -> None:
    if value not in ACTIVATIONS:
        raise UserError(f"{source}: {name} '{value}' is not supported (sgdiff runs {', '.join(ACTIVATIONS)})")

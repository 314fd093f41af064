"""The context's valid tokens: a batch's rows grouped by how many valid tokens their masks leave, and each
row cut to them (transformer.py's module docstring says why that is diffusers' masked result)."""

from __future__ import annotations

from typing import overload

import torch


def row_groups(batch: int, *masks: torch.Tensor | None) -> list[tuple[list[int], tuple[int | None, ...]]]:
    """The batch's rows grouped by their valid token counts under `masks` ([B, L] each, or None: all valid),
    in order of first row: (rows, a count per mask, None where the mask is None). Reads the counts on the
    host only where a mask is given."""
    counts = [[None] * batch if mask is None else mask.bool().sum(-1).tolist() for mask in masks]
    groups: dict[tuple[int | None, ...], list[int]] = {}
    for row, key in enumerate(zip(*counts, strict=True)):
        groups.setdefault(key, []).append(row)
    return [(rows, key) for key, rows in groups.items()]


@overload
def take(x: torch.Tensor, rows: list[int] | None) -> torch.Tensor: ...
@overload
def take(x: torch.Tensor | None, rows: list[int] | None) -> torch.Tensor | None: ...
def take(x: torch.Tensor | None, rows: list[int] | None) -> torch.Tensor | None:
    """The rows `rows` of x (None: x itself, uncopied)."""
    return x if x is None or rows is None else x[rows]


@overload
def valid_tokens(x: torch.Tensor, mask: torch.Tensor | None, count: int | None) -> torch.Tensor: ...
@overload
def valid_tokens(x: torch.Tensor | None, mask: torch.Tensor | None, count: int | None) -> torch.Tensor | None: ...
def valid_tokens(x: torch.Tensor | None, mask: torch.Tensor | None, count: int | None) -> torch.Tensor | None:
    """x [B, L, C] -> [B, count, C]: each row cut to its valid tokens under mask [B, L] (None: x as it is),
    in order; every row has `count` of them (row_groups)."""
    if x is None or mask is None or count is None:
        return x
    return x[mask.bool()].view(x.shape[0], count, x.shape[-1])  # [B*count, C] -> [B, count, C]


def check_mask(tokens: torch.Tensor, mask: torch.Tensor | None, name: str) -> None:
    if mask is not None and mask.shape != tokens.shape[:2]:
        raise ValueError(f"{name} has shape {list(mask.shape)}, its tokens {list(tokens.shape[:2])}: [B, L] each")

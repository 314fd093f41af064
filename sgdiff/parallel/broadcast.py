"""Send what a rank-0-only stage computed (State fields: tensors, dicts of tensors, numbers) to every
rank, so the others need not hold the models that computed it."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from sgdiff.pipeline.base import State


def describe(value: Any) -> Any:
    """What a receiver needs to allocate `value`: shapes and dtypes instead of tensors."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return ("dict", {key: describe(item) for key, item in value.items()})
    return ("value", value)


def tensors_of(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors_of(item)]
    return []


def allocate(description: Any, device: torch.device) -> Any:
    kind, *rest = description
    if kind == "tensor":
        shape, dtype = rest
        return torch.empty(shape, dtype=dtype, device=device)
    if kind == "dict":
        return {key: allocate(item, device) for key, item in rest[0].items()}
    return rest[0]


def share_from_rank0(state: State, fields: tuple[str, ...], rank: int) -> None:
    """Rank 0's values of `fields` replace every other rank's (one object broadcast, then one per tensor)."""
    values: dict[str, Any] = {name: getattr(state, name) for name in fields} if rank == 0 else {}
    descriptions: list[Any] = [{name: describe(value) for name, value in values.items()} if rank == 0 else None]
    dist.broadcast_object_list(descriptions, src=0)
    if rank != 0:
        values = {name: allocate(description, state.device) for name, description in descriptions[0].items()}
    for tensor in tensors_of(values):
        dist.broadcast(tensor.contiguous() if rank == 0 else tensor, src=0)
    for name, value in values.items():
        setattr(state, name, value)

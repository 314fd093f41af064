"""An adapter's layers met with a built model's Linears: every update must name a Linear of the model and
fit its shape, or the adapter is refused in one line that names the first mismatches (an adapter of
another model, or of another size of this one, fits no layer)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sgdiff.errors import UserError
from sgdiff.lora.weights import LoraLayer, LoraWeights
from sgdiff.models.layers import Linear

SHOWN_MISMATCHES = 3


@dataclass(frozen=True)
class Update:
    """One adapter's update of one Linear: delta W = factor * up @ down (before the adapter's scale)."""

    name: str  # the Linear's name in the model
    linear: Linear
    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    factor: float  # alpha / rank


def by_linear(adapters: list[list[Update]]) -> dict[Linear, list[tuple[int, Update]]]:
    """Each Linear that some adapter updates -> (that adapter's index, its update), in adapter order."""
    grouped: dict[Linear, list[tuple[int, Update]]] = {}
    for index, updates in enumerate(adapters):
        for update in updates:
            grouped.setdefault(update.linear, []).append((index, update))
    return grouped


def match_lora(model: nn.Module, weights: LoraWeights) -> list[Update]:
    """Every update of `weights` on its Linear of `model`; a UserError if any does not fit."""
    modules = dict(model.named_modules())
    updates: list[Update] = []
    mismatches: list[str] = []
    for layer in weights.layers:
        found = layer_updates(layer, modules)
        if isinstance(found, str):
            mismatches.append(found)
        else:
            updates += found
    if mismatches:
        raise UserError(mismatch_message(weights, type(model).__name__, mismatches, fitted=len(updates) > 0),
                        field="lora_path")  # fmt: skip
    return updates


def layer_updates(layer: LoraLayer, modules: dict[str, nn.Module]) -> list[Update] | str:
    """The layer's update of each of its targets (the up rows split among them, in order), or what keeps
    it from fitting."""
    linears = []
    for target in layer.targets:
        module = modules.get(target)
        if not isinstance(module, Linear):
            return f"{target} is not a {'Linear' if module is not None else 'layer'} of it"
        linears.append(module)
    outs, width = [linear.out_features for linear in linears], linears[0].in_features
    adapter_shape = [layer.up.shape[0], layer.down.shape[1]]
    if adapter_shape != [sum(outs), width] or any(linear.in_features != width for linear in linears):
        return f"{' + '.join(layer.targets)} expects [{sum(outs)}, {width}], the adapter has {adapter_shape}"
    ups = layer.up.split(outs)  # [sum(out), rank] -> each target's rows
    return [
        Update(target, linear, layer.down, up, layer.factor)
        for target, linear, up in zip(layer.targets, linears, ups, strict=True)
    ]


def mismatch_message(weights: LoraWeights, model_name: str, mismatches: list[str], fitted: bool) -> str:
    shown = "; ".join(mismatches[:SHOWN_MISMATCHES])
    more = f" (and {len(mismatches) - SHOWN_MISMATCHES} more)" if len(mismatches) > SHOWN_MISMATCHES else ""
    if not fitted:
        return f"the LoRA file {weights.name} fits no layer of this {model_name}: {shown}{more}"
    return (
        f"the LoRA file {weights.name} does not fit this {model_name} ({len(mismatches)} of its "
        f"{len(weights.layers)} layers do not): {shown}{more}"
    )

"""An adapter's layers met with a built model's Linears: every update must name a Linear of the model and
fit its shape, or the adapter is refused in one line that names the first mismatches (an adapter of
another model, or of another size of this one, fits no layer).

A layer read several ways (weights.py LoraLayer) takes the first reading whose layers are all Linears of the
model. A name is the model's as written, or kohya-spelled (its dots as underscores): Qwen-Image's trainers write
`lora_unet_transformer_blocks_0_attn_to_q`, and no rule could tell which underscores were dots (`to_q`, `img_mod`)
as surely as the model's own names do."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sgdiff.errors import UserError
from sgdiff.lora.weights import LoraLayer, LoraWeights, Reading
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
    names = kohya_spellings(modules) | {name: name for name in modules}  # either spelling -> the model's name
    updates: list[Update] = []
    mismatches: list[str] = []
    for layer in weights.layers:
        found = layer_updates(layer, modules, names)
        if isinstance(found, str):
            mismatches.append(found)
        else:
            updates += found
    if mismatches:
        raise UserError(mismatch_message(weights, type(model).__name__, mismatches, fitted=len(updates) > 0),
                        field="lora_path")  # fmt: skip
    return updates


def kohya_spellings(modules: dict[str, nn.Module]) -> dict[str, str]:
    """Each module's name as kohya spells it (every dot an underscore) -> the name; where two names spell alike,
    neither (no guessing)."""
    spelled: dict[str, str] = {}
    twice: set[str] = set()
    for name in modules:
        kohya = name.replace(".", "_")
        if kohya in spelled:
            twice.add(kohya)
        spelled[kohya] = name
    return {kohya: name for kohya, name in spelled.items() if kohya not in twice}


def layer_updates(layer: LoraLayer, modules: dict[str, nn.Module], names: dict[str, str]) -> list[Update] | str:
    """The update of each target of the layer's first reading whose targets are Linears of the model (the up
    rows split among them, in order), or what keeps its first reading from fitting. `names`: each spelling of
    a module's name -> its name."""

    def fits(reading: Reading) -> bool:
        return all(isinstance(modules.get(names.get(target, target)), Linear) for target in reading.targets)

    reading = next((r for r in layer.readings if fits(r)), layer.readings[0])
    found: list[tuple[str, Linear]] = []
    for target in reading.targets:
        name = names.get(target, target)
        module = modules.get(name)
        if not isinstance(module, Linear):
            return f"{target} is not a {'Linear' if module is not None else 'layer'} of it"
        found.append((name, module))
    linears = [linear for _, linear in found]
    outs, width = [linear.out_features for linear in linears], linears[0].in_features
    adapter_shape = [reading.up.shape[0], layer.down.shape[1]]
    if adapter_shape != [sum(outs), width] or any(linear.in_features != width for linear in linears):
        return f"{' + '.join(reading.targets)} expects [{sum(outs)}, {width}], the adapter has {adapter_shape}"
    ups = reading.up.split(outs)  # [sum(out), rank] -> each target's rows
    return [Update(name, linear, layer.down, up, reading.factor) for (name, linear), up in zip(found, ups, strict=True)]


def mismatch_message(weights: LoraWeights, model_name: str, mismatches: list[str], fitted: bool) -> str:
    shown = "; ".join(mismatches[:SHOWN_MISMATCHES])
    more = f" (and {len(mismatches) - SHOWN_MISMATCHES} more)" if len(mismatches) > SHOWN_MISMATCHES else ""
    if not fitted:
        return f"the LoRA file {weights.name} fits no layer of this {model_name}: {shown}{more}"
    return (
        f"the LoRA file {weights.name} does not fit this {model_name} ({len(mismatches)} of its "
        f"{len(weights.layers)} layers do not): {shown}{more}"
    )

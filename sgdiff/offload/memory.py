"""What each offload mode leaves on the compute device, in weight bytes, from the safetensors headers
(engine/memory.py tensor_bytes): the engine's memory checks (engine/service.py) compare it with the memory
there is, so that a run that fits thanks to offload is not refused. Lower bounds, as the checks need: a
slot's padding, the copies' staging and the kernels' workspaces are left out."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sgdiff.config import OffloadConfig
from sgdiff.errors import UserError
from sgdiff.sampling import SamplingParams

# diffusers' names of the denoising models (registry.py reads their configs by these names too)
DENOISERS = ("transformer", "transformer_2")
BLOCK = re.compile(r"^([^.]+)\.(\d+)\.")  # a repeated block's tensor: <module list>.<index>.<name in the block>
GIB = 2**30


@dataclass(frozen=True)
class WeightPlacement:
    """Weight bytes of one process under an offload mode."""

    lending: int  # on the compute device while the largest offloaded component is lent (its stage runs)
    resident: int  # on the compute device between loans (while the transformers run: beside the activations)
    host: int  # the offloaded weights' homes in CPU memory

    def device_peak(self, activations: int) -> int:
        """The least the compute device holds at its fullest, weights and a request's `activations`."""
        return max(self.lending, self.resident + activations)


def split_blocks(tensors: dict[str, int]) -> tuple[list[int], int]:
    """A transformer's tensor bytes as (each repeated block's, the rest's)."""
    blocks: dict[str, int] = {}
    rest = 0
    for name, size in tensors.items():
        match = BLOCK.match(name)
        if match is None:
            rest += size
        else:
            blocks[match.group(0)] = blocks.get(match.group(0), 0) + size
    return list(blocks.values()), rest


def weight_placement(
    tensors: dict[str, dict[str, int]], offload: OffloadConfig, text_encoders: frozenset[str]
) -> WeightPlacement:
    """Where the weights of the components in `tensors` ({component: {tensor: bytes}}, those this process
    loads) are under `offload`; `text_encoders`: the family's names of its text encoders."""
    sizes = {name: sum(component.values()) for name, component in tensors.items()}
    total = sum(sizes.values())
    if offload.cpu_offload == "none":
        texts = sum(sizes[name] for name in sizes.keys() & text_encoders) if offload.text_encoder_offload else 0
        return WeightPlacement(lending=total, resident=total - texts, host=texts)
    experts = [size for name, size in sizes.items() if name in DENOISERS]
    parts = [size for name, size in sizes.items() if name not in DENOISERS]
    if offload.cpu_offload == "components":
        resident = max(experts, default=0)  # one transformer, or the running one of several
        host = sum(parts) + (sum(experts) if len(experts) > 1 else 0)
    else:  # layers
        blocks: list[int] = []
        rest = 0
        for name in DENOISERS:
            if name in tensors:
                own, others = split_blocks(tensors[name])
                blocks, rest = blocks + own, rest + others
        ring = min(offload.offload_prefetch + 1, len(blocks)) * max(blocks, default=0)
        resident, host = rest + ring, sum(parts) + sum(blocks)
    return WeightPlacement(lending=resident + max(parts, default=0), resident=resident, host=host)


def check_fits_on_gpu(
    placement: WeightPlacement, activations: int, params: SamplingParams, offload: OffloadConfig, memory: int
) -> None:
    """Refuse a request that surely cannot fit on a GPU of `memory` bytes (all of it) under `offload`."""
    needed = placement.device_peak(activations)
    if needed <= memory:
        return
    # the weights at the fullest moment: beside the activations, or while a component is lent
    weights = placement.resident if needed == placement.resident + activations else placement.lending
    mode = offload.cpu_offload
    more = {"none": "`cpu_offload` components or layers", "components": "`cpu_offload` layers"}.get(mode)
    raise UserError(
        f"this request needs at least {size(needed)} of GPU memory ({size(weights)} of weights that stay on the "
        f"GPU with `cpu_offload` {mode}, {size(activations)} for a {params.height}x{params.width} output's "
        f"activations) but the GPU has {size(memory)}: "
        + (f"use {more}, or lower `height` and `width`" if more else "lower `height` and `width`"),
        field="cpu_offload" if more else "height",
    )


def size(count: int) -> str:
    return f"{count / GIB:.1f} GiB" if count >= GIB else f"{count / 2**20:.0f} MiB"

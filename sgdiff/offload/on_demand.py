"""Whole models lent to the compute device when they are called: `cpu_offload` components (text encoders,
image encoder, VAE; of several transformers, the one running) and `text_encoder_offload`.

No stage says what it uses: a forward pre-hook on each component and every submodule of it lends the
component when any part of it first runs (a VAE's `decode` runs its submodules, a text encoder is
called), and the pipeline calls `stage_finished` after each stage, which evicts what the stage used.
A component the next request needs again comes back the same way. Each loan is one copy from pinned
memory into a fresh allocation, on the compute stream (the caching allocator takes it back at the end
of the stage, for the transformer's activations).

Several transformers (Wan2.2 A14B's two experts) share one slot, as large as the largest: calling one
copies it in over the other, which happens once each way per request (the expert changes once along
the schedule). The slot is the same memory for every loan, so a CUDA graph captured for an expert stays
valid across its loans."""

from __future__ import annotations

import torch
from torch import nn

from sgdiff.offload.weights import Ring, Slot, WeightUnit


class OnDemand:
    def __init__(self, device: torch.device, pinned: bool):
        self.device, self.pinned = device, pinned
        self.components: list[WeightUnit] = []
        self.experts: list[WeightUnit] = []
        self.shared: Ring | None = None  # the experts' slot
        self.lent: list[WeightUnit] = []  # components lent during the stage that runs
        self.copies = 0  # loans so far

    def add_component(self, module: nn.Module) -> WeightUnit:
        """`module` lent when it (or any submodule) is called, evicted when the stage ends."""
        unit = WeightUnit(module, self.device, self.pinned)
        self.components.append(unit)
        for sub in module.modules():
            sub.register_forward_pre_hook(lambda *_, unit=unit: self.lend_component(unit))
        return unit

    def add_experts(self, models: list[nn.Module]) -> list[WeightUnit]:
        """`models` lent one at a time into one shared slot, each when it is called (hooked at its own
        forward only: a compiled block's graph is left as it is)."""
        units = [WeightUnit(model, self.device, self.pinned) for model in models]
        self.experts += units
        self.shared = Ring(max(unit.nbytes for unit in units), 1, self.device)
        for model, unit in zip(models, units, strict=True):
            model.register_forward_pre_hook(lambda *_, unit=unit: self.lend_expert(unit))
        return units

    def lend_component(self, unit: WeightUnit) -> None:
        if unit.present:
            return
        with torch.inference_mode(False):
            buffer = torch.empty(unit.nbytes, dtype=torch.uint8, device=self.device)
        unit.lend(Slot(buffer), non_blocking=True, keep_views=False)
        self.lent.append(unit)
        self.copies += 1

    def lend_expert(self, unit: WeightUnit) -> None:
        if unit.present:
            return
        assert self.shared is not None  # (add_experts made it)
        unit.lend(self.shared.take(), non_blocking=True)
        self.copies += 1

    def stage_finished(self, *_: object) -> None:
        """Evict the components the stage used (their memory goes back to the caching allocator, in stream
        order: the stage's kernels that read it still run first)."""
        for unit in self.lent:
            unit.evict()
        self.lent.clear()

    def resident_bytes(self) -> int:
        """The compute device's memory held between stages: the experts' slot."""
        return self.shared.nbytes if self.shared is not None else 0

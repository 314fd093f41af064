"""`cpu_offload` layers: the transformers' repeated blocks (speed/compile.py repeated_blocks) live in CPU
memory and are streamed onto the compute device, each copied while the blocks before it compute.

A forward pre-hook on each block makes sure its weights are in a slot (copied now if they were not
prefetched), makes the compute stream wait for their copy, and starts copying the next `prefetch`
blocks, on a side stream, into the slots of a ring of `prefetch + 1` (each as large as the largest
block, made once: no allocation while the model runs). A forward hook after the block records when its
kernels are done (a slot is overwritten only after that) and puts placeholders back in its tensors.

Which block comes next is learned from the order they run in (at first: each model's blocks in order,
the last followed by its first, for the next forward): a block that runs unforeseen is copied when it
runs, never wrongly. The hooks run outside each block's forward, so a block compiled by torch.compile
(regional compile) stays one graph; a CUDA graph cannot replay copies the host decides between blocks
(apply.py refuses the pair). On the CPU the same machinery runs, copies and all, without streams."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from sgdiff.offload.weights import Ring, Slot, WeightUnit


class BlockStreamer:
    def __init__(self, models: list[list[nn.Module]], device: torch.device, prefetch: int, pinned: bool):
        """`models`: each transformer's repeated blocks, in the order its forward runs them."""
        blocks = [block for blocks in models for block in blocks]
        self.units = [WeightUnit(block, device, pinned) for block in blocks]
        self.next_of: list[int] = []
        for blocks_of_model in models:
            first = len(self.next_of)
            self.next_of += [*range(first + 1, first + len(blocks_of_model)), first]
        self.device, self.prefetch = device, prefetch
        self.ring = Ring(max(unit.nbytes for unit in self.units), min(prefetch + 1, len(self.units)), device)
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.copies = 0  # blocks copied into a slot
        self.waits = 0  # of those, copied only when they were about to run (not prefetched)
        self.running: int | None = None
        self.last: int | None = None  # the block that ran last
        for index, block in enumerate(blocks):
            block.register_forward_pre_hook(partial(self.enter, index))
            block.register_forward_hook(partial(self.leave, index), always_call=True)

    def enter(self, index: int, module: nn.Module, args: tuple) -> None:
        if self.last is not None:
            self.next_of[self.last] = index  # learnt: `index` follows the block that ran last
        unit = self.units[index]
        if not unit.present:
            self.waits += 1
            self.fetch(unit)
        if self.copy_stream is not None and unit.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(unit.copied)
        self.running = index
        ahead = index
        for _ in range(self.prefetch):
            ahead = self.next_of[ahead]
            if ahead == index:
                break
            if not self.units[ahead].present:
                self.fetch(self.units[ahead])

    def leave(self, index: int, module: nn.Module, args: tuple, output: object) -> None:
        unit = self.units[index]
        if self.copy_stream is not None and unit.slot is not None:
            unit.slot.free = torch.cuda.current_stream(self.device).record_event()
        unit.evict()
        self.running, self.last = None, index

    def fetch(self, unit: WeightUnit) -> None:
        """Copy `unit` into the ring's next slot (on the copy stream, once the slot's last reader is done)."""
        slot = self.take()
        if self.copy_stream is None:
            unit.lend(slot)
        else:
            if slot.free is not None:
                self.copy_stream.wait_event(slot.free)
            with torch.cuda.stream(self.copy_stream):
                unit.lend(slot, non_blocking=True)
            unit.copied = self.copy_stream.record_event()
        self.copies += 1

    def take(self) -> Slot:
        """The ring's next slot, never the running block's (taken in the order the blocks run, the next slot
        is never the running block's anyway: the ring holds it and the `prefetch` blocks after it)."""
        return self.ring.take(keep=self.units[self.running] if self.running is not None else None)

    def resident_bytes(self) -> int:
        """The compute device's memory this streamer holds: the ring."""
        return self.ring.nbytes

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
(apply.py refuses the pair). On the CPU the same machinery runs, copies and all, without streams.

Blocks kept resident (`offload_resident_blocks`, resident.py) get memory of their own on the device for
the rest of the stage, once the keeping is decided at a block's entry; the hooks then leave them there, and
the prefetch passes over them to the next blocks that stream. release() ends that after the stage."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from sgdiff.offload.resident import ResidentBlocks
from sgdiff.offload.weights import Ring, Slot, WeightUnit


class BlockStreamer:
    def __init__(
        self,
        models: list[list[nn.Module]],
        device: torch.device,
        prefetch: int,
        pinned: bool,
        keep: ResidentBlocks | None = None,
    ):
        """`models`: each transformer's repeated blocks, in the order its forward runs them. `keep`: which
        blocks stay on the device while a stage runs them (None: none, every block streams)."""
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
        self.keep = keep
        self.resident: dict[int, Slot] = {}  # blocks kept on the device until the stage ends: index -> own slot
        self.ran: list[int] = []  # the blocks entered in this stage, in order, until the keeping is decided
        self.decided = False  # which blocks stay, for the stage that runs
        self.kept = 0  # how many blocks the last decision kept (the perf dump's)
        for index, block in enumerate(blocks):
            block.register_forward_pre_hook(partial(self.enter, index))
            block.register_forward_hook(partial(self.leave, index), always_call=True)

    def enter(self, index: int, module: nn.Module, args: tuple) -> None:
        if self.keep is not None:
            self.keep_resident(index)
        if self.last is not None:
            self.next_of[self.last] = index  # learnt: `index` follows the block that ran last
        unit = self.units[index]
        if not unit.present:
            self.waits += 1
            self.fetch(unit)
        if self.copy_stream is not None and unit.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(unit.copied)
        self.running = index
        ahead, fetched = index, 0
        for _ in range(len(self.units) - 1):  # the next `prefetch` blocks that stream (resident ones are there)
            ahead = self.next_of[ahead]
            if ahead == index or fetched == self.prefetch:
                break
            if ahead in self.resident:
                continue
            fetched += 1
            if not self.units[ahead].present:
                self.fetch(self.units[ahead])

    def leave(self, index: int, module: nn.Module, args: tuple, output: object) -> None:
        if index in self.resident:
            self.running, self.last = None, index
            return
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
        """The compute device's memory this streamer holds: the ring (and the blocks kept, while kept)."""
        return self.ring.nbytes + sum(slot.buffer.numel() for slot in self.resident.values())

    def keep_resident(self, index: int) -> None:
        """At a block's entry: which blocks stay (resident.py). A count: decided at the stage's first block,
        among all. `auto`: once a whole forward has run (its first block enters again), among the blocks it
        ran, as many as the room the device has left beside that forward's memory."""
        assert self.keep is not None
        if self.decided:
            return
        if not self.ran:
            self.keep.stage_started(self.device)
        if self.keep.count is None and (not self.ran or index != self.ran[0]):
            self.ran.append(index)
            return
        candidates = self.ran if self.keep.count is None else list(range(len(self.units)))
        for kept in self.keep.choose(candidates, [unit.nbytes for unit in self.units], self.device):
            self.make_resident(kept)
        self.decided, self.kept = True, len(self.resident)

    def make_resident(self, index: int) -> None:
        """Copy block `index` into memory of its own on the device, where it stays until release()."""
        unit = self.units[index]
        if unit.present:
            unit.evict()  # (its ring slot's copy, if one is on its way, is not waited for: its memory is not read)
        with torch.inference_mode(False):
            slot = Slot(torch.empty(unit.nbytes, dtype=torch.uint8, device=self.device))
        unit.lend(slot, non_blocking=True)  # (on the compute stream: ordered before the block's kernels)
        unit.copied = None
        self.resident[index] = slot

    def release(self, stage: object = None) -> None:
        """After each stage (pipeline.after_stage): the kept blocks go back to streaming and their memory to the
        allocator (the VAE's decode, the next stage, may need it); the next stage that runs them decides anew."""
        for index in self.resident:
            self.units[index].evict()
        self.resident, self.ran, self.decided = {}, [], False

"""A module's weights as one unit that lives in CPU memory and is lent to the compute device while it runs.

The home is one flat byte buffer in CPU memory (pinned on a CUDA machine, so that copies to the GPU run
at the bus's rate and asynchronously). A loan copies the home into a buffer of the compute device (a
slot) and points every tensor of the module at its place in the slot (`tensor.data`: the Parameter
objects stay, so hooks, compiled code and graphs that hold them see the new memory). Between loans each
tensor is a placeholder: its shape, dtype and device, and no memory (one NaN, or 0, expanded), so code
that reads a model's `.device` or `.dtype` still reads the truth, and a computation that would run on
a placeholder by mistake gives NaN instead of numbers.

A module's tensors: its parameters and buffers, and the tensors its submodules keep in plain attributes,
one object deep (a FusedProjection's concatenated weights, whose slices the Linears' parameters are:
speed/fuse.py); not the buffers a submodule names in RESIDENT_BUFFERS (written in place while the model
serves: a LoRA adapter's scales, models/lora.py), which stay on the compute device, outside any home (a
write into a placeholder fails, one into a slot would be undone by the next loan). Tensors that share
memory (views, tied weights) share it in the slot too. Each stretch of memory starts at a multiple of 512
bytes in the slot, as every block of the CUDA caching allocator does: a weight is as aligned as when it
had its own allocation, so the kernels (and their results) are the same."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

ALIGN = 512  # bytes

# tensor -> (its dtype, shape, stride, offset in bytes from its stretch's start in the slot)
Entry = tuple[torch.dtype, tuple[int, ...], tuple[int, ...], int]


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """Every tensor `module` computes with (see the module's doc), each once, empty and meta ones left out."""
    found: dict[int, torch.Tensor] = {}

    def add(value: object) -> None:
        if isinstance(value, torch.Tensor) and value.numel() > 0 and not value.is_meta:
            found.setdefault(id(value), value)

    resident = {id(sub._buffers[name]) for sub, name in resident_buffers(module)}
    for sub in module.modules():
        for value in (*sub._parameters.values(), *sub._buffers.values()):
            if id(value) not in resident:
                add(value)
        for value in vars(sub).values():
            add(value)
            if not isinstance(value, (torch.Tensor, nn.Module, dict, list, tuple)) and hasattr(value, "__dict__"):
                for inner in vars(value).values():
                    add(inner)
    return list(found.values())


def resident_buffers(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """(submodule, buffer name) of each buffer a submodule of `module` names in its RESIDENT_BUFFERS."""
    return [
        (sub, name)
        for sub in module.modules()
        for name in getattr(sub, "RESIDENT_BUFFERS", ())
        if sub._buffers.get(name) is not None
    ]


def as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A storage's memory as a flat uint8 tensor (the same memory)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


_fills: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def placeholder(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor`'s shape and dtype on `device`, holding one element (NaN where the dtype has it) expanded."""
    key = (tensor.dtype, device)
    if key not in _fills:
        with torch.inference_mode(False):
            value = float("nan") if tensor.dtype.is_floating_point else 0
            _fills[key] = torch.full((), value, dtype=tensor.dtype, device=device)
    return _fills[key].expand(tensor.shape)


def is_placeholder(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a placeholder (holds no weights) rather than memory of its own or in a slot."""
    pointer = tensor.untyped_storage().data_ptr()
    return any(fill.untyped_storage().data_ptr() == pointer for fill in _fills.values())


def pin(buffer: torch.Tensor) -> None:
    """Page-lock a CPU tensor's memory where it is (cudaHostRegister: exactly its size, where torch's pinned
    allocator would round it up to a power of two), until the tensor is freed."""
    pointer = buffer.data_ptr()
    error = int(torch.cuda.cudart().cudaHostRegister(pointer, buffer.numel() * buffer.element_size(), 0))
    if error != 0:
        raise RuntimeError(f"pinning {buffer.nbytes} bytes of CPU memory failed (cudaError {error})")
    weakref.finalize(buffer, torch.cuda.cudart().cudaHostUnregister, pointer)  # before its memory is freed


@dataclass(eq=False)
class Slot:
    """Memory of the compute device a unit is lent into."""

    buffer: torch.Tensor  # uint8 [size]
    holder: WeightUnit | None = None
    free: torch.cuda.Event | None = None  # CUDA: recorded after the last kernel that read its holder's weights


class WeightUnit:
    """One module's weights: at home in CPU memory, lent to slots of `device` (module doc)."""

    def __init__(self, module: nn.Module, device: torch.device, pinned: bool):
        self.module = module
        with torch.inference_mode(False):
            for sub, name in resident_buffers(module):  # (module doc) on the compute device for good
                sub._buffers[name] = getattr(sub, name).to(device)
        self.tensors = module_tensors(module)
        starts: dict[tuple[torch.device, int], int] = {}  # a stretch of memory -> its offset in the home
        stretches: list[tuple[torch.UntypedStorage, int]] = []
        size = 0
        for tensor in self.tensors:
            storage = tensor.untyped_storage()
            key = (storage.device, storage.data_ptr())
            if key not in starts:
                starts[key] = size
                stretches.append((storage, size))
                size += -(-storage.nbytes() // ALIGN) * ALIGN
        self.nbytes = size
        self.entries: list[Entry] = []
        for tensor in self.tensors:
            storage = tensor.untyped_storage()
            offset = starts[(storage.device, storage.data_ptr())] + int(tensor.storage_offset()) * tensor.element_size()
            self.entries.append((tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()), offset))
        with torch.inference_mode(False):
            self.home = torch.empty(size, dtype=torch.uint8)
            for storage, start in stretches:
                self.home[start : start + storage.nbytes()].copy_(as_bytes(storage))
        if pinned and size > 0:
            pin(self.home)
        self.placeholders = [placeholder(tensor, device) for tensor in self.tensors]
        self.slot: Slot | None = None
        self.copied: torch.cuda.Event | None = None  # CUDA: recorded after its last copy into its slot
        self._views: dict[int, list[torch.Tensor]] = {}  # a persistent slot's data_ptr -> the tensors there
        self.evict()

    @property
    def present(self) -> bool:
        """Whether the weights are in a slot (copied, or being copied) rather than placeholders."""
        return self.slot is not None

    def views(self, buffer: torch.Tensor, keep: bool) -> list[torch.Tensor]:
        """Each tensor's place in `buffer` (kept for the next loan into it when `keep`)."""
        cached = self._views.get(buffer.data_ptr()) if keep else None
        if cached is not None:
            return cached
        storage, base = buffer.untyped_storage(), buffer.storage_offset()
        with torch.inference_mode(False):  # ordinary tensors, whatever mode the loan happens in
            made = [
                torch.empty(0, dtype=dtype, device=buffer.device).set_(
                    storage, (base + offset) // dtype.itemsize, shape, stride
                )
                for dtype, shape, stride, offset in self.entries
            ]
        if keep:
            self._views[buffer.data_ptr()] = made
        return made

    def lend(self, slot: Slot, non_blocking: bool = False, keep_views: bool = True) -> None:
        """Copy the home into `slot` (on the current stream) and point the tensors there."""
        assert slot.holder is None and slot.buffer.numel() >= self.nbytes, "a slot holds one unit at a time"
        slot.buffer[: self.nbytes].copy_(self.home, non_blocking=non_blocking)
        for tensor, view in zip(self.tensors, self.views(slot.buffer, keep_views), strict=True):
            tensor.data = view
        slot.holder, self.slot = self, slot

    def evict(self) -> None:
        """Placeholders in the tensors; the slot is free for another unit (its memory is not touched)."""
        for tensor, empty in zip(self.tensors, self.placeholders, strict=True):
            tensor.data = empty
        if self.slot is not None:
            self.slot.holder = None
        self.slot = None


class Ring:
    """`count` slots of `size` bytes on `device`, taken in turn: the one taken is the least recently taken,
    and its holder, if any (a block prefetched and not run, an expert not running), is evicted."""

    def __init__(self, size: int, count: int, device: torch.device):
        with torch.inference_mode(False):
            self.slots = [Slot(torch.empty(size, dtype=torch.uint8, device=device)) for _ in range(count)]
        self.turn = 0

    def take(self, keep: WeightUnit | None = None) -> Slot:
        """The next slot in turn, or the one after where the next holds `keep` (a unit that is running)."""
        slot = self.slots[self.turn % len(self.slots)]
        self.turn += 1
        if keep is not None and slot.holder is keep and len(self.slots) > 1:
            return self.take(keep)
        if slot.holder is not None:
            slot.holder.evict()
        return slot

    @property
    def nbytes(self) -> int:
        return sum(slot.buffer.numel() for slot in self.slots)

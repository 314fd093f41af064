"""Adapters added into the weights (fused): nothing runs beside the Linears, so a step costs what it cost
without them.

Each Linear's new weight is computed in float32 from its base weight (FP8 weights dequantised: float8
times each row's scale) plus every adapter's update, then cast back to its dtype once (FP8: quantised
again, new per-row scales), and written into the weight where it is, in place. So a fused projection
(speed/fuse.py: the group's concatenated weight, whose rows the Linears' weights are views of) gets the
update in its rows too, and compiled code or a captured CUDA graph reads the new values as they are.

Unfusing and switching (set_scales: the same adapters at new scales, e.g. another adapter for the next
request of a server) start from a copy of the base weights of the Linears touched (FP8: their bytes and
scales), taken when the adapters are applied, so unfusing is bit for bit and a switch gives the weights
a fresh fuse at those scales would. The copy lives on the weights' device where the caller gives it room
(`base_room`: a switch is then a few device-memory passes over the adapted weights), else in CPU memory,
page-locked when the weights are on a GPU (a switch then also copies them back over the bus; refused where
it exceeds `cpu_room`). The adapters' factors wait on the weights' device with it. Without that copy
(keep_base=False: one run that never unfuses, no second copy of the adapted weights) the adapters cannot
be removed or rescaled.

A copy taken before the weights became FP8 (the engine applies adapters before the speed toggles) is
fused as a fresh run would: the sum cast to the copy's dtype, then quantised as the FP8 toggle quantises."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch

from sgdiff.errors import UserError
from sgdiff.lora.match import Update, by_linear
from sgdiff.models.fp8 import quantize_weight
from sgdiff.models.layers import Linear
from sgdiff.offload.weights import ALIGN, pin

Base = tuple[torch.Tensor, torch.Tensor | None]  # (weight, FP8 weights' per-row scale) as they were


class FusedLoras:
    mode = "fused"

    def __init__(
        self,
        adapters: list[list[Update]],
        scales: list[float],
        keep_base: bool,
        base_room: int = 0,
        cpu_room: int | None = None,
    ):
        self.by_linear = by_linear(adapters)  # Linear -> (adapter index, its update)
        self.bases: dict[Linear, Base] | None = None
        self.base_buffer: torch.Tensor | None = None  # where the copies live (CPU: page-locked while it lives)
        if keep_base:
            linears = list(self.by_linear)
            size = sum(tensor.nbytes for linear in linears for tensor in base_tensors(linear))
            on_device = size <= base_room
            if not on_device and cpu_room is not None and size > cpu_room:
                raise UserError(
                    f"switching fused LoRA adapters needs a copy of the base weights they change ({size / 2**30:.1f} "
                    f"GiB) and neither the GPU nor CPU memory has room for it: use `lora_mode` unfused",
                    field="lora_mode",
                )
            self.bases, self.base_buffer = copy_bases(linears, on_device)  # (the buffer kept: its pinning lasts)
            self.by_linear = {
                linear: [(index, factors_on(update, linear.weight.device)) for index, update in updates]
                for linear, updates in self.by_linear.items()
            }
        self.fuse(scales)

    @property
    def base_device(self) -> torch.device | None:
        """Where the copy of the base weights lives (None: none kept)."""
        return next(iter(self.bases.values()))[0].device if self.bases else None

    def fuse(self, scales: list[float]) -> None:
        """Every adapter at its scale into the weights: from the base copy where one is kept, else from the
        weights as they are (their base values)."""
        linears = list(self.by_linear)
        bases: list[Base | None] = [self.bases[linear] if self.bases is not None else None for linear in linears]
        with torch.no_grad():
            device = linears[0].weight.device if linears else torch.device("cpu")
            for linear, base in zip(linears, bases_on_device(bases, device), strict=True):
                updates = self.by_linear[linear]
                active = [(scales[index] * update.factor, update) for index, update in updates if scales[index] != 0]
                if not active:  # its base values (without a copy: left as they are, since an FP8 weight
                    if base is not None:  # quantised again might move)
                        write_base(linear, base)
                    continue
                weight = base_weight(linear, base)
                for factor, update in active:
                    weight.addmm_(update.up.to(weight), update.down.to(weight), alpha=factor)  # [out, r] @ [r, in]
                write_weight(linear, weight, base[0].dtype if base is not None else linear.weight.dtype)

    def set_scales(self, scales: list[float]) -> None:
        """The same adapters at new scales, fused anew from the base copy."""
        self.need_bases()
        self.fuse(scales)

    def remove(self) -> None:
        self.restore()

    def restore(self) -> None:
        with torch.no_grad():
            for linear, base in self.need_bases().items():
                write_base(linear, base)

    def need_bases(self) -> dict[Linear, Base]:
        if self.bases is None:
            raise ValueError("these LoRA adapters were fused without keeping the base weights (keep_base=False)")
        return self.bases


def base_tensors(linear: Linear) -> list[torch.Tensor]:
    """What a base copy of the Linear holds: its weight, and an FP8 weight's row scales."""
    return [linear.weight, linear.weight_scale] if linear.fp8 else [linear.weight]


def copy_bases(linears: list[Linear], on_device: bool) -> tuple[dict[Linear, Base], torch.Tensor]:
    """Each Linear's base tensors copied into one flat buffer, on their device or in CPU memory (page-locked
    where they are on a GPU: the copies back run at the bus's rate; one registration of exactly its size,
    undone when the buffer tensor returned is freed, so the caller keeps it), each tensor at a multiple of
    ALIGN bytes. Returns (the copies by Linear, the buffer)."""
    tensors = [tensor.detach() for linear in linears for tensor in base_tensors(linear)]
    starts, size = [], 0
    for tensor in tensors:
        starts.append(size)
        size += -(-tensor.nbytes // ALIGN) * ALIGN
    device = tensors[0].device if on_device and tensors else torch.device("cpu")
    home = torch.empty(size, dtype=torch.uint8, device=device)
    if device.type == "cpu" and size > 0 and any(tensor.is_cuda for tensor in tensors):
        pin(home)
    copies = []
    for tensor, start in zip(tensors, starts, strict=True):
        copy = home[start : start + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        raw(copy).copy_(raw(tensor))
        copies.append(copy)
    bases, taken = {}, iter(copies)
    for linear in linears:
        bases[linear] = (next(taken), next(taken) if linear.fp8 else None)
    return bases, home


def bases_on_device(bases: list[Base | None], device: torch.device, ahead: int = 2) -> Iterator[Base | None]:
    """Each Linear's base copy on `device` (the weights'), in order. From page-locked CPU memory to a GPU the
    copies run on a side stream, `ahead` Linears early: the bus carries the next bases while the GPU fuses
    this one (a switch then costs about the bus's time alone, not the bus's plus the fusing). Each copy's
    memory returns to the allocator once the kernels that read it are done (record_stream)."""
    if device.type != "cuda" or not any(base is not None and base[0].device.type == "cpu" for base in bases):
        yield from bases
        return
    main, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    in_flight: deque[tuple[Base | None, torch.cuda.Event | None]] = deque()

    def issue(base: Base | None) -> None:
        if base is None:
            in_flight.append((None, None))
            return
        with torch.cuda.stream(side):
            moved = tuple(None if t is None else t.to(device, non_blocking=True) for t in base)
            arrived = torch.cuda.Event()
            arrived.record(side)
        in_flight.append((moved, arrived))  # type: ignore[arg-type]

    for base in bases[:ahead]:
        issue(base)
    for index in range(len(bases)):
        if index + ahead < len(bases):
            issue(bases[index + ahead])
        moved, arrived = in_flight.popleft()
        if moved is not None and arrived is not None:
            main.wait_event(arrived)
            for tensor in moved:
                if tensor is not None:
                    tensor.record_stream(main)  # (allocated on `side`, read on `main`)
        yield moved


def factors_on(update: Update, device: torch.device) -> Update:
    """The update with its factors on `device` (kept there for the switches), in their dtype."""
    return Update(update.name, update.linear, update.down.to(device), update.up.to(device), update.factor)


def base_weight(linear: Linear, base: Base | None) -> torch.Tensor:
    """The Linear's base weight [out, in] in float32 on its device (FP8: dequantised)."""
    weight, scale = base if base is not None else (linear.weight, linear.weight_scale if linear.fp8 else None)
    device = linear.weight.device
    weight = weight.to(device, non_blocking=True).to(torch.float32, copy=True)  # (a copy: the updates go into it)
    return weight if scale is None else weight * scale.to(device)[:, None]


def write_weight(linear: Linear, weight: torch.Tensor, dtype: torch.dtype) -> None:
    """float32 `weight` into the Linear's weight in place, as a weight of `dtype` (its base's) holds it: cast
    to it; where the Linear's weight is FP8 now, then quantised with new scales (from float32 directly where
    the base was FP8 already)."""
    if linear.fp8:
        quantized, scale = quantize_weight(weight if is_float8(dtype) else weight.to(dtype))
        raw(linear.weight).copy_(raw(quantized))
        linear.weight_scale.copy_(scale)
    else:
        linear.weight.copy_(weight)  # (a weight not FP8 keeps its base's dtype: the cast happens in the copy)


def write_base(linear: Linear, base: Base) -> None:
    """The base copy back into the Linear's weight: as it was, bit for bit; a copy taken before the weight
    became FP8 quantised as the FP8 toggle did."""
    weight, scale = base
    if linear.fp8 and not is_float8(weight.dtype):
        write_weight(linear, weight.to(linear.weight.device, non_blocking=True), weight.dtype)
        return
    if linear.weight.dtype != weight.dtype or linear.weight.shape != weight.shape:
        raise ValueError(
            f"a Linear's weight became {linear.weight.dtype} {list(linear.weight.shape)} after its LoRA adapters "
            f"were fused (was {weight.dtype} {list(weight.shape)})"
        )
    raw(linear.weight).copy_(raw(weight), non_blocking=True)
    if scale is not None:
        linear.weight_scale.copy_(scale, non_blocking=True)


def is_float8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize == 1


def raw(tensor: torch.Tensor) -> torch.Tensor:
    """float8 tensors as their bytes (copy kernels of every device take uint8); others as they are."""
    return tensor.view(torch.uint8) if is_float8(tensor.dtype) else tensor

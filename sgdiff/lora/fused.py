"""Adapters added into the weights (fused): nothing runs beside the Linears, so a step costs what it cost
without them.

Each Linear's new weight is computed in float32 from its base weight (FP8 weights dequantised: float8
times each row's scale) plus every adapter's update, then cast back to its dtype once (FP8: quantised
again, new per-row scales), and written into the weight where it is, in place. So a fused projection
(speed/fuse.py: the group's concatenated weight, whose rows the Linears' weights are views of) gets the
update in its rows too, and compiled code or a captured CUDA graph reads the new values as they are.

Unfusing is bit for bit: the base weights of the Linears touched (FP8: their bytes and scales) are copied
to the CPU first and copied back. Without that copy (keep_base=False: one run that never unfuses, no
second copy of the adapted weights in CPU memory) the adapters cannot be removed or rescaled."""

from __future__ import annotations

import torch

from sgdiff.lora.match import Update, by_linear
from sgdiff.models.fp8 import quantize_weight
from sgdiff.models.layers import Linear

Base = tuple[torch.Tensor, torch.Tensor | None]  # (weight, FP8 weights' per-row scale) as they were


class FusedLoras:
    mode = "fused"

    def __init__(self, adapters: list[list[Update]], scales: list[float], keep_base: bool):
        self.by_linear = by_linear(adapters)  # Linear -> (adapter index, its update)
        self.bases: dict[Linear, Base] | None = None
        if keep_base:
            self.bases = {linear: copy_to_cpu(linear) for linear in self.by_linear}
        self.fuse(scales)

    def fuse(self, scales: list[float]) -> None:
        """Every adapter at its scale into the weights, which hold their base values now."""
        with torch.no_grad():
            for linear, updates in self.by_linear.items():
                active = [(scales[index] * update.factor, update) for index, update in updates if scales[index] != 0]
                if not active:  # (left as it is: an FP8 weight quantised again might move)
                    continue
                weight = base_weight(linear, self.bases[linear] if self.bases is not None else None)
                for factor, update in active:
                    weight += factor * (update.up.to(weight) @ update.down.to(weight))  # [out, r] @ [r, in]
                write_weight(linear, weight)

    def set_scales(self, scales: list[float]) -> None:
        """The same adapters at new scales: the base weights back, then the adapters fused anew."""
        self.restore()
        self.fuse(scales)

    def remove(self) -> None:
        self.restore()

    def restore(self) -> None:
        if self.bases is None:
            raise ValueError("these LoRA adapters were fused without keeping the base weights (keep_base=False)")
        with torch.no_grad():
            for linear, (weight, scale) in self.bases.items():
                if linear.weight.dtype != weight.dtype or linear.weight.shape != weight.shape:
                    raise ValueError(
                        f"a Linear's weight became {linear.weight.dtype} {list(linear.weight.shape)} after its LoRA "
                        f"adapters were fused (was {weight.dtype} {list(weight.shape)}): remove them before FP8"
                    )
                raw(linear.weight).copy_(raw(weight))
                if scale is not None:
                    linear.weight_scale.copy_(scale)


def copy_to_cpu(linear: Linear) -> Base:
    weight = linear.weight.detach().to("cpu", copy=True)
    return weight, linear.weight_scale.detach().to("cpu", copy=True) if linear.fp8 else None


def base_weight(linear: Linear, base: Base | None) -> torch.Tensor:
    """The Linear's base weight [out, in] in float32 on its device (FP8: dequantised)."""
    weight, scale = base if base is not None else (linear.weight, linear.weight_scale if linear.fp8 else None)
    weight = weight.to(linear.weight.device, torch.float32, copy=True)  # (a copy: the updates are added to it)
    return weight if scale is None else weight * scale.to(weight.device)[:, None]


def write_weight(linear: Linear, weight: torch.Tensor) -> None:
    """float32 `weight` into the Linear's weight in place: cast to its dtype, or as float8 with new scales."""
    if linear.fp8:
        quantized, scale = quantize_weight(weight)
        raw(linear.weight).copy_(raw(quantized))
        linear.weight_scale.copy_(scale)
    else:
        linear.weight.copy_(weight)


def raw(tensor: torch.Tensor) -> torch.Tensor:
    """float8 tensors as their bytes (copy kernels of every device take uint8); others as they are."""
    return tensor.view(torch.uint8) if tensor.element_size() == 1 and tensor.is_floating_point() else tensor

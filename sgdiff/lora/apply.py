"""Apply LoRA adapters to a built transformer, switch their scales, remove them.

    handle = apply_loras(model, [(read_lora("a.safetensors"), 0.8), (read_lora("owner/b"), 0.5)], "unfused")
    handle.set_scales([0.0, 1.0])  # the same adapters, new scales: no shape changes
    handle.remove()  # the model as it was, bit for bit

Modes: "fused" adds the updates into the weights (lora/fused.py: free per step; a switch fuses anew from a
copy of the base weights), "unfused" keeps them beside the Linears (lora/unfused.py: a little work per
step; a switch writes scales, and nothing is copied); config.py LoraConfig.resolved says which a caller's
"auto" is. One set of adapters per model at a time: every adapter is matched against the model before
anything changes, so a refused one leaves it untouched.

Order with the other changes to a loaded transformer: after it is on its device and before its weights
are offloaded (offloading swaps them for placeholders). The speed toggles may come before or after:
both modes follow the fused projections and FP8 weights wherever they are; unfused adapters should
come before torch.compile (one compilation, then switching costs none)."""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from torch import nn

from sgdiff.lora.files import lora_file, read_tensors
from sgdiff.lora.fused import FusedLoras
from sgdiff.lora.keys import lora_weights
from sgdiff.lora.match import match_lora
from sgdiff.lora.unfused import UnfusedLoras
from sgdiff.lora.weights import LoraWeights

_applied: weakref.WeakKeyDictionary[nn.Module, AppliedLoras] = weakref.WeakKeyDictionary()


def read_lora(source: str) -> LoraWeights:
    """The adapter that `source` names (a .safetensors file, a folder with one, or a Hub repo id), read
    and its names turned into sgdiff's (lora/keys.py). A UserError for what cannot be read."""
    path = lora_file(source)
    tensors, metadata = read_tensors(path)
    name = source if path.name in source else f"{source} ({path.name})"
    return lora_weights(name, tensors, metadata)


class AppliedLoras:
    """Adapters on one model; `set_scales` switches them, `remove` takes them off."""

    def __init__(self, model: nn.Module, names: list[str], applied: FusedLoras | UnfusedLoras):
        # (a weak reference: _applied keeps this handle as long as the model lives, not the model itself)
        self.model = weakref.ref(model)
        self.names, self.applied = names, applied

    @property
    def mode(self) -> str:
        return self.applied.mode

    def set_scales(self, scales: Sequence[float]) -> None:
        """A new scale for each adapter, in the order they were applied (0: off); shapes stay."""
        self.active_model()
        if len(scales) != len(self.names):
            raise ValueError(f"{len(scales)} scales for {len(self.names)} LoRA adapters")
        self.applied.set_scales([float(scale) for scale in scales])

    def remove(self) -> None:
        """The model's weights and Linears as before the adapters were applied."""
        model = self.active_model()
        self.applied.remove()
        del _applied[model]

    def active_model(self) -> nn.Module:
        model = self.model()
        if model is None or _applied.get(model) is not self:
            raise ValueError("these LoRA adapters were removed from the model")
        return model


def apply_loras(
    model: nn.Module,
    adapters: Sequence[tuple[LoraWeights, float]],
    mode: str = "fused",
    keep_base: bool = True,
    base_room: int = 0,
    cpu_room: int | None = None,
) -> AppliedLoras:
    """Each (adapter, scale) on `model`: delta W = scale * alpha / rank * up @ down on every Linear it names.
    mode: "fused" or "unfused" (LoraConfig.resolved resolves "auto"). Fused only: keep_base=False keeps no copy of the
    base weights, and there is no way back (one run); with the copy, `base_room` is the bytes it may take on
    the weights' device (it goes to CPU memory where it needs more, refused beyond `cpu_room`: lora/fused.py)."""
    if mode not in ("fused", "unfused"):
        raise ValueError(f"apply_loras takes mode fused or unfused, not {mode!r} (LoraConfig.resolved resolves auto)")
    if model in _applied:
        raise ValueError("the model already carries LoRA adapters: remove them (or set their scales) first")
    matched = [match_lora(model, weights) for weights, _ in adapters]  # all refused before anything changes
    scales = [float(scale) for _, scale in adapters]
    if mode == "fused":
        applied: FusedLoras | UnfusedLoras = FusedLoras(matched, scales, keep_base, base_room, cpu_room)
    else:
        applied = UnfusedLoras(matched, scales)
    handle = AppliedLoras(model, [weights.name for weights, _ in adapters], applied)
    _applied[model] = handle
    return handle

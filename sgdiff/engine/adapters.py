"""The LoRA adapters an engine runs (RuntimeConfig.lora): read when the runner is made (a missing, pickled or
unreadable file is refused before any weight loads), applied to the loaded transformer (ModelRunner.load:
a file of another model is refused there), and each request's choice resolved against them (SamplingParams
.loras) and switched in before it runs.

Each adapter has a name: its file's stem (`style` for style.safetensors), a folder's name, or a Hub repo id as
given. Requests name adapters so (a server's `lora`/`loras`, GET /v1/loras, `generate --server --lora-path`).

Fused, one run's (`generate`, the Python Engine): the updates are added into the weights once, without a copy
of the base weights (nothing can be switched back); every request runs them at their scales. A server's
(LoraConfig.switching): a request's choice is switched in before it runs (a request that names none runs the
base model): fused (its default), the chosen adapters are fused anew from a copy of the base weights, kept on
the GPU where it leaves room for a request's work (BASE_COPY_HEADROOM) and else in page-locked CPU memory;
unfused (its default where the transformer's weights move or are copied: config.py LoraConfig.resolved),
every adapter sits beside its Linears from the start and the request's scales are written into them (the
others at 0)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sgdiff.config import LoraConfig
from sgdiff.engine.memory import available_memory_bytes
from sgdiff.errors import UserError
from sgdiff.lora import AppliedLoras, LoraWeights, apply_loras, read_lora
from sgdiff.pipeline.base import ComposedPipeline

Loras = tuple[tuple[str, float], ...]  # (name, scale) as SamplingParams.loras holds them
# what a caller asks for: (name, scale), the scale None for the adapter's own (its --lora-path scale)
Wanted = Sequence[tuple[str, float | None]]
# Switching fused adapters: the share of what the process may hold on the GPU that must stay free once the
# copy of the base weights is there (for a request's activations and the VAE's decode), else the copy goes
# to CPU memory. FLUX.1-dev on an 80 GB H100: its ~22 GB copy fits beside the pipeline's 34 GB.
BASE_COPY_HEADROOM = 0.25
CPU_HEADROOM = 0.1  # of the CPU memory available, left free where the copy goes there


def adapter_name(source: str) -> str:
    """What requests call the adapter of `source`: a file's stem, a folder's name, a Hub repo id as given."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.stem
    if path.is_dir():
        return path.resolve().name
    return source


@dataclass(frozen=True)
class Adapter:
    name: str
    source: str  # as given: a file, a folder or a Hub repo id
    scale: float  # its scale from the configuration: what a request that names it without one gets
    rank: int  # the largest rank of its layers
    layers: int  # how many Linears it updates
    weights: LoraWeights

    @classmethod
    def read(cls, source: str, scale: float) -> Adapter:
        weights = read_lora(source)
        rank = max((layer.rank for layer in weights.layers), default=0)
        layers = sum(len(layer.targets) for layer in weights.layers)
        return cls(adapter_name(source), source, float(scale), rank, layers, weights)


class EngineAdapters:
    """The configured adapters of one runner: read here, applied by `apply`, switched by `activate`."""

    def __init__(self, config: LoraConfig, gpu_memory_limit: int | None = None):
        self.mode = "fused" if config.mode == "auto" else config.mode  # (a server's auto: resolved by the caller)
        self.switching = config.switching or self.mode == "unfused"  # (unfused: switching costs nothing)
        self.gpu_memory_limit = gpu_memory_limit
        self.adapters: list[Adapter] = []
        for source, scale in config.adapters:
            adapter = Adapter.read(source, scale)
            if twin := next((a for a in self.adapters if a.name == adapter.name), None):
                raise UserError(f"`lora_path` {twin.source} and {source} are both named {adapter.name!r}, the name "
                                "requests use: rename one of the files", field="lora_path")  # fmt: skip
            self.adapters.append(adapter)
        self.applied: AppliedLoras | None = None
        self.active: list[float] | None = None  # each adapter's scale in the model now

    def __bool__(self) -> bool:
        return bool(self.adapters)

    @property
    def defaults(self) -> Loras:
        """Every adapter at its configured scale (none at 0): what a fused model runs, and a request that
        names no adapters gets from the engine."""
        return tuple((a.name, a.scale) for a in self.adapters if a.scale != 0)

    def apply(self, pipeline: ComposedPipeline) -> None:
        """Onto the loaded pipeline's transformer (Wan2.2 A14B: `transformer`, not `transformer_2`, as diffusers'
        load_lora_weights does), placed on its device and not yet offloaded, fused or compiled: see
        ModelRunner.load."""
        if not self.adapters:
            return
        assert self.applied is None, "the adapters are applied once, to the runner's one pipeline"
        model = denoiser(pipeline)
        scales = [0.0] * len(self.adapters) if self.switching else [a.scale for a in self.adapters]
        pairs = [(adapter.weights, scale) for adapter, scale in zip(self.adapters, scales, strict=True)]
        # fused and fixed: no copy of the base weights kept (the adapters never change; FP8 quantises the sum once)
        copied = self.mode == "fused" and self.switching
        device = next(model.parameters()).device
        room, cpu_room = base_copy_rooms(device, self.gpu_memory_limit) if copied else (0, None)
        self.applied = apply_loras(model, pairs, self.mode, keep_base=copied, base_room=room,
                                   cpu_room=cpu_room)  # fmt: skip
        self.active = scales

    def resolve(self, wanted: Wanted | None) -> Loras:
        """The adapters a request asks for as it will run them: (name, scale) in this engine's order, none at
        scale 0. None: the defaults. A UserError (field `loras`) names an unknown adapter, a scale that is no
        finite number, or (fused) a choice other than the fused one."""
        if wanted is None:
            return self.defaults
        known = {a.name: a for a in self.adapters}
        chosen: dict[str, float] = {}
        for name, scale in wanted:
            if name not in known:
                have = f"the loaded ones are {', '.join(known)}" if known else "none is loaded (`lora_path`)"
                raise UserError(f"`loras`: there is no LoRA adapter named {name!r}: {have}", field="loras")
            if name in chosen:
                raise UserError(f"`loras` names {name!r} twice: give each adapter once", field="loras")
            if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                      or not math.isfinite(scale)):  # fmt: skip
                raise UserError(f"`loras`: the scale of {name!r} must be a finite number, got {scale!r}",
                                field="loras")  # fmt: skip
            chosen[name] = known[name].scale if scale is None else float(scale)
        loras = tuple((a.name, chosen[a.name]) for a in self.adapters if chosen.get(a.name, 0.0) != 0)
        if not self.switching and loras != self.defaults:
            fused = ", ".join(f"{name}:{scale:g}" for name, scale in self.defaults) or "none"
            raise UserError(f"`loras`: the LoRA adapters are fused into the weights ({fused}) and no request can "
                            "change them; load them with `lora_mode` unfused to choose per request",
                            field="loras")  # fmt: skip
        return loras

    def activate(self, loras: Loras) -> None:
        """Switching: the model's adapters made `loras`' (those it leaves out at 0) before a request runs."""
        if self.applied is None or not self.switching:
            return
        chosen = dict(loras)
        scales = [chosen.get(a.name, 0.0) for a in self.adapters]
        if scales != self.active:
            self.applied.set_scales(scales)
            self.active = scales

    def record(self, loras: Loras) -> list[dict[str, Any]]:
        """What an output's metadata says of the adapters it ran with."""
        sources = {a.name: a.source for a in self.adapters}
        return [{"name": name, "source": sources[name], "scale": scale} for name, scale in loras]

    def describe(self) -> list[dict[str, Any]]:
        """Each loaded adapter: what GET /v1/loras and the perf dump tell."""
        return [{"name": a.name, "source": a.source, "scale": a.scale, "rank": a.rank, "layers": a.layers,
                 "mode": self.mode} for a in self.adapters]  # fmt: skip


def base_copy_rooms(device: torch.device, limit: int | None) -> tuple[int, int | None]:
    """Bytes a copy of base weights may take now (the pipeline loaded) on `device` (CUDA: what the process may
    still allocate there, `limit` being gpu_memory_limit, less BASE_COPY_HEADROOM of all it may hold; 0
    elsewhere) and in CPU memory (what is available less CPU_HEADROOM; None: unknown)."""
    available = available_memory_bytes()
    cpu_room = None if available is None else int(available * (1 - CPU_HEADROOM))
    if device.type != "cuda":
        return 0, cpu_room
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    cached = torch.cuda.memory_reserved(device) - allocated  # (the allocator's, free for this process)
    allowed = total if limit is None else min(limit, total)
    return int(min(free + cached, allowed - allocated) - BASE_COPY_HEADROOM * allowed), cpu_room


def denoiser(pipeline: ComposedPipeline) -> nn.Module:
    """The transformer adapters load into: `transformer` (of Wan2.2 A14B's two experts, the high-noise one)."""
    model = pipeline.modules.get("transformer")
    return model if model is not None else pipeline.transformers[0]

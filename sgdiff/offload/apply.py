"""The one place where config.OffloadConfig changes how a pipeline loads and runs (ModelRunner.load):

1. `load_device`: where the family loads its parts. For components and layers, the CPU: nothing that is
   to be offloaded ever lands on the GPU whole (a model larger than the GPU loads).
2. `place`: what stays on the GPU is moved there (the transformer; under layers, the transformers less
   their repeated blocks), before the speed toggles, which fuse and compile the models where they are.
3. `apply_offload`: the rest gets its CPU home and its hooks (on_demand.py, streaming.py), after the speed
   toggles, so that the weights they made (fused projections) move with their modules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sgdiff.config import OffloadConfig, ParallelConfig, SpeedConfig
from sgdiff.errors import UserError
from sgdiff.offload.on_demand import OnDemand
from sgdiff.offload.resident import ResidentBlocks
from sgdiff.offload.streaming import BlockStreamer
from sgdiff.offload.weights import module_tensors
from sgdiff.pipeline.base import ComposedPipeline
from sgdiff.speed.compile import repeated_blocks


def check_offload(offload: OffloadConfig, speed: SpeedConfig) -> None:
    """Combinations that cannot run, refused before anything loads."""
    mode = offload.cpu_offload
    if mode == "layers" and speed.cuda_graph:
        raise UserError(
            "`cpu_offload` layers copies each block in while the one before it computes, ordered from the host "
            "between blocks, which a CUDA graph cannot replay: drop `cuda_graph` (`torch_compile` works with it)",
            field="cuda_graph",
        )
    if offload.text_encoder_offload and mode != "none":
        raise UserError(
            f"`cpu_offload` {mode} keeps the text encoders off the GPU already: drop `text_encoder_offload`",
            field="text_encoder_offload",
        )
    if offload.offload_prefetch != OffloadConfig.offload_prefetch and mode != "layers":
        raise UserError(
            "`offload_prefetch` is how many blocks `cpu_offload` layers copies ahead: give `cpu_offload` layers too",
            field="offload_prefetch",
        )
    if offload.offload_resident_blocks != OffloadConfig.offload_resident_blocks and mode != "layers":
        raise UserError(
            "`offload_resident_blocks` is how many of the blocks `cpu_offload` layers streams stay on the GPU: "
            "give `cpu_offload` layers too",
            field="offload_resident_blocks",
        )


def check_offload_parallel(offload: OffloadConfig, parallel: ParallelConfig) -> None:
    """`parallel` resolved. Under layers each rank streams its own blocks; sequence parallelism is refused:
    its plans may read block weights outside the blocks' forwards (FLUX's and HunyuanVideo's modulation,
    shared out over the ranks right after the timestep embedding: parallel/modulation.py), when layers has
    them in CPU memory."""
    if offload.cpu_offload == "layers" and (parallel.ulysses_degree or 1) * (parallel.ring_degree or 1) > 1:
        raise UserError(
            "`cpu_offload` layers cannot run with sequence parallelism (`ulysses_degree` or `ring_degree` above 1): "
            "use `enable_cfg_parallel` for several GPUs, or `cpu_offload` components",
            field="cpu_offload",
        )


def load_device(offload: OffloadConfig, device: torch.device) -> torch.device:
    """Where the family loads the parts: the CPU when components or layers will be offloaded."""
    return torch.device("cpu") if offload.cpu_offload != "none" else device


def place(pipeline: ComposedPipeline, offload: OffloadConfig, device: torch.device) -> None:
    """Move onto `device` what stays there under `offload` (the parts were loaded on load_device)."""
    if load_device(offload, device) == device:
        return
    if offload.cpu_offload == "components" and len(pipeline.transformers) == 1:
        pipeline.transformers[0].to(device)
    elif offload.cpu_offload == "layers":
        for model in pipeline.transformers:
            streamed = {id(t) for block in repeated_blocks(model) for t in module_tensors(block)}
            for tensor in module_tensors(model):
                if id(tensor) not in streamed:
                    tensor.data = tensor.data.to(device)


@dataclass
class Offloaded:
    """What apply_offload set up, for the perf dump and tests."""

    config: OffloadConfig
    on_demand: OnDemand
    streamer: BlockStreamer | None

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "cpu_offload": self.config.cpu_offload,
            "text_encoder_offload": self.config.text_encoder_offload,
            "component_loans": self.on_demand.copies,
        }
        if self.streamer is not None:
            report |= {
                "offload_prefetch": self.config.offload_prefetch,
                "blocks_copied": self.streamer.copies,
                "blocks_not_prefetched": self.streamer.waits,
                "block_ring_bytes": self.streamer.ring.nbytes,
                "offload_resident_blocks": self.config.offload_resident_blocks,
                "blocks_kept": self.streamer.kept,
            }
        return report


def apply_offload(
    pipeline: ComposedPipeline,
    offload: OffloadConfig,
    device: torch.device,
    text_encoders: frozenset[str],
    gpu_memory_limit: int | None = None,
) -> Offloaded | None:
    """Give the offloaded parts of a loaded (and placed, and sped up) pipeline their CPU homes and hooks;
    `text_encoders`: the family's names of its text encoders; `gpu_memory_limit`: the process's cap (bytes),
    what `auto` resident blocks fill up to. None where nothing is offloaded."""
    if not offload.offloads:
        return None
    pinned = device.type == "cuda"  # page-locked homes: fast, asynchronous copies to the GPU
    on_demand = OnDemand(device, pinned)
    denoisers = {id(model) for model in pipeline.transformers}
    if offload.text_encoder_offload:
        parts = [model for name, model in pipeline.modules.items() if name in text_encoders]
    else:
        parts = [model for model in pipeline.modules.values() if id(model) not in denoisers]
    for part in distinct(parts):
        on_demand.add_component(part)
    if offload.cpu_offload == "components" and len(pipeline.transformers) > 1:
        on_demand.add_experts(pipeline.transformers)
    streamer = stream_blocks(pipeline.transformers, offload, device, gpu_memory_limit)
    if streamer is not None:
        pipeline.after_stage.append(streamer.release)
    pipeline.after_stage.append(on_demand.stage_finished)
    return Offloaded(offload, on_demand, streamer)


def stream_blocks(
    transformers: list[nn.Module], offload: OffloadConfig, device: torch.device, gpu_memory_limit: int | None = None
) -> BlockStreamer | None:
    """`layers`: the transformers' repeated blocks moved to their CPU homes (from wherever they are) and streamed
    onto `device` when they run; None for another mode or transformers without repeated blocks. The caller
    releases the kept blocks after each stage (BlockStreamer.release)."""
    blocks = [distinct(repeated_blocks(model)) for model in transformers]  # (a block twice: once)
    if offload.cpu_offload != "layers" or not any(blocks):
        return None
    count = offload.resident_count
    keep = ResidentBlocks(count, gpu_memory_limit) if count is None or count > 0 else None
    pinned = device.type == "cuda"
    return BlockStreamer([b for b in blocks if b], device, offload.offload_prefetch, pinned, keep)


def distinct(modules: list[nn.Module]) -> list[nn.Module]:
    return list({id(module): module for module in modules}.values())

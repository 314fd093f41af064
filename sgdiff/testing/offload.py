"""Helpers of the offload tests (sgdiff/offload/): where a module's weights are, and a request on a rank of
a parallel run with an offload mode (a run_on_ranks function: importable by the spawned processes)."""

from __future__ import annotations

import torch
from torch import nn

from sgdiff.config import OffloadConfig
from sgdiff.offload.weights import is_placeholder, module_tensors
from sgdiff.parallel.groups import ParallelGroups


def where(module: nn.Module) -> str:
    """'device' where every tensor of `module` holds its weights, 'home' where every one is a placeholder
    (the weights wait in CPU memory), else 'part' (a transformer whose blocks stream)."""
    empty = [is_placeholder(tensor) for tensor in module_tensors(module)]
    return "home" if all(empty) else "device" if not any(empty) else "part"


def offloaded_parallel_latents(
    groups: ParallelGroups, model: str, prompt: str, flags: dict, offload: OffloadConfig
) -> torch.Tensor:
    """A rank's final latents of one request on a parallel pipeline, loaded under `offload`."""
    from sgdiff.config import RuntimeConfig
    from sgdiff.engine.runner import ModelRunner
    from sgdiff.engine.worker import load_for_rank, make_parallel

    engine = ModelRunner(model, runtime=RuntimeConfig(device="cpu", dtype="fp32", offload=offload))
    load_for_rank(engine, groups)
    with make_parallel(engine, groups):
        latents = engine.generate(engine.sampling_params(prompt, **flags)).latents
    assert latents is not None
    return latents

"""The kernels' warm-up: while a checkpoint loads, a thread runs one forward of small copies of its
models (text encoders of one layer; a transformer of one block of each kind, with the same speed toggles
and attention; uninitialised weights) at the shapes of the request to come. The first call of each
kernel costs far more than the next ones (Triton loads its compiled kernels, CUDA loads the modules of
torch's kernels lazily, cuBLAS and cuDNN pick their plans): about 0.7 s of FLUX.1's first step and
0.4 s of its text encoding on an H100 (docs/benchmark-log.md, run FE), paid here instead, alongside the
reading of the weights."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import torch

from sgdiff.config import SpeedConfig
from sgdiff.models.attention import AttentionImpl, use_attention_impl
from sgdiff.pipeline.base import PipelineEvents
from sgdiff.pipeline.family import ModelFamily
from sgdiff.sampling import SamplingParams
from sgdiff.speed.apply import speed_up_transformer

log = logging.getLogger(__name__)


def warms_up(device: torch.device, speed: SpeedConfig) -> bool:
    """On CUDA GPUs, eager or with CUDA graphs; torch.compile's first calls are its compiling (cached on
    disk, speed/compile.py), which a differently shaped copy would not share."""
    return device.type == "cuda" and not speed.torch_compile


def start_warm_up(
    family: ModelFamily,
    info,
    params: SamplingParams,
    device: torch.device,
    dtype: torch.dtype,
    speed: SpeedConfig,
    attention: AttentionImpl,
    events: PipelineEvents,
) -> threading.Thread:
    """The warm-up on a thread of its own, started, reported as the load stage 'load kernels'; join it
    before the first request runs. A warm-up that fails (e.g. out of memory beside the load) is logged
    and forgotten: the first step pays then."""
    eager = replace(speed, cuda_graph=False)  # the graph's capture is the real model's

    def prepare(model: torch.nn.Module) -> None:
        speed_up_transformer(model, eager, family)

    def warm_up() -> None:
        with use_attention_impl(attention), torch.inference_mode():
            family.warm_up(info, params, device, dtype, prepare)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def run() -> None:
        events.stage_started("load kernels")
        start = time.perf_counter()
        try:
            warm_up()
        except Exception as exc:  # noqa: BLE001 - a warm-up is an optimisation, never the request's failure
            log.warning("the kernels' warm-up failed (%s); the first denoising step pays their first calls", exc)
        events.stage_finished("load kernels", time.perf_counter() - start)

    thread = threading.Thread(target=run, name="sgdiff-warm-up", daemon=True)
    thread.start()
    return thread

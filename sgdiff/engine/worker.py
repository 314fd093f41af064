"""One rank of a multi-GPU run: join the process group, load the model once, make its pipeline
parallel (parallel/), run every prompt; rank 0 writes the outputs and reports progress."""

from __future__ import annotations

import gc
import os
import signal
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from sgdiff.config import RuntimeConfig
from sgdiff.engine.batch import BatchReport, BatchRequest, execute_batch, prepare_batch
from sgdiff.engine.engine import Engine
from sgdiff.errors import Terminated, UserError, raise_terminated
from sgdiff.models.attention import sdpa_attention
from sgdiff.parallel.broadcast import share_from_rank0
from sgdiff.parallel.cfg import apply_cfg_parallel
from sgdiff.parallel.groups import ParallelGroups, build_groups
from sgdiff.parallel.plans import apply_sequence_parallel
from sgdiff.pipeline.base import NullEvents, PipelineEvents

COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # a rank that stops answering ends the run, not hangs it


@dataclass(frozen=True)
class RankSpec:
    rank: int
    world_size: int
    local_rank: int
    init_method: str  # file://... (spawned) or env:// (torchrun)


def rank_device(runtime: RuntimeConfig, local_rank: int) -> torch.device:
    """The rank's device: cuda:LOCAL_RANK unless the request runs on the CPU."""
    if runtime.device is not None and torch.device(runtime.device).type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if runtime.device is not None:
            raise UserError(f"--device {runtime.device}: no CUDA GPU is visible; use --device cpu")
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def load_for_rank(engine: Engine, groups: ParallelGroups) -> None:
    """Rank 0 loads everything; the others skip the text encoders (rank 0 sends them the embeddings)."""
    engine.load(skip=frozenset() if groups.rank == 0 else engine.info.spec.text_encoders)


@contextmanager
def make_parallel(engine: Engine, groups: ParallelGroups) -> Iterator[None]:
    """Apply CFG and sequence parallelism to the loaded pipeline for the requests run in the context."""
    pipeline = engine.pipeline
    pipeline.rank = groups.rank
    pipeline.share = lambda state, fields: share_from_rank0(state, fields, groups.rank)
    if groups.config.enable_cfg_parallel:
        apply_cfg_parallel(pipeline, groups)
    if groups.sp_degree == 1:
        yield
        return
    single = pipeline.attention
    pipeline.attention = apply_sequence_parallel(pipeline.transformers, groups, inner=single or sdpa_attention)
    try:
        yield
    finally:
        pipeline.attention.remove()
        pipeline.attention = single


def run_rank(spec: RankSpec, request: BatchRequest, events: PipelineEvents, on_saved) -> BatchReport:
    device = rank_device(request.runtime, spec.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=spec.init_method,
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=COLLECTIVE_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
    try:
        report = run_batch_on_rank(spec, request, device, events, on_saved)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the last graph replay has ended
        return report
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # the batch's objects go with its frames (below)
        raise
    finally:
        # Every object of the batch is gone before the process group: a CUDA graph that captured NCCL
        # collectives (--enable-cuda-graph) and is still alive makes ncclCommDestroy wait forever
        # (pytorch/pytorch#115388). A module and the graph wrapper that replaced its forward refer to
        # each other (a cycle): collect them.
        gc.collect()
        dist.destroy_process_group()


def run_batch_on_rank(
    spec: RankSpec, request: BatchRequest, device: torch.device, events: PipelineEvents, on_saved
) -> BatchReport:
    """Load the model, make it parallel, run every prompt (rank 0 writes and reports)."""
    groups = build_groups(replace(request.parallel, num_gpus=spec.world_size))
    writer = spec.rank == 0
    runtime = replace(request.runtime, device=str(device))
    prepared = prepare_batch(request, events if writer else NullEvents(), runtime)
    load_for_rank(prepared.engine, groups)
    return execute_batch(
        prepared,
        request,
        on_saved if writer else (lambda path: None),
        setup=lambda engine: make_parallel(engine, groups),
        writer=writer,
    )


class QueueEvents:
    """Rank 0's progress, sent to the launching process (which draws it)."""

    def __init__(self, queue: Any):
        self.queue = queue

    def stage_started(self, name: str) -> None:
        self.queue.put(("event", "stage_started", (name,)))

    def stage_finished(self, name: str, seconds: float) -> None:
        self.queue.put(("event", "stage_finished", (name, seconds)))

    def step_finished(self, index: int, total: int, seconds: float) -> None:
        self.queue.put(("event", "step_finished", (index, total, seconds)))


def stripped(report: BatchReport) -> BatchReport:
    """The report without pixels or latents (written already; the launcher needs numbers). A tensor would
    also travel as a shared-memory handle that dies with this process."""
    return replace(report, results=[replace(r, images=None, videos=None, latents=None) for r in report.results])


def spawned_worker(spec: RankSpec, inbox: Any, queue: Any) -> None:
    """Entry point of a process the launcher spawned: never a traceback, always a message or a report.
    Its request arrives on `inbox` (a pipe's reading end), its messages go to `queue`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle: it ends every rank
    if hasattr(signal, "pthread_sigmask"):  # (POSIX) blocked while the launcher started this process
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGTERM, raise_terminated)  # the launcher stops ranks so: undo a half-written file
    die_with_parent()
    try:
        request: BatchRequest = inbox.recv()
        inbox.close()
        report = run_rank(spec, request, QueueEvents(queue), lambda path: queue.put(("saved", str(path))))
        if spec.rank == 0:
            queue.put(("done", stripped(report)))
    except Terminated:  # what was half done is undone (the exception passed through it): now end as SIGTERM ends
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise SystemExit(128 + signal.SIGTERM) from None  # (should the signal not have ended it yet)
    except BaseException as exc:  # noqa: BLE001 - reported to the launcher, which ends the run
        user_error = isinstance(exc, UserError)
        if os.environ.get("SGDIFF_DEBUG", "") not in ("", "0") and not user_error:
            traceback.print_exc()
        message = str(exc) if user_error else f"{type(exc).__name__}: {exc}"
        queue.put(("error", spec.rank, message, user_error))
        queue.close()
        queue.join_thread()
        raise SystemExit(1) from None


def die_with_parent() -> None:
    """Linux: the kernel kills this process when the launcher dies, however it dies."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

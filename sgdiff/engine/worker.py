"""One rank of an engine on several GPUs (or CPU processes): join the process group, load the model
once, make its pipeline parallel (parallel/), then serve the front's requests until it stops the
engine; rank 0 reports progress and results to the front."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from sgdiff.config import EngineConfig, RuntimeConfig
from sgdiff.engine.runner import ModelRunner
from sgdiff.engine.serve import ControlChannel, ForwardedEvents, Inbox, Outbox, describe, serve_requests
from sgdiff.errors import Terminated, UserError, raise_on_sigterm
from sgdiff.models.attention import sdpa_attention
from sgdiff.parallel.broadcast import share_from_rank0
from sgdiff.parallel.cfg import apply_cfg_parallel
from sgdiff.parallel.groups import ParallelGroups, build_groups
from sgdiff.parallel.plans import apply_sequence_parallel
from sgdiff.parallel.vae import apply_vae_parallel
from sgdiff.pipeline.base import NullEvents
from sgdiff.sampling import SamplingParams

PARENT_CHECK_SECONDS = 0.2  # how often a spawned worker looks whether its front still runs
COLLECTIVE_TIMEOUT = timedelta(minutes=10)  # a rank that stops answering ends the run, not hangs it


@dataclass(frozen=True)
class RankSpec:
    rank: int
    world_size: int
    local_rank: int
    init_method: str  # file://... (spawned) or env:// (torchrun)
    parent_pid: int | None = None  # the front that spawned this rank (None: torchrun's)
    leftovers: str | None = None  # a file of the front's for its workers (the rendezvous), removed should it die


def rank_device(runtime: RuntimeConfig, local_rank: int) -> torch.device:
    """The rank's device: cuda:LOCAL_RANK unless the request runs on the CPU."""
    if runtime.device is not None and torch.device(runtime.device).type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if runtime.device is not None:
            raise UserError(f"`device` {runtime.device}: no CUDA GPU is visible; use `device` cpu", field="device")
        return torch.device("cpu")
    return torch.device("cuda", local_rank)


def load_for_rank(runner: ModelRunner, groups: ParallelGroups, ahead: Sequence[SamplingParams] = ()) -> None:
    """Rank 0 loads everything; the others skip the text encoders (rank 0 sends them the embeddings).
    `ahead`: the first requests to come, whose prompts rank 0 encodes while its transformer still loads."""
    if groups.rank == 0:
        runner.load(encode_ahead=ahead)
    else:
        runner.load(skip=runner.family.text_encoders)


@contextmanager
def make_parallel(runner: ModelRunner, groups: ParallelGroups) -> Iterator[None]:
    """Apply CFG and sequence parallelism, and the VAE's tiles over the ranks, to the loaded pipeline for
    the requests run in the context."""
    pipeline = runner.pipeline
    assert pipeline is not None  # (loaded: load_for_rank)
    pipeline.rank = groups.rank
    pipeline.share = lambda state, fields: share_from_rank0(state, fields, groups.rank)
    if groups.config.enable_cfg_parallel:
        apply_cfg_parallel(pipeline, groups)
    undo_vae = apply_vae_parallel(pipeline, groups)
    single = pipeline.attention
    sharded = None
    if groups.sp_degree > 1:
        sharded = apply_sequence_parallel(pipeline.transformers, runner.family, groups, inner=single or sdpa_attention)
        pipeline.attention = sharded
    try:
        yield
    finally:
        if sharded is not None:
            sharded.remove()
            pipeline.attention = single
        undo_vae()


@contextmanager
def process_group(spec: RankSpec, runtime: RuntimeConfig) -> Iterator[torch.device]:
    """Join the process group on this rank's device; leave it on the way out, after every object
    made inside (the model, its CUDA graphs) is gone."""
    device = rank_device(runtime, spec.local_rank)
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
        yield device
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the last graph replay has ended
    except BaseException as exc:
        traceback.clear_frames(exc.__traceback__)  # the model's objects go with its frames (below)
        raise
    finally:
        # Every object of the model is gone before the process group: a CUDA graph that captured NCCL
        # collectives (--enable-cuda-graph) and is still alive makes ncclCommDestroy wait forever
        # (pytorch/pytorch#115388). A module and the graph wrapper that replaced its forward refer to
        # each other (a cycle): collect them.
        gc.collect()
        dist.destroy_process_group()


def serve_on_rank(
    spec: RankSpec, config: EngineConfig, inbox: Inbox | None, outbox: Outbox, ahead: Sequence[SamplingParams] = ()
) -> None:
    """One rank of an engine on several processes: join the group, load, make the pipeline parallel,
    then serve requests until rank 0 (which has the `inbox`) passes on the front's stop. `ahead`: rank 0's
    first requests to come, their prompts encoded while it loads."""
    with process_group(spec, config.runtime) as device:
        serve_loaded(spec, config, device, inbox, outbox, ahead)


def serve_loaded(
    spec: RankSpec,
    config: EngineConfig,
    device: torch.device,
    inbox: Inbox | None,
    outbox,
    ahead: Sequence[SamplingParams] = (),
) -> None:
    groups = build_groups(replace(config.parallel, num_gpus=spec.world_size))
    control = ControlChannel()
    runtime = replace(config.runtime, device=str(device))
    load_events = ForwardedEvents(outbox, None) if inbox is not None else NullEvents()
    runner = ModelRunner(config.model_path, config.preset, runtime, load_events, config.revision)
    load_for_rank(runner, groups, ahead)
    control.barrier()  # every rank has loaded
    with make_parallel(runner, groups):
        if inbox is not None:
            outbox.put(("ready", None, runner.load_seconds))
        serve_requests(runner, control, inbox, outbox)


class ProcessOutbox:
    """Rank 0's messages to the front process, through a multiprocessing queue. A result travels
    without its latents: a tensor would travel as a shared-memory handle that dies with this process."""

    def __init__(self, queue: Any):
        self.queue = queue

    def put(self, message: tuple) -> None:
        if message[0] == "done":
            message = (*message[:2], replace(message[2], latents=None))
        self.queue.put(message)


def read_front(connection: Any, inbox: Inbox) -> None:
    """Rank 0's reader of the front's pipe (a thread): a closed pipe (the front is gone) means stop."""
    try:
        while True:
            inbox.put(connection.recv())
    except (EOFError, OSError):
        inbox.put(("stop",))


def pool_worker(
    spec: RankSpec, config: EngineConfig, connection: Any, queue: Any, ahead: Sequence[SamplingParams] = ()
) -> None:
    """Entry point of a process of the engine's worker pool: never a traceback, always a message.
    Rank 0 reads the front's messages from `connection` (a pipe's reading end; None on the other
    ranks); its reports, and any rank's fatal error, go to `queue`. `ahead`: rank 0's first requests
    to come (their prompts encoded while it loads)."""
    try:
        serve_in_pool(spec, config, connection, queue, ahead)
    except Terminated:  # the front's SIGTERM, landing inside a handler below (e.g. while this rank reports
        # the error another rank reported first): end as SIGTERM ends, without multiprocessing's traceback
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise SystemExit(128 + signal.SIGTERM) from None


def serve_in_pool(
    spec: RankSpec, config: EngineConfig, connection: Any, queue: Any, ahead: Sequence[SamplingParams]
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the front's to handle: it ends every rank
    if hasattr(signal, "pthread_sigmask"):  # (POSIX) blocked while the front started this process
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    raise_on_sigterm()  # the front stops ranks so
    die_with_parent(spec.parent_pid, spec.leftovers)
    try:
        inbox = None
        if connection is not None:
            inbox = Inbox()
            threading.Thread(target=read_front, args=(connection, inbox), daemon=True).start()
        serve_on_rank(spec, config, inbox, ProcessOutbox(queue), ahead)
        # Served and stopped: nothing is left half done. Should leaving take longer than the front's
        # grace period (torch.compile's worker processes are shut down at exit), its SIGTERM just ends
        # this process, without a traceback from inside an exit handler.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except Terminated:  # what was half done is undone (the exception passed through it): now end as SIGTERM ends
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        raise SystemExit(128 + signal.SIGTERM) from None  # (should the signal not have ended it yet)
    except BaseException as exc:  # noqa: BLE001 - reported to the front, which ends the pool
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the front, told by another rank, may end this one now
        user_error = isinstance(exc, UserError)
        if os.environ.get("SGDIFF_DEBUG", "") not in ("", "0") and not user_error:
            traceback.print_exc()
        queue.put(("fatal", None, spec.rank, exc if user_error else describe(exc)))
        queue.close()
        queue.join_thread()
        raise SystemExit(1) from None


def die_with_parent(parent_pid: int | None, leftovers: str | None) -> None:
    """End this worker when the front process is gone, however it ended (SIGKILL and the OOM killer
    included) and whatever this process is doing at the time (starting up, inside a collective): a
    thread watches for it, removes what was made for the workers (`leftovers`, the rendezvous file) and
    kills this process. None: a torchrun rank, whose agent watches it."""
    if parent_pid is None:
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_CHECK_SECONDS)
        if leftovers is not None:
            remove_once_ended(os.getpid(), leftovers)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="sgdiff-parent-watch", daemon=True).start()


# What remove_once_ended runs: a fresh interpreter (no site, no sgdiff) that waits for its parent to end
REMOVER = (
    "import os, sys, time\n"
    "pid, path = int(sys.argv[1]), sys.argv[2]\n"
    "while os.getppid() == pid:\n"
    "    time.sleep(0.02)\n"
    "try:\n"
    "    os.unlink(path)\n"
    "except FileNotFoundError:\n"
    "    pass\n"
)


def remove_once_ended(pid: int, path: str) -> None:
    """Remove `path` once process `pid` (this one, about to be killed) has ended. Not before: its other
    threads may be inside the rendezvous store, which creates the file again on each access, right up to
    the kill. A child interpreter waits for it (started by fork and exec at once, as subprocess does: no
    copy of this multi-threaded process runs Python; no descriptor of this one is kept, so no pipe of a
    caller's stays open); each worker's child removes the file after its own worker ended, so the last
    removal comes after the last worker that could make it."""
    subprocess.Popen(
        [sys.executable, "-S", "-c", REMOVER, str(pid), path],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
    )

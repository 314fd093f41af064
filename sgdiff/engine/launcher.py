"""Start one worker process per GPU (torch.multiprocessing), relay rank 0's progress and saved paths,
and end every process when one fails, dies or the user presses Ctrl-C. Under torchrun no process is
started: this process is one rank, and the ranks come from torchrun's environment."""

from __future__ import annotations

import os
import queue as queues
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from sgdiff.engine.batch import BatchReport, BatchRequest, prepare_batch
from sgdiff.engine.ranks import under_torchrun
from sgdiff.engine.worker import RankSpec, run_rank, spawned_worker
from sgdiff.errors import UserError, WorkerFailure
from sgdiff.parallel.plans import check_heads
from sgdiff.pipeline.base import NullEvents, PipelineEvents

GRACE_SECONDS = 3.0  # between asking a worker to stop (SIGTERM) and killing it


def launch(request: BatchRequest, events: PipelineEvents, on_saved: Callable[[Path], None]) -> BatchReport:
    if under_torchrun():
        return run_torchrun_rank(request, events, on_saved)
    config = request.parallel.resolved()
    prepared = prepare_batch(request, NullEvents())  # the whole request is checked before any process starts
    heads = prepared.engine.info.transformer_config.get("num_attention_heads", 1)
    check_heads(heads, config.ulysses_degree, config.ring_degree)
    check_devices(request, config.num_gpus)
    return run_spawned(request, config.num_gpus, events, on_saved)


def run_torchrun_rank(request: BatchRequest, events: PipelineEvents, on_saved) -> BatchReport:
    world = int(os.environ["WORLD_SIZE"])
    if request.parallel.num_gpus not in (1, world):
        raise UserError(f"--num-gpus {request.parallel.num_gpus} but torchrun started {world} processes")
    spec = RankSpec(int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]), "env://")
    return run_rank(spec, request, events, on_saved)


def check_devices(request: BatchRequest, num_gpus: int) -> None:
    device = request.runtime.device
    if device is not None and torch.device(device).type == "cpu":
        return  # --device cpu --num-gpus N: N CPU processes
    if device is not None and torch.device(device).index is not None:
        raise UserError(f"--device {device} names one GPU; with --num-gpus give --device cuda (ranks use cuda:0..N-1)")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < num_gpus:
        raise UserError(
            f"--num-gpus {num_gpus} but {visible} CUDA GPU(s) are visible (for CPU processes: --device cpu)"
        )


def run_spawned(request: BatchRequest, world: int, events: PipelineEvents, on_saved) -> BatchReport:
    context = torch.multiprocessing.get_context("spawn")
    messages = context.Queue()
    # The request follows each worker's start down a pipe of its own, written by a thread: a spawned
    # process's start-up data goes down a pipe that start() blocks on until the process has read it
    # all (a big --prompt-file is megabytes), so a worker dying while starting would hang the launcher.
    inboxes = [context.Pipe(duplex=False) for _ in range(world)]  # (the worker's end, the launcher's)
    rendezvous = Path(tempfile.mkdtemp(prefix="sgdiff-"))
    init = f"file://{rendezvous / 'store'}"
    workers = [
        context.Process(target=spawned_worker, args=(RankSpec(rank, world, rank, init), inbox, messages))
        for rank, (inbox, _) in enumerate(inboxes)
    ]
    try:
        with interrupts_deferred():
            for worker in workers:
                worker.start()
        for inbox, outbox in inboxes:
            inbox.close()  # the worker has its own copy: if it dies, the send fails instead of blocking
            threading.Thread(target=send_quietly, args=(outbox, request), daemon=True).start()
        report = relay(workers, messages, events, on_saved)
    except BaseException:
        stop(workers, graceful=False)
        raise
    finally:
        shutil.rmtree(rendezvous, ignore_errors=True)
    stop(workers, graceful=True)
    return report


def send_quietly(connection, request: BatchRequest) -> None:
    """Send a worker its request; a worker that died before reading it is the relay's to report."""
    try:
        connection.send(request)
    except OSError:
        pass
    finally:
        connection.close()


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """While workers start: a Ctrl-C waits until they have (then it is raised here), and they begin
    with SIGINT blocked until spawned_worker ignores it. Ctrl-C in a terminal reaches every process of
    the group, and a worker still importing would print a KeyboardInterrupt traceback; an interrupted
    start() would leave a worker reading half its start-up data."""
    main_thread = threading.current_thread() is threading.main_thread()
    if not (main_thread and hasattr(signal, "pthread_sigmask") and signal.getsignal(signal.SIGINT) is not None):
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})  # what the started processes inherit
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def relay(workers, messages, events: PipelineEvents, on_saved) -> BatchReport:
    """Pass rank 0's messages on until its report arrives; any error or death ends the run."""
    while True:
        try:
            message = messages.get(timeout=0.1)
        except queues.Empty:
            message = None
        if message is None:
            ended = [(rank, w.exitcode) for rank, w in enumerate(workers) if w.exitcode not in (None, 0)]
            if not ended:
                continue
            raise_if_killed(workers)
            try:  # a worker that failed sent its error before exiting: read it
                message = messages.get(timeout=1.0)
            except queues.Empty:
                rank, code = ended[0]
                raise WorkerFailure(f"worker {rank} {describe_exit(code)}; every worker was stopped") from None
        kind = message[0]
        if kind == "event":
            getattr(events, message[1])(*message[2])
        elif kind == "saved":
            on_saved(Path(message[1]))
        elif kind == "done":
            return message[1]
        elif kind == "error":
            _, rank, text, user_error = message
            if user_error:
                raise UserError(text)
            raise_if_killed(workers, wait=1.0)  # a peer's death first shows up here as a broken collective
            raise WorkerFailure(f"worker {rank}: {text}")


def raise_if_killed(workers, wait: float = 0.0) -> None:
    """A worker killed by a signal is the cause to report; `wait`: how long to watch for one."""
    deadline = time.monotonic() + wait
    while True:
        for rank, worker in enumerate(workers):
            if worker.exitcode is not None and worker.exitcode < 0:
                raise WorkerFailure(f"worker {rank} {describe_exit(worker.exitcode)}; every worker was stopped")
        if time.monotonic() >= deadline:
            return
        time.sleep(0.05)


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def stop(workers, graceful: bool) -> None:
    """Every worker ends: after a run, each gets a grace period to exit on its own; then (or at once,
    after a failure) SIGTERM, and SIGKILL for any still there after the grace period."""
    deadline = time.monotonic() + (GRACE_SECONDS if graceful else 0.0)
    for worker in workers:
        if worker.is_alive() and worker.pid is not None:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))
    for worker in workers:
        if worker.is_alive():
            worker.terminate()
    for worker in workers:
        if worker.pid is None:
            continue  # never started
        worker.join(timeout=GRACE_SECONDS)
        if worker.is_alive():
            worker.kill()
            worker.join()

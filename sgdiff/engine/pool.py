"""An engine's persistent worker pool: one process per GPU (torch.multiprocessing, spawn), started
once, loaded once, serving requests until closed. Rank 0 takes the front's messages down a pipe and
reports back through a queue; a thread here reads that queue, and sees a worker die. A worker that
fails or dies fails the request in hand with one line naming it, every worker is stopped, and the
pool says why it is unhealthy."""

from __future__ import annotations

import os
import queue as queues
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from sgdiff.bytecode import shared_with_children
from sgdiff.config import EngineConfig
from sgdiff.engine.dispatch import BatchKey, Dispatcher, never_batched
from sgdiff.engine.worker import RankSpec, pool_worker
from sgdiff.errors import UserError, WorkerFailure
from sgdiff.pipeline.base import PipelineEvents
from sgdiff.sampling import SamplingParams

GRACE_SECONDS = 3.0  # between asking a worker to stop (SIGTERM) and killing it
KILLED_WAIT_SECONDS = 1.0  # after a worker's error: how long to look for a peer killed by a signal, the cause


class WorkerPool:
    def __init__(
        self,
        config: EngineConfig,
        load_events: PipelineEvents,
        batch_key: BatchKey | None = None,
        encode_ahead: Sequence[SamplingParams] = (),
    ):
        """`batch_key`: which requests may share a batch (the model family's; None: never batched).
        `encode_ahead`: the first requests to come, whose prompts rank 0 encodes while it loads."""
        self.config = config
        self.encode_ahead = tuple(encode_ahead)
        self.world = config.parallel.num_gpus
        self.dispatcher = Dispatcher(self._send, load_events, config.batching, batch_key or never_batched)
        self.load_seconds = 0.0
        self.workers: list = []
        self._error: Exception | None = None  # why the pool stopped
        self._ready = threading.Event()
        self._closing = False
        self._connection: Connection | None = None  # the pipe to rank 0, made by start()
        self._sending = threading.Lock()  # a pipe's send is not thread-safe: callers, the reader, close()
        self._rendezvous: Path | None = None
        self._reader: threading.Thread | None = None
        self._messages: Any = None

    def start(self) -> None:
        """Start every worker and wait until all have loaded; a worker's failure is raised here."""
        context = torch.multiprocessing.get_context("spawn")
        self._messages = context.Queue()
        reading, self._connection = context.Pipe(duplex=False)
        # the workers' rendezvous: a file the first of them creates (a worker that never gets that far
        # leaves nothing), removed by close() or, should this process die, by the workers' watchdogs
        self._rendezvous = Path(tempfile.gettempdir()) / f"sgdiff-{secrets.token_hex(8)}.store"
        init = f"file://{self._rendezvous}"
        self.workers = [
            context.Process(
                target=pool_worker,
                args=(
                    RankSpec(rank, self.world, rank, init, os.getpid(), str(self._rendezvous)),
                    self.config,
                    reading if rank == 0 else None,
                    self._messages,
                    self.encode_ahead if rank == 0 else (),
                ),
            )
            for rank in range(self.world)
        ]
        try:
            with interrupts_deferred(), shared_with_children():
                for worker in self.workers:
                    worker.start()
            reading.close()  # rank 0 has its own copy: if it dies, a send fails instead of blocking
            self._reader = threading.Thread(target=self._read, name="sgdiff-pool-reader", daemon=True)
            self._reader.start()
            while not self._ready.wait(0.1):
                if self._error is not None:
                    raise self._error
        except BaseException:
            self.close(graceful=False)
            raise

    def health(self) -> str | None:
        """None while the pool can serve; else why not."""
        return self.dispatcher.failure

    def close(self, graceful: bool = True) -> None:
        """Cancel what is queued or running and stop every worker: given the grace period to finish
        the step in hand and leave, then SIGTERM, then SIGKILL."""
        if self._closing:
            return
        self._closing = True
        self.dispatcher.cancel_all()
        self._send(("stop",))
        stop(self.workers, graceful=graceful and self._error is None)
        self.dispatcher.close()
        if self._connection is not None:
            with self._sending:
                self._connection.close()
        if self._rendezvous is not None:
            self._rendezvous.unlink(missing_ok=True)
        self._release_queue()

    def _release_queue(self) -> None:
        """Close the workers' queue once its reader has left, and drop it: its three named semaphores are
        unlinked now. Left to the interpreter's exit, which `sgdiff generate` skips (cli/main.py), they
        would make multiprocessing's resource tracker warn of 'leaked semaphore objects' on stderr."""
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=1.0)
        if self._messages is not None and (self._reader is None or not self._reader.is_alive()):
            self._messages.close()
            self._messages = None

    def _send(self, message: tuple) -> None:
        if self._connection is None:  # a start() that failed before making the pipe: nothing to tell
            return
        try:
            with self._sending:
                self._connection.send(message)
        except (OSError, ValueError):
            pass  # rank 0 is gone (or the pipe closed): the reader reports why

    def _read(self) -> None:
        """The front's reader of the workers' queue: news to the dispatcher, failures end the pool."""
        while not self._closing:
            try:
                message = self._messages.get(timeout=0.1)
            except queues.Empty:
                ended = [(rank, w.exitcode) for rank, w in enumerate(self.workers) if w.exitcode not in (None, 0)]
                if ended:
                    self._fail(self._exit_error(ended))
                    return
                continue
            except (EOFError, OSError):
                return
            kind = message[0]
            if kind == "ready":
                self.load_seconds = message[2]
                self._ready.set()
            elif kind == "fatal":
                self._fail(self._fatal_error(*message[2:]))
                return
            else:
                self.dispatcher.put(message)

    def _exit_error(self, ended: list[tuple[int, int]]) -> Exception:
        killed = self._killed_peer(wait=0.0)
        if killed is not None:
            return killed
        try:  # a worker that failed sent its error before exiting: read it
            message = self._messages.get(timeout=1.0)
            if message[0] == "fatal":
                return self._fatal_error(*message[2:], wait=0.0)  # type: ignore[misc]  # (rank, error)
        except (queues.Empty, EOFError, OSError):
            pass
        rank, code = ended[0]
        return WorkerFailure(f"worker {rank} {describe_exit(code)}; every worker was stopped")

    def _fatal_error(self, rank: int, error: UserError | str, wait: float = KILLED_WAIT_SECONDS) -> Exception:
        """What a worker's fatal message means: the caller's error, a peer killed by a signal (the
        cause of the others' broken collectives), or the worker's own failure."""
        if isinstance(error, UserError):
            return error
        return self._killed_peer(wait) or WorkerFailure(f"worker {rank}: {error}")

    def _killed_peer(self, wait: float = KILLED_WAIT_SECONDS) -> WorkerFailure | None:
        """A worker killed by a signal is the cause to report (a peer's death first shows up in the
        others as a broken collective); `wait`: how long to watch for one."""
        deadline = time.monotonic() + wait
        while True:
            for rank, worker in enumerate(self.workers):
                if worker.exitcode is not None and worker.exitcode < 0:
                    return WorkerFailure(f"worker {rank} {describe_exit(worker.exitcode)}; every worker was stopped")
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _fail(self, error: Exception) -> None:
        self._error = error
        stop(self.workers, graceful=False)
        self.dispatcher.fail_all(error)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """While workers start: a Ctrl-C waits until they have (then it is raised here), and they begin
    with SIGINT blocked until pool_worker ignores it. Ctrl-C in a terminal reaches every process of
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


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def stop(workers, graceful: bool) -> None:
    """Every worker ends: each gets a grace period to exit on its own (`graceful`); then (or at once)
    SIGTERM, and SIGKILL for any still there after the grace period."""
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

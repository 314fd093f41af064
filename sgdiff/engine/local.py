"""Executors that run the model on a thread of the caller's process: one GPU (or the CPU), or rank 0
of a torchrun launch (the other ranks follow it, serve.py)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from sgdiff.config import BatchingConfig, EngineConfig
from sgdiff.engine.dispatch import BatchKey, Dispatcher
from sgdiff.engine.runner import ModelRunner
from sgdiff.engine.serve import Inbox, OneRank, Silent, describe, serve_requests
from sgdiff.errors import UserError, WorkerFailure
from sgdiff.pipeline.base import PipelineEvents
from sgdiff.sampling import SamplingParams

if TYPE_CHECKING:  # (worker.py brings torch.distributed and parallel/: imported by the torchrun paths only)
    from sgdiff.engine.worker import RankSpec

STOP_WAIT_SECONDS = 30.0  # closing: how long to wait for the request in hand to reach its next step


class LocalExecutor:
    """One process: start() loads the model in the caller's thread (Ctrl-C and errors reach the caller
    as they happen), then a thread serves the requests. Any batch's error fails that batch alone."""

    def __init__(
        self,
        runner: ModelRunner,
        batching: BatchingConfig = BatchingConfig(),
        warm_up: SamplingParams | None = None,
        encode_ahead: Sequence[SamplingParams] = (),
    ):
        self.runner = runner
        self.warm_up = warm_up  # a request like those to come: the kernels warm up at its shapes while loading
        self.encode_ahead = encode_ahead  # requests to come: their prompts are encoded while the model loads
        self.inbox = Inbox()
        self.dispatcher = Dispatcher(self.inbox.put, runner.events, batching, runner.batch_key)
        self.thread: threading.Thread | None = None

    @property
    def load_seconds(self) -> float:
        return self.runner.load_seconds

    def start(self) -> None:
        self.runner.load(warm_up=self.warm_up, encode_ahead=self.encode_ahead)
        self.thread = threading.Thread(
            target=serve_requests,
            args=(self.runner, OneRank(), self.inbox, self.dispatcher, (Exception,)),
            name="sgdiff-engine",
            daemon=True,
        )
        self.thread.start()

    def health(self) -> str | None:
        return self.dispatcher.failure

    def close(self, graceful: bool = True) -> None:
        stop_serving(self.dispatcher, self.inbox, self.thread, graceful)


class TorchrunRankExecutor:
    """Rank 0 of a torchrun launch, in the process that took the request: a thread joins the process
    group, loads, and serves; the other ranks run `follow_torchrun` in their main thread."""

    def __init__(self, config: EngineConfig, spec: RankSpec, load_events: PipelineEvents, batch_key: BatchKey):
        self.config, self.spec = config, spec
        self.inbox = Inbox()
        self.dispatcher = Dispatcher(self.inbox.put, load_events, config.batching, batch_key)
        self.load_seconds = 0.0
        self.thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: Exception | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._serve, name="sgdiff-rank0", daemon=True)
        self.thread.start()
        while not self._ready.wait(0.1):
            pass
        if self._error is not None:
            raise self._error

    def put(self, message: tuple) -> None:
        """Rank 0's outbox: loading done, or news for the dispatcher."""
        if message[0] == "ready":
            self.load_seconds = message[2]
            self._ready.set()
        else:
            self.dispatcher.put(message)

    def _serve(self) -> None:
        try:
            from sgdiff.engine.worker import serve_on_rank

            serve_on_rank(self.spec, self.config, self.inbox, self)
        except Exception as exc:  # noqa: BLE001 - this rank can serve no more: say why to every caller
            self._error = exc if isinstance(exc, UserError) else WorkerFailure(f"rank 0: {describe(exc)}")
            self.dispatcher.fail_all(self._error)
        finally:
            self._ready.set()

    def health(self) -> str | None:
        return self.dispatcher.failure

    def close(self, graceful: bool = True) -> None:
        stop_serving(self.dispatcher, self.inbox, self.thread, graceful)


def follow_torchrun(config: EngineConfig, spec: RankSpec) -> None:
    """A torchrun rank other than 0: load, then run rank 0's requests with it until it stops."""
    from sgdiff.engine.worker import serve_on_rank

    serve_on_rank(spec, config, None, Silent())


def stop_serving(dispatcher: Dispatcher, inbox: Inbox, thread: threading.Thread | None, graceful: bool = True) -> None:
    """Cancel what is queued or running and tell the serving thread to stop; wait for it a while when
    `graceful` (not on the way out of Ctrl-C, SIGTERM or an error: one kernel of a huge request can run
    for minutes, and the daemon thread stops at its next step, or with the process)."""
    dispatcher.cancel_all()
    inbox.put(("stop",))
    if thread is not None and graceful:
        thread.join(timeout=STOP_WAIT_SECONDS)
    dispatcher.close()

"""The front's side of an executor: requests wait in submission order, one runs at a time, and what
the executor reports (progress, results, failures) reaches each request's handle.

Front -> executor messages: ("run", id, params, inputs), ("cancel", id), ("stop",).
Executor -> front messages (serve.py sends them): ("event", None, kind, args) while loading,
("started", id), ("event", id, kind, args), ("done", id, result), ("cancelled", id),
("failed", id, UserError or text)."""

from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from collections.abc import Callable

from sgdiff.engine.handle import ProgressEvent, RequestHandle, RequestStatus
from sgdiff.errors import RequestFailed, UserError, WorkerFailure
from sgdiff.pipeline.base import NullEvents, PipelineEvents
from sgdiff.sampling import SamplingParams


class Dispatcher:
    """`send(message)` hands a message to the executor (it must not block for long)."""

    def __init__(self, send: Callable[[tuple], None], load_events: PipelineEvents | None = None):
        self._send = send
        self._load_events = load_events or NullEvents()
        self._lock = threading.RLock()
        self._queue: deque[RequestHandle] = deque()
        self._running: RequestHandle | None = None
        self._inputs: dict[str, dict[str, bytes]] = {}  # of the queued requests, by id
        self._ids = itertools.count()
        self._prefix = f"req-{os.getpid():x}-"
        self.failure: str | None = None  # why the executor can take no more requests

    def submit(self, params: SamplingParams, inputs: dict[str, bytes] | None = None) -> RequestHandle:
        """Queue a request; `inputs`: the bytes of its input files by path (sent along with it)."""
        handle = RequestHandle(f"{self._prefix}{next(self._ids)}", params, self.cancel)
        with self._lock:
            if self.failure is not None:
                raise WorkerFailure(f"the engine cannot take requests: {self.failure}")
            self._queue.append(handle)
            self._inputs[handle.id] = inputs or {}
            self._dispatch_next()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            if handle in self._queue:
                self._queue.remove(handle)
                self._inputs.pop(handle.id, None)
                handle._finish(RequestStatus.CANCELLED)
            elif handle is self._running:
                self._send(("cancel", handle.id))

    def pending(self) -> int:
        """Requests queued or running."""
        with self._lock:
            return len(self._queue) + (self._running is not None)

    def put(self, message: tuple) -> None:
        """A message from the executor (any thread): a request's news, or loading's progress (id None)."""
        kind, request_id, *rest = message
        if request_id is None and kind == "event":
            ProgressEvent(*rest).replay(self._load_events)
            return
        with self._lock:
            handle = self._running
            if handle is None or handle.id != request_id:
                return  # (a request already failed by fail_all)
            if kind == "started":
                handle._set_running()
            elif kind == "event":
                handle._add_event(ProgressEvent(*rest))
            else:
                if kind == "done":
                    handle._finish(RequestStatus.COMPLETED, result=rest[0])
                elif kind == "cancelled":
                    handle._finish(RequestStatus.CANCELLED)
                else:  # "failed": the UserError itself, or what went wrong as text
                    error = rest[0] if isinstance(rest[0], UserError) else RequestFailed(rest[0])
                    handle._finish(RequestStatus.FAILED, error=error)
                self._running = None
                self._dispatch_next()

    def cancel_all(self) -> None:
        with self._lock:
            for handle in [*self._queue, *([self._running] if self._running else [])]:
                self.cancel(handle)

    def close(self) -> None:
        """The engine is closing: whatever is still queued or running ends as cancelled."""
        with self._lock:
            self.failure = self.failure or "the engine is closed"
            handles = [*([self._running] if self._running else []), *self._queue]
            self._queue.clear()
            self._inputs.clear()
            self._running = None
        for handle in handles:
            handle._finish(RequestStatus.CANCELLED)

    def fail_all(self, error: Exception) -> None:
        """The executor is gone: every request still queued or running fails with `error`."""
        with self._lock:
            self.failure = str(error)
            handles = [*([self._running] if self._running else []), *self._queue]
            self._queue.clear()
            self._inputs.clear()
            self._running = None
        for handle in handles:
            handle._finish(RequestStatus.FAILED, error=error)

    def _dispatch_next(self) -> None:
        if self._running is not None or not self._queue or self.failure is not None:
            return
        self._running = self._queue.popleft()
        self._send(("run", self._running.id, self._running.params, self._inputs.pop(self._running.id)))

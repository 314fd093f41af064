"""The front's side of an executor: requests wait in submission order, one batch runs at a time, and
what the executor reports (progress, results, failures) reaches each request's handle.

Batching (BatchingConfig): with max_batch_size > 1 the next batch is the queue's head and every queued
request with the same batch key (the model family's ModelFamily.batch_key; None: never batched), in
queue order, up to max_batch_size. A batch short of that waits until its head has waited delay_ms (a
timer re-checks then; a submit re-checks too). A running member cancelled while others of its batch
go on ends at once (the executor's later news of it is ignored); the executor stops the batch when
every member is cancelled.

Front -> executor messages: ("run", [(id, params, inputs), ...]) (one batch: one or more requests),
("cancel", id), ("stop",).
Executor -> front messages (serve.py sends them): ("event", None, kind, args) while loading, and for
each request of a batch: ("started", id), ("event", id, kind, args), ("done", id, result),
("cancelled", id), ("failed", id, UserError or text)."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable

from sgdiff.config import BatchingConfig
from sgdiff.engine.handle import ProgressEvent, RequestHandle, RequestStatus
from sgdiff.errors import RequestFailed, UserError, WorkerFailure
from sgdiff.pipeline.base import NullEvents, PipelineEvents
from sgdiff.sampling import SamplingParams

BatchKey = Callable[[SamplingParams], Hashable | None]  # ModelFamily.batch_key


def never_batched(params: SamplingParams) -> None:
    return None


class Dispatcher:
    """`send(message)` hands a message to the executor (it must not block for long); `batch_key`: which
    requests may share a batch (used when `batching.max_batch_size` > 1)."""

    def __init__(
        self,
        send: Callable[[tuple], None],
        load_events: PipelineEvents | None = None,
        batching: BatchingConfig = BatchingConfig(),
        batch_key: BatchKey = never_batched,
    ):
        self._send = send
        self._load_events = load_events or NullEvents()
        self._batching = batching
        self._batch_key = batch_key if batching.max_batch_size > 1 else never_batched
        self._lock = threading.RLock()
        self._queue: deque[RequestHandle] = deque()
        self._running: dict[str, RequestHandle] = {}  # the running batch's members not yet finished, by id
        self._inputs: dict[str, dict[str, bytes]] = {}  # of the queued requests, by id
        self._keys: dict[str, Hashable | None] = {}  # their batch keys
        self._arrived: dict[str, float] = {}  # when each was queued (time.monotonic)
        self._timer: tuple[threading.Timer, float] | None = None  # a re-check due at a head's deadline
        self._ids = itertools.count()
        self._prefix = f"req-{os.getpid():x}-"
        self.failure: str | None = None  # why the executor can take no more requests

    def submit(self, params: SamplingParams, inputs: dict[str, bytes] | None = None) -> RequestHandle:
        """Queue a request; `inputs`: the bytes of its input files by path (sent along with it)."""
        handle = RequestHandle(f"{self._prefix}{next(self._ids)}", params, self.cancel)
        key = self._batch_key(params)
        with self._lock:
            if self.failure is not None:
                raise WorkerFailure(f"the engine cannot take requests: {self.failure}")
            self._queue.append(handle)
            self._inputs[handle.id] = inputs or {}
            self._keys[handle.id] = key
            self._arrived[handle.id] = time.monotonic()
            self._dispatch_next()
        return handle

    def cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            if handle in self._queue:
                self._queue.remove(handle)
                self._forget(handle)
                handle._finish(RequestStatus.CANCELLED)  # (a head waiting for its batch: its timer re-checks)
            elif handle.id in self._running:
                self._send(("cancel", handle.id))
                if len(self._running) > 1:  # the rest of its batch goes on: this one ends now
                    del self._running[handle.id]
                    handle._finish(RequestStatus.CANCELLED)

    def pending(self) -> int:
        """Requests queued or running."""
        with self._lock:
            return len(self._queue) + len(self._running)

    def put(self, message: tuple) -> None:
        """A message from the executor (any thread): a request's news, or loading's progress (id None)."""
        kind, request_id, *rest = message
        if request_id is None and kind == "event":
            ProgressEvent(*rest).replay(self._load_events)
            return
        with self._lock:
            handle = self._running.get(request_id)
            if handle is None:
                return  # (a request already failed by fail_all, or cancelled while its batch goes on)
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
                del self._running[request_id]
                self._dispatch_next()

    def cancel_all(self) -> None:
        with self._lock:
            for handle in [*self._queue, *self._running.values()]:
                self.cancel(handle)

    def close(self) -> None:
        """The engine is closing: whatever is still queued or running ends as cancelled."""
        with self._lock:
            self.failure = self.failure or "the engine is closed"
            handles = self._drop_all()
        for handle in handles:
            handle._finish(RequestStatus.CANCELLED)

    def fail_all(self, error: Exception) -> None:
        """The executor is gone: every request still queued or running fails with `error`."""
        with self._lock:
            self.failure = str(error)
            handles = self._drop_all()
        for handle in handles:
            handle._finish(RequestStatus.FAILED, error=error)

    def _drop_all(self) -> list[RequestHandle]:
        handles = [*self._running.values(), *self._queue]
        self._queue.clear()
        self._running.clear()
        self._inputs.clear()
        self._keys.clear()
        self._arrived.clear()
        if self._timer is not None:
            self._timer[0].cancel()
            self._timer = None
        return handles

    def _forget(self, handle: RequestHandle) -> None:
        for table in (self._inputs, self._keys, self._arrived):
            table.pop(handle.id, None)

    def _dispatch_next(self) -> None:
        if self._running or not self._queue or self.failure is not None:
            return
        batch = self._next_batch()
        if batch is None:
            return
        for handle in batch:
            self._queue.remove(handle)
        self._running = {handle.id: handle for handle in batch}
        requests = [(handle.id, handle.params, self._inputs[handle.id]) for handle in batch]
        for handle in batch:
            self._forget(handle)
        self._send(("run", requests))

    def _next_batch(self) -> list[RequestHandle] | None:
        """The head and the queued requests that may share its batch; None: wait for more to come."""
        head = self._queue[0]
        key = self._keys[head.id]
        if key is None:
            return [head]
        size = self._batching.max_batch_size
        batch = [handle for handle in self._queue if self._keys[handle.id] == key][:size]
        deadline = self._arrived[head.id] + self._batching.delay_ms / 1000
        if len(batch) < size and deadline > time.monotonic():
            self._recheck_at(deadline)
            return None
        return batch

    def _recheck_at(self, deadline: float) -> None:
        if self._timer is not None:
            timer, due = self._timer
            if due == deadline and timer.is_alive():
                return
            timer.cancel()
        timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._recheck)
        timer.daemon = True
        timer.start()
        self._timer = (timer, deadline)

    def _recheck(self) -> None:
        with self._lock:
            self._timer = None
            self._dispatch_next()

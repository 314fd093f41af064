"""What a caller holds for one submitted request: its status, its progress events as they come, a
way to cancel it, and its result. Safe to use from any thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

from sgdiff.errors import RequestCancelled
from sgdiff.pipeline.base import PipelineEvents
from sgdiff.sampling import SamplingParams


class RequestStatus(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = (RequestStatus.COMPLETED, RequestStatus.FAILED, RequestStatus.CANCELLED)


@dataclass(frozen=True)
class ProgressEvent:
    """One PipelineEvents call of the running request: `kind` is the method's name
    (stage_started, stage_finished or step_finished), `args` its arguments."""

    kind: str
    args: tuple

    def replay(self, sink: PipelineEvents) -> None:
        getattr(sink, self.kind)(*self.args)

    @property
    def step(self) -> tuple[int, int] | None:
        """(steps done, steps in all) for a step event, else None."""
        if self.kind != "step_finished":
            return None
        index, total, _ = self.args
        return index + 1, total


class RequestHandle:
    """One request in an engine: queued, then running, then completed, failed or cancelled."""

    def __init__(self, request_id: str, params: SamplingParams, cancel: Callable[[RequestHandle], None]):
        self.id = request_id
        self.params = params
        self._cancel = cancel
        self._condition = threading.Condition()
        self._events: list[ProgressEvent] = []
        self._status = RequestStatus.QUEUED
        self._result: Any = None
        self._error: BaseException | None = None
        self._listeners: list[Callable[[RequestHandle, ProgressEvent | None], None]] = []

    @property
    def status(self) -> RequestStatus:
        return self._status

    @property
    def progress(self) -> tuple[int, int] | None:
        """(denoising steps done, steps in all) so far, or None before the first step."""
        steps = [event.step for event in self._events if event.step is not None]
        return steps[-1] if steps else None

    def done(self) -> bool:
        return self._status in FINISHED

    def cancel(self) -> None:
        """Ask for the request to end: a queued one never runs, a running one stops after its current
        denoising step (its status becomes cancelled); a finished one is left as it is."""
        if not self.done():
            self._cancel(self)

    def add_listener(self, listener: Callable[[RequestHandle, ProgressEvent | None], None]) -> None:
        """Call `listener(handle, event)` at each change: a progress event (`event`), or the status
        (running, finished: `event` None). It runs on the engine's thread and must return at once (e.g.
        hand the news to an event loop). It is called once at once too, with None."""
        with self._condition:
            self._listeners.append(listener)
        listener(self, None)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request has finished (True) or `timeout` seconds have passed (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while not self.done():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._condition.wait(0.1 if left is None else min(left, 0.1))  # short: Ctrl-C gets through
            return True

    def events(self) -> Iterator[ProgressEvent]:
        """Every progress event of the request, from the first, as they come; ends when it has finished."""
        seen = 0
        while True:
            with self._condition:
                while seen == len(self._events) and not self.done():
                    self._condition.wait(0.1)
                fresh, finished = self._events[seen:], self.done()
            seen += len(fresh)
            yield from fresh
            if finished and seen == len(self._events):
                return

    def result(self, timeout: float | None = None):
        """The GenerationResult; raises the request's error (RequestCancelled if cancelled), or
        TimeoutError if it has not finished within `timeout` seconds."""
        if not self.wait(timeout):
            raise TimeoutError(f"request {self.id} has not finished after {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    # What the engine's dispatcher calls as the request moves on.

    def _set_running(self) -> None:
        with self._condition:
            self._status = RequestStatus.RUNNING
            self._condition.notify_all()
        self._tell()

    def _add_event(self, event: ProgressEvent) -> None:
        with self._condition:
            self._events.append(event)
            self._condition.notify_all()
        self._tell(event)

    def _finish(self, status: RequestStatus, result: Any = None, error: BaseException | None = None) -> None:
        with self._condition:
            if self.done():
                return
            if status is RequestStatus.CANCELLED and error is None:
                error = RequestCancelled(f"request {self.id} was cancelled")
            self._status, self._result, self._error = status, result, error
            self._condition.notify_all()
        self._tell()

    def _tell(self, event: ProgressEvent | None = None) -> None:
        for listener in list(self._listeners):
            listener(self, event)

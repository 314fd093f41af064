"""The executing side of an engine: every rank runs `serve_requests` over its loaded model until the
front says stop. Rank 0 reads the front's messages (dispatch.py lists them) and passes each on to
the other ranks; whether to cancel the running batch of requests is rank 0's decision too, shared at
every point the pipeline asks, so that every rank stops after the same step."""

from __future__ import annotations

import os
import queue
import traceback
from datetime import timedelta
from typing import Any, Protocol

import torch

from sgdiff.engine.runner import ModelRunner
from sgdiff.errors import RequestCancelled, UserError

IDLE_HEARTBEAT_SECONDS = 300.0  # an idle rank 0 tells the other ranks it is still there ...
CONTROL_TIMEOUT = timedelta(hours=1)  # ... well within the time they wait for its word


class Outbox(Protocol):
    def put(self, message: tuple) -> None: ...


class Inbox:
    """Rank 0's messages from the front: a cancel is noted at once (the running batch asks for it
    between steps); every other message waits its turn."""

    def __init__(self):
        self.messages: queue.Queue[tuple] = queue.Queue()
        self.cancelled: set[str] = set()

    def put(self, message: tuple) -> None:
        if message[0] == "cancel":
            self.cancelled.add(message[1])
        else:
            self.messages.put(message)

    def get(self) -> tuple:
        try:
            return self.messages.get(timeout=IDLE_HEARTBEAT_SECONDS)
        except queue.Empty:
            return ("idle",)


class OneRank:
    """The control channel of a single process: its own word is final."""

    def share(self, value: Any) -> Any:
        return value

    def decide(self, flag: bool) -> bool:
        return flag

    def decide_each(self, flags: list[bool]) -> list[bool]:
        return flags

    def barrier(self) -> None:
        pass


class ControlChannel:
    """Rank 0's word for every rank, over a gloo group of its own (host to host: it never waits for
    a GPU, and an idle engine's ranks wait on it with a long timeout). Every rank makes one, in the
    same order relative to other groups."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        self.flag = torch.zeros(1, dtype=torch.int32)

    def share(self, value: Any) -> Any:
        box = [value]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def decide(self, flag: bool) -> bool:
        self.flag.fill_(int(flag))
        self.dist.broadcast(self.flag, src=0, group=self.group)
        return bool(self.flag.item())

    def decide_each(self, flags: list[bool]) -> list[bool]:
        """Rank 0's flags (one per member of a batch) on every rank."""
        values = torch.tensor([int(flag) for flag in flags], dtype=torch.int32)
        self.dist.broadcast(values, src=0, group=self.group)
        return [bool(value) for value in values.tolist()]

    def barrier(self) -> None:
        self.dist.barrier(group=self.group)


class ForwardedEvents:
    """PipelineEvents of one request (or of loading, request id None) sent to the front."""

    def __init__(self, outbox: Outbox, request_id: str | None):
        self.outbox, self.request_id = outbox, request_id

    def stage_started(self, name: str) -> None:
        self.outbox.put(("event", self.request_id, "stage_started", (name,)))

    def stage_finished(self, name: str, seconds: float) -> None:
        self.outbox.put(("event", self.request_id, "stage_finished", (name, seconds)))

    def step_finished(self, index: int, total: int, seconds: float) -> None:
        self.outbox.put(("event", self.request_id, "step_finished", (index, total, seconds)))


class Silent:
    """What ranks other than 0 report to: nothing (rank 0 speaks for them)."""

    def put(self, message: tuple) -> None:
        pass


def describe(exc: BaseException) -> str:
    """An error that is not the caller's (a UserError travels as it is), as one line."""
    return f"{type(exc).__name__}: {exc}"


def serve_requests(
    runner: ModelRunner,
    control: OneRank | ControlChannel,
    inbox: Inbox | None,
    outbox: Outbox,
    survive: tuple[type[BaseException], ...] = (UserError,),
) -> None:
    """Run the front's batches of requests one by one until it says stop. Rank 0 has the `inbox` and
    reports to `outbox`; the other ranks (inbox None) follow it. A batch that raises one of `survive`
    fails alone; any other error ends the serving (on several ranks the others may wait in a collective)."""
    leader = inbox is not None
    if not leader:
        outbox = Silent()
    while True:
        message = control.share(inbox.get() if inbox is not None else None)  # (the leader's)
        if message[0] == "stop":
            return
        if message[0] == "run":
            requests = message[1]
            cancelled = inbox.cancelled if inbox is not None else set()
            try:
                run_batch(runner, control, requests, cancelled, outbox, survive)
            finally:
                cancelled.difference_update(request_id for request_id, _, _ in requests)


def run_batch(runner, control, requests: list[tuple], cancelled: set[str], outbox: Outbox, survive) -> None:
    """`requests`: (id, params, the bytes of its input files by path) of each member of the batch. One
    request runs the single-request path; several share one pass through the pipeline. Whether each
    member is cancelled (its id in `cancelled`) is rank 0's word for every rank: a member cancelled
    while others go on leaves the batch after the step in hand, every member cancelled stops it."""
    ids = [request_id for request_id, _, _ in requests]
    for request_id in ids:
        outbox.put(("started", request_id))

    def wishes() -> list[bool]:
        return control.decide_each([request_id in cancelled for request_id in ids])

    try:
        if len(requests) == 1:
            (request_id, params, inputs) = requests[0]
            events = ForwardedEvents(outbox, request_id)
            results = [runner.generate(params, events, lambda: control.decide(request_id in cancelled), inputs)]
        else:
            params_list = [params for _, params, _ in requests]
            events_list = [ForwardedEvents(outbox, request_id) for request_id in ids]
            inputs_list = [inputs for _, _, inputs in requests]
            results = runner.generate_batch(params_list, events_list, wishes, inputs_list)
    except RequestCancelled:
        for request_id in ids:
            outbox.put(("cancelled", request_id))
        return
    except survive as exc:
        if os.environ.get("SGDIFF_DEBUG", "") not in ("", "0") and not isinstance(exc, UserError):
            traceback.print_exc()
        for request_id in ids:
            outbox.put(("failed", request_id, exc if isinstance(exc, UserError) else describe(exc)))
        return
    for request_id, result in zip(ids, results, strict=True):
        outbox.put(("done", request_id, result) if result is not None else ("cancelled", request_id))

"""Errors a user can cause, a worker's failure, and termination. The CLI shows each as one line
(exit codes 2, 1 and 143)."""

from __future__ import annotations

import re
from collections.abc import Callable

FIELD_NAME = re.compile(r"`([a-z][a-z0-9_]*)`")


class UserError(Exception):
    """Bad input: a request's field, a file, a checkpoint. The message says what to do.

    It names the fields it speaks of in backticks (`guidance_scale_2`), and `field` is the one at
    fault, if one is: each edge spells them its own way with `render` (the CLI --guidance-scale-2, a
    server guidance_scale_2, as OpenAI's `param`). str() spells them as they are."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message, self.field = message, field

    def render(self, spell: Callable[[str], str] = lambda name: name) -> str:
        return FIELD_NAME.sub(lambda match: spell(match.group(1)), self.message)

    def __str__(self) -> str:
        return self.render()

    def __reduce__(self):  # the field travels with the message between processes
        return type(self), (self.message, self.field)


class WorkerFailure(RuntimeError):
    """A worker process failed or died; the message says which and why (every worker was stopped)."""


class Terminated(BaseException):
    """SIGTERM arrived (`kill`, `timeout`, a process manager): raised so that what was half done is
    undone on the way out (a partial output file, the worker processes) instead of being left."""


def raise_terminated(signum: int, frame: object) -> None:
    """A SIGTERM handler (signal.signal) that raises Terminated."""
    raise Terminated()


class RequestCancelled(Exception):
    """The request was cancelled (RequestHandle.cancel): before it started, or between two steps."""


class RequestFailed(RuntimeError):
    """A request failed while it ran (out of memory, a broken kernel, ...); the engine takes the next one."""

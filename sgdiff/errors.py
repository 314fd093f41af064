"""Errors a user can cause, an output that cannot be written, a worker's failure, and termination.
The CLI shows each as one line (exit codes 2, 1, 1 and 143)."""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from collections.abc import Callable

FIELD_NAME = re.compile(r"`([a-z][a-z0-9_]*)`")
REDELIVERY_SECONDS = 0.05  # a swallowed SIGTERM comes again after this


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


class WriteFailed(OSError):
    """An output could not be written (a full disk, a failed encoder); the message names the file and
    says why, in plain words. Nothing partial was left: no half-written file, no folder made for it.
    `errno` is the cause's, where it has one."""


class WorkerFailure(RuntimeError):
    """A worker process failed or died; the message says which and why (every worker was stopped)."""


class Terminated(BaseException):
    """SIGTERM arrived (`kill`, `timeout`, a process manager): raised so that what was half done is
    undone on the way out (a partial output file, the worker processes) instead of being left."""


def raise_terminated(signum: int, frame: object) -> None:
    """A SIGTERM handler (signal.signal) that raises Terminated."""
    raise Terminated()


def redeliver_swallowed_termination(unraisable) -> None:
    """sys.unraisablehook: a Terminated raised while a finaliser (`__del__`) ran is swallowed by Python,
    which would print it as 'Exception ignored in ...'; the SIGTERM comes again instead, a moment later
    (from a thread: raised now, it would land in this hook), to be raised where it ends the process."""
    if isinstance(unraisable.exc_value, Terminated):
        threading.Timer(REDELIVERY_SECONDS, os.kill, (os.getpid(), signal.SIGTERM)).start()
    else:
        sys.__unraisablehook__(unraisable)


def raise_on_sigterm() -> tuple:
    """From now on SIGTERM raises Terminated in the main thread (call it there), even one that arrives
    inside a finaliser; returns what restore_sigterm puts back."""
    previous = signal.signal(signal.SIGTERM, raise_terminated), sys.unraisablehook
    sys.unraisablehook = redeliver_swallowed_termination
    return previous


def restore_sigterm(previous: tuple) -> None:
    handler, hook = previous
    signal.signal(signal.SIGTERM, handler if handler is not None else signal.SIG_DFL)
    sys.unraisablehook = hook


class RequestCancelled(Exception):
    """The request was cancelled (RequestHandle.cancel): before it started, or between two steps."""


class RequestFailed(RuntimeError):
    """A request failed while it ran (out of memory, a broken kernel, ...); the engine takes the next one."""

"""Errors a user can cause, a worker's failure, and termination. The CLI shows each as one line
(exit codes 2, 1 and 143)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a flag, a file, a checkpoint. The message says what to do."""


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

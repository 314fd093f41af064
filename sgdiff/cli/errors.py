"""Errors a user can cause end as one line and exit code 2; an output that cannot be written (a full
disk), a worker's failure, or any other error, as one line and exit code 1; Ctrl-C as "interrupted"
(130), SIGTERM as "terminated" (143), each after what was half done is undone. SGDIFF_DEBUG=1 shows
the traceback too."""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer

USAGE_EXIT_CODE = 2
# The fields (library names) whose flag is not --the-field-name.
FLAGS = {
    "model": "--model-path",
    "fused_projections": "--enable-fused-projections",
    "fused_gelu": "--enable-fused-gelu",
    "fused_norms": "--enable-fused-norms",
    "torch_compile": "--enable-torch-compile",
    "cuda_graph": "--enable-cuda-graph",
}


def flag(field: str) -> str:
    """The flag of `generate` that sets a field of the library's request or configuration."""
    return FLAGS.get(field, "--" + field.replace("_", "-"))


def debug_enabled() -> bool:
    return os.environ.get("SGDIFF_DEBUG", "") not in ("", "0")


def fail(message: str, code: int = USAGE_EXIT_CODE) -> NoReturn:
    one_line = " ".join(message.split())  # library messages may span lines (e.g. torch's state_dict errors)
    typer.echo(f"error: {one_line}", err=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn UserError (and an output that cannot be written, a worker's failure, interrupts, termination
    and out-of-memory) into one line on stderr."""
    from sgdiff.errors import Terminated, UserError, WorkerFailure, WriteFailed, raise_on_sigterm, restore_sigterm

    main_thread = threading.current_thread() is threading.main_thread()
    previous = raise_on_sigterm() if main_thread else None
    try:
        yield
    except UserError as exc:
        if debug_enabled():
            traceback.print_exc()
        fail(exc.render(flag))
    except WriteFailed as exc:  # a full disk, a failed encoder: nothing partial was left
        if debug_enabled():
            traceback.print_exc()
        fail(str(exc), code=1)
    except WorkerFailure as exc:  # the workers' own tracebacks (SGDIFF_DEBUG=1) are already printed
        fail(str(exc), code=1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except Terminated:
        typer.echo("terminated", err=True)
        raise typer.Exit(128 + signal.SIGTERM) from None
    except Exception as exc:  # noqa: BLE001 - last line of defence for a CLI
        if debug_enabled() or isinstance(exc, typer.Exit):
            raise
        if "out of memory" in str(exc).lower():
            fail("out of GPU memory: lower --height/--width or --num-outputs-per-prompt", code=1)
        fail(f"{type(exc).__name__}: {exc} (set SGDIFF_DEBUG=1 for the traceback)", code=1)
    finally:
        sys.stdout.flush()
        if previous is not None:  # (the main thread's)
            restore_sigterm(previous)

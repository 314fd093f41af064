"""Errors a user can cause end as one line and exit code 2; SGDIFF_DEBUG=1 shows the traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer

USAGE_EXIT_CODE = 2


def debug_enabled() -> bool:
    return os.environ.get("SGDIFF_DEBUG", "") not in ("", "0")


def fail(message: str, code: int = USAGE_EXIT_CODE) -> None:
    one_line = " ".join(message.split())  # library messages may span lines (e.g. torch's state_dict errors)
    typer.echo(f"error: {one_line}", err=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn UserError (and interrupts, and out-of-memory) into one line on stderr."""
    from sgdiff.errors import UserError

    try:
        yield
    except UserError as exc:
        if debug_enabled():
            raise
        fail(str(exc))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - last line of defence for a CLI
        if debug_enabled() or isinstance(exc, typer.Exit):
            raise
        if "out of memory" in str(exc).lower():
            fail("out of GPU memory: lower --height/--width or --num-outputs-per-prompt", code=1)
        fail(f"{type(exc).__name__}: {exc} (set SGDIFF_DEBUG=1 for the traceback)", code=1)
    finally:
        sys.stdout.flush()

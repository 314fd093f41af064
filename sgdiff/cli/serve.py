"""`sgdiff serve`: load a model once and answer OpenAI-style HTTP requests (sgdiff/server/)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from sgdiff.cli import options as opt
from sgdiff.cli.engine_flags import EngineFlags, with_engine_flags
from sgdiff.cli.errors import fail, user_errors

SERVER = "Server"
LIMITS = "Limits"
BATCHING = "Batching"


def default_state_dir() -> Path:
    """Job records and outputs: $XDG_STATE_HOME/sgdiff/server (default ~/.local/state/sgdiff/server)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "sgdiff" / "server"


@with_engine_flags
def serve(
    model_path: opt.ModelPath = None,
    revision: opt.Revision = None,
    preset: opt.PresetName = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.", rich_help_panel=SERVER)] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).", rich_help_panel=SERVER)
    ] = 30000,  # fmt: skip
    state_dir: Annotated[
        Path | None,
        typer.Option(
            "--state-dir",
            help="Where video jobs and image files are kept across restarts "
            "(default: $XDG_STATE_HOME/sgdiff/server, else ~/.local/state/sgdiff/server).",
            rich_help_panel=SERVER,
        ),
    ] = None,  # fmt: skip
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="SGDIFF_API_KEY",
            show_envvar=True,
            help="Require 'Authorization: Bearer KEY' on every endpoint but /health.",
            rich_help_panel=SERVER,
        ),
    ] = None,  # fmt: skip
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue",
            min=1,
            help="Requests queued or running at once; more are answered 429 with Retry-After.",
            rich_help_panel=LIMITS,
        ),
    ] = 32,  # fmt: skip
    max_body_mb: Annotated[
        float,
        typer.Option("--max-body-mb", min=0.001, help="Largest request body (413 beyond).", rich_help_panel=LIMITS),
    ] = 32.0,  # fmt: skip
    max_n: Annotated[
        int, typer.Option("--max-n", min=1, help="Most images per request (`n`).", rich_help_panel=LIMITS)
    ] = 8,  # fmt: skip
    max_size: Annotated[
        int, typer.Option("--max-size", min=16, help="Largest width or height, in pixels.", rich_help_panel=LIMITS)
    ] = 2048,  # fmt: skip
    max_frames: Annotated[
        int, typer.Option("--max-frames", min=1, help="Most video frames per request.", rich_help_panel=LIMITS)
    ] = 257,  # fmt: skip
    max_steps: Annotated[
        int, typer.Option("--max-steps", min=1, help="Most denoising steps per request.", rich_help_panel=LIMITS)
    ] = 200,  # fmt: skip
    max_batch_size: Annotated[
        int,
        typer.Option(
            "--max-batch-size",
            min=1,
            help="Run up to this many requests that differ only in prompt, negative prompt "
            "and seed as one batch (1: no batching).",
            rich_help_panel=BATCHING,
        ),
    ] = 1,  # fmt: skip
    batching_delay_ms: Annotated[
        float,
        typer.Option(
            "--batching-delay-ms",
            min=0,
            help="How long the first request of a batch waits for others to join it.",
            rich_help_panel=BATCHING,
        ),
    ] = 20.0,  # fmt: skip
    quiet: opt.Quiet = False,
    engine: EngineFlags = EngineFlags(),
) -> None:
    """Serve a model over HTTP: OpenAI's Images and Videos APIs, video jobs on disk, /health, /metrics."""
    with user_errors():
        from sgdiff.config import BatchingConfig
        from sgdiff.server.core import ServerLimits
        from sgdiff.server.launch import ServeConfig, run_server

        if api_key is not None and not api_key.strip():
            fail("--api-key is empty: give a key, or leave it (and SGDIFF_API_KEY) out to serve without one")
        limits = ServerLimits(max_queue, int(max_body_mb * 2**20), max_n, max_size, max_frames, max_steps)
        config = ServeConfig(host, port, state_dir or default_state_dir(), api_key, limits, quiet)
        run_server(model_path, preset, engine.runtime(), engine.parallel(),
                   BatchingConfig(max_batch_size, batching_delay_ms), config, revision)  # fmt: skip

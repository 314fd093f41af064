"""Start `sgdiff serve`: take the port first (a busy one fails in a second, not after a load), load
the model, then answer on that socket with uvicorn until SIGINT or SIGTERM."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from sgdiff.config import BatchingConfig, ParallelConfig, RuntimeConfig, switching_loras
from sgdiff.errors import UserError
from sgdiff.server.core import ServerLimits

SHUTDOWN_GRACE_SECONDS = 10  # open requests get this long to finish when the server is asked to stop


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 30000
    state_dir: Path = Path("sgdiff-state")
    api_key: str | None = None
    limits: ServerLimits = ServerLimits()
    quiet: bool = False


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}): pick another `port` or `host`",
                        field="port") from None  # fmt: skip
    sock.listen(2048)  # connections wait in the backlog until uvicorn takes them
    return sock


def run_server(
    model_path: str | None,
    preset: str | None,
    runtime: RuntimeConfig,
    parallel: ParallelConfig,
    batching: BatchingConfig,
    config: ServeConfig,
    revision: str | None = None,
) -> None:
    import uvicorn
    from rich.console import Console

    from sgdiff.cli.progress import QuietEvents, RichProgress
    from sgdiff.engine.service import Engine
    from sgdiff.models.resolve import DEMO_IMAGE_MODEL
    from sgdiff.server.app import create_app
    from sgdiff.server.core import ServerCore

    runtime = switching_loras(runtime, parallel)  # requests pick their adapters (auto: fused anew per switch)
    state_dir = config.state_dir.expanduser()
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"`state_dir` {state_dir} cannot be made ({exc.strerror})", field="state_dir") from None
    sock = listening_socket(config.host, config.port)
    model_id = model_path or DEMO_IMAGE_MODEL
    console = Console(stderr=True)
    events = QuietEvents() if config.quiet else RichProgress(console)
    try:
        with events:
            engine = Engine(model_id, preset=preset, runtime=runtime, parallel=parallel, load_events=events,
                            batching=batching, revision=revision)  # fmt: skip
            # a server loads once: its first request too runs at full speed (the kernels warm up meanwhile)
            engine.start(warm_up=engine.runner.default_request())
        core = ServerCore(engine, state_dir, config.limits, model_id)
        try:
            app = create_app(core, config.api_key)
            host, port = sock.getsockname()[:2]
            print(f"serving {model_id} ({engine.output_kind}s) on http://{host}:{port}", flush=True)
            server = uvicorn.Server(
                uvicorn.Config(
                    app,
                    log_level="warning" if config.quiet else "info",
                    timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
                )  # fmt: skip
            )
            server.run(sockets=[sock])
        finally:
            engine.close()
            core.close()
    finally:
        sock.close()

"""A real `sgdiff serve` for tests: a process started on 127.0.0.1 with a free port, its address read from
the line it prints when it is ready, stopped (or killed) by the test; or the app over an engine made in the
test, served on a thread of the test's process (`served_in_thread`)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

READY = re.compile(r"serving .* on (http://\S+)")
START_TIMEOUT = 900.0  # a full-size model on a GPU loads (and may compile) for minutes


class ServerProcess:
    def __init__(self, args: list[str], state_dir: Path, log: Path, api_key: str | None = None, device: str = "cpu"):
        self.args, self.state_dir, self.log, self.api_key, self.device = args, state_dir, log, api_key, device
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> ServerProcess:
        command = [sys.executable, "-c", "from sgdiff.cli.main import main; main()", "serve", "--port", "0",
                   "--state-dir", str(self.state_dir), "--device", self.device, "--quiet", *self.args]  # fmt: skip
        env = {**os.environ, "SGDIFF_API_KEY": self.api_key or ""}
        if self.api_key is None:
            env.pop("SGDIFF_API_KEY")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log, "ab")  # noqa: SIM115 - open while the server runs
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, env=env, text=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()  # type: ignore[union-attr]  # (stdout=PIPE)
            if match := READY.search(line):
                self.url = match.group(1)
                return self
            if not line and self.process.poll() is not None:
                break
        self.stop()
        raise RuntimeError(f"sgdiff serve did not start: {self.log.read_text()[-2000:]}")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def openai(self):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.api_key or "unused", max_retries=0)

    def kill(self) -> None:
        """kill -9: no shutdown of any kind."""
        assert self.process is not None  # (started)
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self._log.close()

    def stop(self) -> int:
        assert self.process is not None  # (started)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def served_in_thread(engine, state: Path, model: str) -> Iterator[str]:
    """The real app over `engine` (an sgdiff Engine, started here) on a free port, on a thread of this
    process: its URL. On the way out the server stops and the engine closes."""
    import uvicorn

    from sgdiff.server.app import create_app
    from sgdiff.server.core import ServerCore, ServerLimits
    from sgdiff.server.launch import listening_socket

    engine.start()
    core = ServerCore(engine, state, ServerLimits(), model)
    sock = listening_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(core, None), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        engine.close()
        core.close()
        sock.close()

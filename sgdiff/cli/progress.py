"""Rich progress on stderr, driven by the pipeline's events."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from sgdiff.pipeline.base import NullEvents


class RichProgress:
    """A PipelineEvents sink: one line per loaded part, a bar for denoising steps, one for decoding."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}
        self._started = False
        self._request = ""  # "[2/4] " while the second of four prompts' lines are drawn

    def __enter__(self) -> RichProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            self.progress.stop()

    def _start(self) -> None:
        """The display starts with the first event, so an error before any work prints only itself."""
        if not self._started:
            self.progress.start()
            self._started = True

    def request_started(self, index: int, total: int) -> None:
        """The lines that follow belong to prompt `index` (from 1) of `total`: said on each, when several."""
        self._request = f"[{index}/{total}] " if total > 1 else ""

    def stage_started(self, name: str) -> None:
        self._start()
        if name.startswith("load "):
            self._tasks[name] = self.progress.add_task(name.replace("load ", "loading "), total=1)
        elif name == "decoding":
            self._tasks[name] = self.progress.add_task(f"{self._request}decoding", total=1)

    def stage_finished(self, name: str, seconds: float) -> None:
        task = self._tasks.pop(name, None)
        if task is None:
            return
        if name == "denoising":
            self.progress.update(task, description=f"{self._request}denoised ({seconds:.2f} s)")
        else:
            label = name.replace("load ", "loaded ") if name.startswith("load ") else f"{self._request}decoded"
            self.progress.update(task, completed=1, description=f"{label} ({seconds:.2f} s)")

    def step_finished(self, index: int, total: int, seconds: float) -> None:
        self._start()
        task = self._tasks.get("denoising")
        if task is None:
            task = self._tasks["denoising"] = self.progress.add_task(f"{self._request}denoising", total=total)
        self.progress.update(task, completed=index + 1, description=f"{self._request}denoising ({seconds:.2f} s/step)")


class QuietEvents(NullEvents):
    """No output at all (--quiet)."""

    def __enter__(self) -> QuietEvents:
        return self

    def __exit__(self, *exc) -> None:
        pass


class _LowercaseLevel(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def show_library_warnings(console: Console, quiet: bool) -> None:
    """sgdiff's own warnings (e.g. a truncated prompt) as `warning: ...` lines on stderr, like the
    CLI's `error: ...` lines; none with --quiet."""
    logger = logging.getLogger("sgdiff")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.ERROR if quiet else logging.WARNING)
    handler = logging.StreamHandler(console.file)
    handler.setFormatter(_LowercaseLevel())
    logger.addHandler(handler)

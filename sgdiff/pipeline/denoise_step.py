"""Which denoising step and CFG branch a transformer call belongs to, for what changes a built model from
outside and needs to know it (speed/step_cache/: each branch its own cache, the first and last steps always
computed). The denoising stage sets it around each call of its denoiser; outside a denoising loop (a
warm-up, a test calling the model) there is none."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

COND, UNCOND = "cond", "uncond"  # the prompt branch, the negative (CFG) branch


@dataclass(frozen=True)
class DenoiseStep:
    index: int  # 0-based step of the sampling loop
    total: int  # steps of the loop
    branch: str  # COND or UNCOND
    skipped: dict[str, list[int]] = field(default_factory=dict)  # the request's record: branch -> steps skipped


_current: ContextVar[DenoiseStep | None] = ContextVar("sgdiff_denoise_step", default=None)


def current_step() -> DenoiseStep | None:
    return _current.get()


@contextmanager
def denoise_step(step: DenoiseStep) -> Iterator[None]:
    token = _current.set(step)
    try:
        yield
    finally:
        _current.reset(token)

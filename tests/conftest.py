from __future__ import annotations

import os
from pathlib import Path

import pytest

from sgdiff.testing.tiny_flux import build_tiny_flux


@pytest.fixture(scope="session", autouse=True)
def own_cache_dir(tmp_path_factory):
    """sgdiff's caches (tokenizers, compiled graphs) in a folder of this test run, not the user's ~/.cache:
    every run starts from the same empty cache, and the processes the tests start share it."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(scope="session")
def tiny_flux_dev(tmp_path_factory) -> Path:
    """A tiny random FLUX.1-dev-like checkpoint, transformer saved as sharded safetensors + index."""
    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "dev", variant="dev", shard_transformer=True)


@pytest.fixture(scope="session")
def tiny_flux_schnell(tmp_path_factory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "schnell", variant="schnell")


@pytest.fixture(scope="session")
def diffusers_pipeline():
    """diffusers' FluxPipeline for a tiny checkpoint folder (cached per folder)."""
    import torch
    from diffusers import FluxPipeline

    cache = {}

    def load(path: Path) -> FluxPipeline:
        if path not in cache:
            cache[path] = FluxPipeline.from_pretrained(path, dtype=torch.float32)
        return cache[path]

    return load


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory):
    """tiny_wan(variant) -> a tiny random Wan checkpoint folder of that variant (built once)."""
    from sgdiff.testing.tiny_wan import build_tiny_wan

    built = {}

    def build(variant: str) -> Path:
        if variant not in built:
            built[variant] = build_tiny_wan(tmp_path_factory.mktemp("wan") / variant, variant=variant)
        return built[variant]

    return build


class StepGate:
    """Holds the model's `at`-th call (1-based) until released: a test can act at a known step of a
    running request, however fast the model is."""

    def __init__(self, at: int):
        import threading

        self.at, self.calls = at, 0
        self.reached, self.released = threading.Event(), threading.Event()

    def __call__(self, *args) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.reached.set()
            assert self.released.wait(60), "the gate was never released"


@pytest.fixture
def step_gate():
    return StepGate

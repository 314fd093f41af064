"""Step caching (--cache): skip a transformer's blocks on the denoising steps where their input or their
first block's residual barely changes, reusing the residual of a computed step (rules.py: the methods,
blocks.py: how the blocks are wrapped). Opt-in and lossy; threshold 0 never skips."""

from __future__ import annotations

from torch import nn

from sgdiff.config import SpeedConfig
from sgdiff.errors import UserError
from sgdiff.pipeline.family import ModelFamily
from sgdiff.speed.step_cache.blocks import StepCache


def apply_step_cache(model: nn.Module, speed: SpeedConfig, family: ModelFamily) -> StepCache:
    """Wrap `model`'s blocks (after torch.compile: the decisions stay outside its graphs); `speed` resolved
    (threshold and warm-up filled in). The cache is kept as `model.step_cache`."""
    plan = family.cache_plan(model)
    if not any(plan.segments):
        raise UserError(f"`cache` needs a transformer of repeated blocks; {family.name} offers none", field="cache")
    if speed.cache == "teacache" and plan.modulated_input is None:
        raise UserError(f"`cache` teacache is not available for {family.name} models: use fbcache", field="cache")
    assert speed.cache_threshold is not None and speed.cache_warmup_steps is not None  # (resolved)
    cache = StepCache(speed.cache, speed.cache_threshold, speed.cache_warmup_steps, plan)
    model.step_cache = cache  # type: ignore[assignment]  # (a plain attribute: found by parallel/ and the report)
    return cache


def step_cache_of(model: nn.Module) -> StepCache | None:
    return getattr(model, "step_cache", None)

"""Step caching (--cache): skip a transformer's blocks on the denoising steps where their input or their
first block's residual barely changes, or where a schedule says so, reusing (or forecasting) the residual of
a computed step (rules.py and schedules.py: the methods, residuals.py: what a computed step keeps, blocks.py:
how the blocks are wrapped). Opt-in and lossy; threshold 0 (taylorseer: interval 1) never skips."""

from __future__ import annotations

from torch import nn

from sgdiff.config import CACHE_METHODS, SpeedConfig
from sgdiff.errors import UserError
from sgdiff.pipeline.family import CachePlan, ModelFamily
from sgdiff.speed.step_cache.blocks import StepCache

# what a method needs of the family's CachePlan, and what the refusal says it lacks
NEEDS = {"teacache": ("modulated_input", "no TeaCache signal"),
         "magcache": ("magnitude_ratios", "no calibrated magnitude ratios")}  # fmt: skip


def methods_offered(plan: CachePlan) -> list[str]:
    return [m for m in CACHE_METHODS if m not in NEEDS or getattr(plan, NEEDS[m][0]) is not None]


def apply_step_cache(model: nn.Module, speed: SpeedConfig, family: ModelFamily) -> StepCache:
    """Wrap `model`'s blocks (after torch.compile: the decisions stay outside its graphs); `speed` resolved
    (threshold, interval and warm-up filled in). The cache is kept as `model.step_cache`."""
    plan = family.cache_plan(model)
    if not any(plan.segments):
        raise UserError(f"`cache` needs a transformer of repeated blocks; {family.name} offers none", field="cache")
    offered = methods_offered(plan)  # (fbcache and taylorseer always: at least two)
    if speed.cache not in offered:
        lacks, choices = NEEDS[speed.cache][1], ", ".join(offered[:-1]) + " or " + offered[-1]
        raise UserError(f"`cache` {speed.cache} is not available for {family.name} models ({lacks}): use {choices}",
                        field="cache")  # fmt: skip
    cache = StepCache(speed.cache, speed.cache_threshold, speed.cache_warmup_steps, plan, speed.cache_interval)
    model.step_cache = cache  # type: ignore[assignment]  # (a plain attribute: found by parallel/ and the report)
    return cache


def step_cache_of(model: nn.Module) -> StepCache | None:
    return getattr(model, "step_cache", None)

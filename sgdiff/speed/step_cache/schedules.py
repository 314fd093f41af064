"""The skip rules of the step caches that decide from the step index alone, never from a tensor, per CFG
branch: every rank holding a shard of the tokens decides alike without summing anything (blocks.py asks them
at the first block; `ready`: this branch holds a residual of every cached range, of the shapes at hand).

- magcache (MagCache, Ma et al. 2025, "Magnitude-aware Cache"; diffusers' hooks/mag_cache.py): the model's
  magnitude ratios (the mean over tokens of ||residual_t|| / ||residual_t-1||, one per step, calibrated once
  per model: the family's CachePlan.magnitude_ratios), nearest-interpolated to the request's steps. From the
  warm-up on, each step multiplies their running product and adds |1 - product| to an accumulated error;
  every block is skipped, reusing the residual of the last computed step, while the error stays within the
  threshold and at most K steps have been skipped in a row (the family's CachePlan.magcache_max_skips: FLUX 3,
  Wan 2); a computed step starts the product, the count and the error again. Where CFG's two branches were
  calibrated apart (Wan), each branch follows its own ratios.
- taylorseer (TaylorSeer, Liu et al. 2025, "From Reusing to Forecasting"; diffusers' hooks/taylorseer_cache.py):
  after the warm-up, one step in `interval` is computed and every block of the others is forecast: the
  blocks' residual from its Taylor expansion over the step index (residuals.py TaylorSeries).

Both: a forced step (warm-up, the last step) is computed, and so is one without a ready residual; magcache
with threshold 0 and taylorseer with interval 1 never skip."""

from __future__ import annotations

from collections.abc import Sequence

import torch

MAGCACHE_RETENTION_RATIO = 0.2  # the share of the first steps always computed: diffusers' retention_ratio
DEFAULT_INTERVALS = {"taylorseer": 5}  # diffusers' TaylorSeerCacheConfig.cache_interval


def magcache_warmup(steps: int) -> int:
    """MagCache's warm-up when --cache-warmup-steps is not given: diffusers' retention step."""
    return int(MAGCACHE_RETENTION_RATIO * steps + 0.5)


def nearest_ratios(ratios: Sequence[float], steps: int) -> list[float]:
    """The calibrated ratios stretched or squeezed to `steps`, as diffusers' nearest_interp does: positions
    computed in float32 and rounded half to even (torch.round), so that ties pick the same neighbour."""
    if steps == 1:
        return [float(ratios[-1])]
    scale = (len(ratios) - 1) / (steps - 1)
    positions = torch.round(torch.arange(steps, dtype=torch.float32) * scale).long()
    return [float(ratios[i]) for i in positions.tolist()]


class MagCacheRule:
    """One branch's MagCache decisions over one request of `steps` steps."""

    def __init__(self, threshold: float, ratios: Sequence[float], steps: int, max_skips: int):
        self.threshold, self.max_skips = threshold, max_skips
        self.ratios = nearest_ratios(ratios, steps)
        self.ratio, self.skips, self.error = 1.0, 0, 0.0  # accumulated since the last computed step

    def skip(self, index: int, forced: bool, ready: bool) -> bool:
        if not forced:
            self.ratio *= self.ratios[index]
            self.skips += 1
            self.error += abs(1.0 - self.ratio)
            # threshold 0 never skips (diffusers' `error <= threshold` would, where a ratio is exactly 1.0)
            within = self.threshold > 0 and self.error <= self.threshold
            if ready and within and self.skips <= self.max_skips:
                return True
        self.ratio, self.skips, self.error = 1.0, 0, 0.0
        return False


class TaylorSeerRule:
    """One branch's TaylorSeer schedule: after the `warmup` steps, diffusers' compute steps are those with
    (step - warmup - 1) % interval == 0, so the first step after the warm-up is already forecast."""

    def __init__(self, warmup: int, interval: int):
        self.warmup, self.interval = warmup, interval

    def skip(self, index: int, forced: bool, ready: bool) -> bool:
        return not forced and ready and (index - self.warmup - 1) % self.interval != 0

"""The skip rules of the step caches that read a signal, per CFG branch, as their papers define them; host-side
decisions over one signal tensor per step (what the signal is: blocks.py; the rules on a schedule, magcache
and taylorseer: schedules.py). `agree` turns this rank's (sum |now - before|,
sum |before|) into the sums over every rank holding a shard of the tokens (identity on one process).

- fbcache (First Block Cache, ParaAttention; diffusers' hooks/first_block_cache.py): the signal is the first
  block's residual (its output - its input, the first stream); the remaining blocks are skipped while its
  relative L1 change against the last *computed* step's stays below the threshold.
- teacache (TeaCache, Liu et al. 2024, "Timestep Embedding Tells"): the signal is the first block's
  timestep-modulated input; its relative L1 change against the *previous* step's, rescaled by the model's
  fitted polynomial (none: as it is), is accumulated; every block is skipped while the sum stays below the
  threshold, and a computed step starts the sum again at 0.

Both: a forced step (warm-up, the last step, a first call, changed shapes) is computed; threshold 0 never skips.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Agree = Callable[[torch.Tensor], torch.Tensor]  # [2] float32 sums of this rank -> the sums over the ranks

# diffusers' FirstBlockCacheConfig.threshold default; TeaCache4FLUX's README: 0.25 for 1.5x (0.4: 1.8x, 0.6: 2.0x);
# diffusers' MagCacheConfig.threshold default (taylorseer has none: a schedule, schedules.py)
DEFAULT_THRESHOLDS = {"fbcache": 0.05, "teacache": 0.25, "magcache": 0.06}
# the first step is always computed (nothing to compare with), and the last one; taylorseer: diffusers'
# disable_cache_before_step; magcache: None, 20% of each request's steps (schedules.py magcache_warmup)
DEFAULT_WARMUP_STEPS: dict[str, int | None] = {"fbcache": 1, "teacache": 1, "taylorseer": 3, "magcache": None}


def l1_sums(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """[sum |now - before|, sum |before|] in float32: their ratio is the relative L1 change."""
    before = before.float()
    return torch.stack([(now.float() - before).abs().sum(), before.abs().sum()])


def relative_l1(now: torch.Tensor, before: torch.Tensor, agree: Agree) -> float:
    change, size = agree(l1_sums(now, before)).tolist()
    return change / size if size > 0 else float("inf")


def polynomial(coefficients: Sequence[float] | None, x: float) -> float:
    """coefficients highest power first (numpy.poly1d's order); None: x itself."""
    if coefficients is None:
        return x
    value = 0.0
    for c in coefficients:
        value = value * x + c
    return value


class FirstBlockRule:
    """One branch's First Block Cache decisions."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.before: torch.Tensor | None = None  # the signal of the last computed step
        self.last_change: float | None = None

    def skip(self, signal: torch.Tensor, forced: bool, agree: Agree) -> bool:
        usable = self.before is not None and self.before.shape == signal.shape
        if not forced and usable and self.threshold > 0:
            self.last_change = relative_l1(signal, self.before, agree)  # type: ignore[arg-type]  # (usable)
            if self.last_change < self.threshold:
                return True
        self.before = signal
        return False


class TeaCacheRule:
    """One branch's TeaCache decisions."""

    def __init__(self, threshold: float, coefficients: Sequence[float] | None):
        self.threshold = threshold
        self.coefficients = coefficients
        self.before: torch.Tensor | None = None  # the signal of the previous step, computed or not
        self.accumulated = 0.0

    def skip(self, signal: torch.Tensor, forced: bool, agree: Agree) -> bool:
        usable = self.before is not None and self.before.shape == signal.shape
        skipping = False
        if forced or not usable:
            self.accumulated = 0.0
        else:
            self.accumulated += polynomial(self.coefficients, relative_l1(signal, self.before, agree))  # type: ignore[arg-type]
            skipping = self.threshold > 0 and self.accumulated < self.threshold
            if not skipping:
                self.accumulated = 0.0
        self.before = signal
        return skipping


def make_rule(method: str, threshold: float, coefficients: Sequence[float] | None) -> FirstBlockRule | TeaCacheRule:
    return FirstBlockRule(threshold) if method == "fbcache" else TeaCacheRule(threshold, coefficients)

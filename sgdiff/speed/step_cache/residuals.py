"""What a cached range keeps of a computed step to stand in for its blocks on a skipped one: the residual
as it was (fbcache, teacache, magcache), or a forecast of it (taylorseer)."""

from __future__ import annotations

import math

import torch

Streams = tuple[torch.Tensor, ...]


class Residual:
    """A range's residual (its output - its input, per stream) computed at `step`, reused as it is."""

    def __init__(self, streams: Streams, step: int, before: Residual | None = None):
        # (`before`, the range's residual of the computed step before: a forecast's, TaylorSeries's, only)
        self.streams, self.step = streams, step
        self.shapes = tuple(s.shape for s in streams)

    def at(self, step: int) -> Streams:
        return self.streams


TAYLORSEER_MAX_ORDER = 1  # diffusers' TaylorSeerCacheConfig.max_order


class TaylorSeries(Residual):
    """TaylorSeer's forecast of a range's residual over the step index: per stream, Taylor factors in
    float32, order 0 the residual computed at `step`, order k+1 the change of order k per step since the
    computed step `before` (divided differences, as diffusers' TaylorSeerState.update; only order 0 after a
    request's first computed step or when the shapes changed). A later step forecasts
    sum_k factor_k * offset**k / k!, offset = the steps since `step`."""

    def __init__(self, streams: Streams, step: int, before: Residual | None = None):
        self.step, self.shapes = step, tuple(s.shape for s in streams)
        self.dtypes = tuple(s.dtype for s in streams)
        self.streams = ()  # (the factors hold them: no second copy)
        previous: list[list[torch.Tensor]] = []  # the factors of the computed step before, `gap` steps back
        gap = 0
        if isinstance(before, TaylorSeries) and before.step < step:
            previous, gap = before.factors, step - before.step
        self.factors: list[list[torch.Tensor]] = []  # per stream: [order 0, order 1, ...]
        for i, residual in enumerate(streams):
            factors = [residual.float()]
            older = previous[i] if previous else []
            for k in range(min(TAYLORSEER_MAX_ORDER, len(older))):
                if older[k].shape != residual.shape:  # (rows left a batch: the expansion starts again)
                    break
                factors.append((factors[k] - older[k]) / gap)
            self.factors.append(factors)

    def at(self, step: int) -> Streams:
        offset = step - self.step
        forecast = []
        for factors, dtype in zip(self.factors, self.dtypes, strict=True):
            total = factors[0]
            for k in range(1, len(factors)):
                total = total + factors[k] * (offset**k / math.factorial(k))
            forecast.append(total.to(dtype))
        return tuple(forecast)

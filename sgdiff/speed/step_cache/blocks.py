"""A step cache put on a built transformer from outside: each repeated block's forward is wrapped, and the
first block's wrapper decides, on the host, whether this forward runs the blocks or skips them (rules.py,
schedules.py).

The blocks come in segments (the family's CachePlan: FLUX's double-stream then single-stream blocks). Each
segment's cached range is its blocks, less the first block of all under fbcache (it always runs: its residual
is the signal). On a computed forward the range's first block keeps its input streams and its last block
stores the range's residual (output - input, per stream; residuals.py); on a skipped one every block of the
range hands its streams on untouched and the last returns them + the stored residual (taylorseer: its
forecast for this step). Whatever the forward does between segments (FLUX joins text and image) runs as
always, so the skipped forward's output is the computed one's with the residuals of the step they were
stored at.

The wrappers sit inside each block's forward: a block's module hooks (sequence parallelism's sharding and
gathering) run around them, so a rank caches its shards of the tokens; `agree` (parallel/plans.py sets it)
sums the signal's change over the sequence-parallel ranks so that they all decide alike (magcache and
taylorseer read no signal: every rank follows the same schedule). With torch.compile the wrapped forward is
the compiled one: the decision stays outside the compiled graphs.

Each CFG branch, and each sub-forward a family runs within one call (its calls within the same step and
branch, in order), keeps its own state; a request (the denoising stage's record, DenoiseStep.skipped) starts
afresh. Outside a denoising loop (no DenoiseStep) every block runs as it would without the cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sgdiff.pipeline.denoise_step import UNCOND, DenoiseStep, current_step
from sgdiff.pipeline.family import CachePlan
from sgdiff.speed.step_cache.residuals import Residual, Streams, TaylorSeries
from sgdiff.speed.step_cache.rules import Agree, FirstBlockRule, TeaCacheRule, make_rule
from sgdiff.speed.step_cache.schedules import MagCacheRule, TaylorSeerRule, magcache_warmup

SCHEDULED = ("magcache", "taylorseer")  # decided from the step index alone (schedules.py)


@dataclass
class BranchCache:
    """One branch's state within one request."""

    run: dict  # the request's DenoiseStep.skipped (held, so that `is` tells requests apart)
    rule: FirstBlockRule | TeaCacheRule | MagCacheRule | TaylorSeerRule
    residuals: dict[int, Residual] = field(default_factory=dict)  # segment -> its range's residual per stream


@dataclass
class ForwardState:
    """The forward in hand (a cached one)."""

    step: DenoiseStep
    branch: BranchCache
    skip: bool = False
    inputs: dict[int, Streams] = field(default_factory=dict)  # segment -> its range's input streams


class StepCache:
    def __init__(self, method: str, threshold: float | None, warmup_steps: int | None, plan: CachePlan,
                 interval: int | None = None):  # fmt: skip
        """threshold: fbcache's, teacache's and magcache's; interval: taylorseer's; warmup_steps None:
        magcache's, 20% of each request's steps."""
        if method == "teacache" and plan.modulated_input is None:
            raise ValueError("this model offers no TeaCache signal (its family's CachePlan.modulated_input)")
        if method == "magcache" and plan.magnitude_ratios is None:
            raise ValueError("this model offers no MagCache ratios (its family's CachePlan.magnitude_ratios)")
        self.method, self.threshold, self.warmup_steps, self.plan = method, threshold, warmup_steps, plan
        self.interval = interval
        self.kept = TaylorSeries if method == "taylorseer" else Residual  # what a computed range keeps
        self.agree: Agree = lambda sums: sums  # parallel/plans.py: summed over the sequence-parallel ranks
        self.branches: dict[tuple[str, int], BranchCache] = {}
        self.now: ForwardState | None = None
        self.last_call: tuple[int, str, int] | None = None  # (step, branch, call within them) of the last forward
        self.computed = self.skipped = 0  # forwards since the model was loaded
        self.cached_blocks = 0  # blocks a skipped forward does not run
        for s, blocks in enumerate(plan.segments):
            first = 1 if s == 0 and method == "fbcache" else 0
            for i, block in enumerate(blocks):
                entry, exit_ = i == first, i == len(blocks) - 1 and first < len(blocks)
                block.forward = CachedBlock(self, block, s, head=s == 0 and i == 0, entry=entry, exit=exit_,
                                            cached=i >= first)  # fmt: skip
                self.cached_blocks += i >= first

    def report(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "threshold": self.threshold,
            "warmup_steps": self.warmup_steps,
            "interval": self.interval,
            "blocks_per_skip": self.cached_blocks,
            "computed_forwards": self.computed,
            "skipped_forwards": self.skipped,
        }

    def begin(self) -> ForwardState | None:
        """The first block is called: a new forward, cached when inside a denoising loop."""
        step = current_step()
        if step is None:
            self.now = None
            return None
        ordinal = 0
        if self.last_call is not None and self.last_call[:2] == (step.index, step.branch):
            ordinal = self.last_call[2] + 1
        self.last_call = (step.index, step.branch, ordinal)
        key = (step.branch, ordinal)
        branch = self.branches.get(key)
        if branch is None or branch.run is not step.skipped:  # a new request
            branch = self.branches[key] = BranchCache(step.skipped, self.new_rule(step.total, step.branch))
        self.now = ForwardState(step, branch)
        return self.now

    def new_rule(self, steps: int, branch: str) -> FirstBlockRule | TeaCacheRule | MagCacheRule | TaylorSeerRule:
        if self.method == "magcache":
            ratios = self.plan.magnitude_ratios
            if branch == UNCOND and self.plan.magnitude_ratios_uncond is not None:
                ratios = self.plan.magnitude_ratios_uncond
            assert self.threshold is not None and ratios is not None  # (resolved, checked)
            return MagCacheRule(self.threshold, ratios, steps, self.plan.magcache_max_skips)
        if self.method == "taylorseer":
            assert self.warmup_steps is not None and self.interval is not None  # (resolved)
            return TaylorSeerRule(self.warmup_steps, self.interval)
        assert self.threshold is not None  # (resolved)
        return make_rule(self.method, self.threshold, self.plan.rescale)

    def forced(self, step: DenoiseStep) -> bool:
        warmup = magcache_warmup(step.total) if self.warmup_steps is None else self.warmup_steps
        return step.index < warmup or step.index == step.total - 1

    def ready(self, branch: BranchCache, streams: tuple) -> bool:
        """A skip needs every range's residual of this branch, of these shapes (rows may have left a batch:
        the first range's input streams tell)."""
        ranges = [s for s in range(len(self.plan.segments)) if self.has_range(s)]
        if any(s not in branch.residuals for s in ranges):
            return False
        first = branch.residuals[ranges[0]]
        return first.shapes == tuple(x.shape for x in streams[: len(first.shapes)])

    def decide(self, signal: torch.Tensor, streams: tuple) -> None:
        """fbcache's and teacache's decision over this forward's signal; `streams`: the first block's arguments."""
        now = self.now
        assert now is not None and isinstance(now.branch.rule, (FirstBlockRule, TeaCacheRule))
        skip = now.branch.rule.skip(signal.detach(), self.forced(now.step), self.agree)
        self.record(skip and self.ready(now.branch, streams))

    def decide_on_schedule(self, streams: tuple) -> None:
        """magcache's and taylorseer's decision, from the step index alone."""
        now = self.now
        assert now is not None and isinstance(now.branch.rule, (MagCacheRule, TaylorSeerRule))
        ready = self.ready(now.branch, streams)
        self.record(now.branch.rule.skip(now.step.index, self.forced(now.step), ready))

    def record(self, skip: bool) -> None:
        now = self.now
        assert now is not None
        now.skip = skip
        if skip:
            self.skipped += 1
            record = now.step.skipped.setdefault(now.step.branch, [])
            if not record or record[-1] != now.step.index:
                record.append(now.step.index)
        else:
            self.computed += 1

    def has_range(self, segment: int) -> bool:
        first = 1 if segment == 0 and self.method == "fbcache" else 0
        return first < len(self.plan.segments[segment])


class CachedBlock:
    """Stands in for one block's forward: runs it, or hands its streams on (see the module's docstring)."""

    def __init__(self, cache: StepCache, block: torch.nn.Module, segment: int, *, head: bool, entry: bool,
                 exit: bool, cached: bool):  # fmt: skip
        self.cache, self.block, self.segment = cache, block, segment
        self.forward: Callable = block.forward  # the block's own (or compiled) forward
        self.head, self.entry, self.exit, self.cached = head, entry, exit, cached

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cache = self.cache
        now = cache.begin() if self.head else cache.now
        if now is None:
            return self.forward(*args, **kwargs)
        if self.head and cache.method in SCHEDULED:
            cache.decide_on_schedule(args)
        if self.head and cache.plan.modulated_input is not None and cache.method == "teacache":
            cache.decide(cache.plan.modulated_input(self.block, args), args)
        if not self.cached:  # fbcache's first block: runs, and its residual decides
            out = self.forward(*args, **kwargs)
            first = out[0] if isinstance(out, tuple) else out
            cache.decide(first - args[0], args)
            return out
        kept = now.branch.residuals.get(self.segment)
        if now.skip and kept is not None:
            streams = tuple(args[: len(kept.shapes)])
            if self.exit:
                streams = tuple(x + r for x, r in zip(streams, kept.at(now.step.index), strict=True))
            return streams if len(streams) > 1 else streams[0]
        if self.entry:
            now.inputs[self.segment] = args  # its first k: the streams the range starts from
        out = self.forward(*args, **kwargs)
        if self.exit:
            outs = out if isinstance(out, tuple) else (out,)
            ins = now.inputs.pop(self.segment)[: len(outs)]
            residual = tuple(o - i for o, i in zip(outs, ins, strict=True))
            now.branch.residuals[self.segment] = cache.kept(residual, now.step.index, kept)
        return out

"""A pipeline is an ordered list of stages over one State object."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np
import torch

from sgdiff.errors import RequestCancelled
from sgdiff.models.attention import AttentionImpl, current_attention_impl, use_attention_impl
from sgdiff.pipeline.batch import BatchRows, merge_states, split_outputs
from sgdiff.sampling import SamplingParams


class ParallelMode(Enum):
    """How a stage runs when several ranks serve one request (the executor follows this)."""

    ALL_RANKS = "all_ranks"  # every rank runs it on the same inputs (replicated)
    RANK0_ONLY = "rank0_only"  # rank 0 runs it; the State fields it names in `shares` are broadcast to the others
    CFG_SPLIT = "cfg_split"  # the conditional and unconditional branches may run on different ranks
    # every rank runs it: its `decode` (parallel/vae.py's) shares the VAE's tiles out over the ranks and
    # gathers them on rank 0, which alone ends with the output
    TILE_SPLIT = "tile_split"


class PipelineEvents(Protocol):
    """What a pipeline reports while it runs (the CLI draws progress from these)."""

    def stage_started(self, name: str) -> None: ...
    def stage_finished(self, name: str, seconds: float) -> None: ...
    def step_finished(self, index: int, total: int, seconds: float) -> None: ...


class NullEvents:
    def request_started(self, index: int, total: int) -> None:
        """(A display's: the events that follow are prompt `index`, from 1, of `total`.)"""

    def stage_started(self, name: str) -> None:
        pass

    def stage_finished(self, name: str, seconds: float) -> None:
        pass

    def step_finished(self, index: int, total: int, seconds: float) -> None:
        pass


@dataclass
class State:
    """Everything one request accumulates on its way through the stages."""

    params: SamplingParams
    device: torch.device
    dtype: torch.dtype
    events: PipelineEvents = field(default_factory=NullEvents)
    # asked between stages and after every denoising step: True ends the request (RequestCancelled).
    # Under several ranks every rank asks at the same points and gets rank 0's answer.
    should_stop: Callable[[], bool] = lambda: False
    inputs: dict[str, bytes] = field(default_factory=dict)  # the request's input files (images) by path
    # A batch (pipeline/batch.py), asked after every denoising step but the last: the indices of the rows
    # to go on with once some members are cancelled (None: every row). Same points and answers on every rank.
    rows_to_keep: Callable[[], torch.Tensor | None] = lambda: None
    cond: dict[str, torch.Tensor] = field(default_factory=dict)  # model inputs of the prompt branch
    uncond: dict[str, torch.Tensor] | None = None  # model inputs of the negative branch (CFG only)
    cfg_scale: float = 1.0
    shared: dict[str, Any] = field(default_factory=dict)  # model inputs both branches share
    latents: torch.Tensor | None = None
    sampler: Any = None  # pipeline.schedule.Sampler, set by the timesteps stage
    generator: torch.Generator | None = None  # the request's seeded noise stream, set by the latents stage
    images: np.ndarray | None = None  # [N, H, W, 3] uint8 (image models)
    videos: np.ndarray | None = None  # [N, T, H, W, 3] uint8 (video models)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)
    # --cache: the denoising steps whose transformer blocks were skipped, per CFG branch (cond, uncond);
    # empty without a step cache (speed/step_cache/)
    skipped_steps: dict[str, list[int]] = field(default_factory=dict)


class Stage:
    """One step of a pipeline. Subclasses set `name` and `parallel` and implement `run`."""

    name: str = "stage"
    parallel: ParallelMode = ParallelMode.ALL_RANKS
    shares: tuple[str, ...] = ()  # RANK0_ONLY: the State fields the other ranks need from it
    # True: it can run once on the merged State of a batch of requests (pipeline/batch.py); the
    # stages before the first batchable one run on each request's own State
    batchable: bool = False

    def run(self, state: State) -> None:
        raise NotImplementedError


class OptionalStage(Stage):
    """Runs `stage` only for requests where `applies(params)` (e.g. image conditioning when an image is given)."""

    def __init__(self, stage: Stage, applies):
        self.stage = stage
        self.applies = applies
        self.name = stage.name
        self.parallel = stage.parallel
        self.shares = stage.shares
        self.batchable = stage.batchable

    def run(self, state: State) -> None:
        if self.applies(state.params):
            self.stage.run(state)


def stop_if_asked(state: State) -> None:
    if state.should_stop():
        raise RequestCancelled("the request was cancelled")


class ComposedPipeline:
    def __init__(
        self,
        name: str,
        stages: list[Stage],
        transformers: list[torch.nn.Module] | None = None,
        loaded: tuple[str, ...] | dict[str, torch.nn.Module] = (),
    ):
        self.name = name
        self.stages = stages
        self.transformers = transformers or []  # the denoising models (what sequence parallelism shards)
        self.loaded = tuple(loaded)  # the names of the model components this process holds
        # those components by name, where the family gave them (components.loaded_modules): what offload moves
        self.modules: dict[str, torch.nn.Module] = dict(loaded) if isinstance(loaded, dict) else {}
        # called after each stage this process runs, even one that failed (offload/: evict what it used)
        self.after_stage: list[Callable[[Stage], None]] = []
        self.rank = 0  # this process's rank when several serve one request: RANK0_ONLY stages run on 0 only
        # share(state, fields): rank 0's values of those State fields to every rank (set by parallel runs)
        self.share: Callable[[State, tuple[str, ...]], None] | None = None
        # the attention every model of this pipeline runs (speed/apply.py, parallel/); None: the process default
        self.attention: AttentionImpl | None = None

    @property
    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def __call__(self, state: State) -> State:
        with torch.inference_mode(), use_attention_impl(self.attention or current_attention_impl()):
            return self.run_stages(state, self.stages)

    def run_batch(self, states: list[State], cancelled: Callable[[], list[bool]]) -> list[State]:
        """Several requests as one batch (their family's batch key agrees): the stages before the first
        batchable one run on each request's own State, the rest once on their merged rows; each State
        gets its own outputs back (none for a member dropped because `cancelled()`, each member's wish,
        said so while others went on). Every rank runs the same batch through the same stages."""
        first = next((i for i, stage in enumerate(self.stages) if stage.batchable), len(self.stages))
        assert first < len(self.stages) and all(stage.batchable for stage in self.stages[first:]), self.stage_names
        with torch.inference_mode(), use_attention_impl(self.attention or current_attention_impl()):
            for state in states:
                self.run_stages(state, self.stages[:first])
            rows = BatchRows([state.latents.shape[0] for state in states], cancelled)  # type: ignore[union-attr]
            merged = self.run_stages(merge_states(states, rows), self.stages[first:])
        split_outputs(merged, states, rows.final_counts())
        return states

    def run_stages(self, state: State, stages: list[Stage]) -> State:
        for stage in stages:
            stop_if_asked(state)
            rank0_only = stage.parallel is ParallelMode.RANK0_ONLY and self.share is not None
            if rank0_only and self.rank != 0:
                if stage.shares:  # (mypy does not see that rank0_only says self.share is set)
                    self.share(state, stage.shares)  # type: ignore[misc]  # receive what rank 0 computed
                continue
            state.events.stage_started(stage.name)
            start = time.perf_counter()
            try:
                stage.run(state)
            finally:
                for done in self.after_stage:
                    done(stage)
            if state.device.type == "cuda":
                torch.cuda.synchronize(state.device)
            if rank0_only and stage.shares:
                self.share(state, stage.shares)  # type: ignore[misc]  # send it
            seconds = time.perf_counter() - start
            state.stage_seconds[stage.name] = seconds
            state.events.stage_finished(stage.name, seconds)
        return state

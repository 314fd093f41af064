"""Several requests as one batch through the stages that can take it (`Stage.batchable`): their
States merged row-wise before those stages, the outputs split back to each request after them.

Which requests may share a batch is the model family's decision (`ModelFamily.batch_key`): they agree
on everything but their rows (prompt embeddings, initial noise), so the merged State holds the first
member's params, sampler and CFG scale, and the `shared` inputs all members have alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from sgdiff.pipeline.base import PipelineEvents, State


class FanOutEvents:
    """PipelineEvents of the merged part of a batch, told to every member's own events."""

    def __init__(self, members: list[PipelineEvents]):
        self.members = members

    def stage_started(self, name: str) -> None:
        for events in self.members:
            events.stage_started(name)

    def stage_finished(self, name: str, seconds: float) -> None:
        for events in self.members:
            events.stage_finished(name, seconds)

    def step_finished(self, index: int, total: int, seconds: float) -> None:
        for events in self.members:
            events.step_finished(index, total, seconds)


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return a == b


def concat_rows(inputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each member's model inputs [N_i, ...] -> the batch's [sum N_i, ...], member after member."""
    return {name: torch.cat([member[name] for member in inputs], dim=0) for name in inputs[0]}


def check_mergeable(states: list[State]) -> None:
    """What the batch key promised: inputs that are not per row are the same for every member."""
    first = states[0]
    for state in states[1:]:
        assert state.shared.keys() == first.shared.keys(), "batch members with different shared inputs"
        assert all(same_value(state.shared[k], first.shared[k]) for k in first.shared), "shared inputs differ"
        assert (state.uncond is None) == (first.uncond is None), "batch members with and without CFG"
        assert state.cfg_scale == first.cfg_scale and state.cond.keys() == first.cond.keys()


class BatchRows:
    """Which members of a running batch are still wanted, and where their rows are. `cancelled()`: each
    member's wish, in member order (rank 0's word on every rank); asked once per question."""

    def __init__(self, counts: list[int], cancelled: Callable[[], list[bool]]):
        self.counts = counts  # each member's rows, in member order
        self.alive = [True] * len(counts)
        self.cancelled = cancelled

    def all_cancelled(self) -> bool:
        return all(self.cancelled())

    def rows_to_keep(self) -> torch.Tensor | None:
        """The indices, among the rows running now, of the members still wanted, once some newly are
        not (None: no change; every member cancelled is the stop's business, not this)."""
        wishes = self.cancelled()
        dropped = [i for i, (alive, cancel) in enumerate(zip(self.alive, wishes, strict=True)) if alive and cancel]
        if not dropped or all(wishes):
            return None
        kept: list[int] = []
        start = 0
        for i, count in enumerate(self.counts):
            if not self.alive[i]:
                continue
            if i not in dropped:
                kept.extend(range(start, start + count))
            start += count
        for i in dropped:
            self.alive[i] = False
        return torch.tensor(kept, dtype=torch.long)

    def final_counts(self) -> list[int]:
        """The rows each member has at the end: its own, or none once dropped."""
        return [count if alive else 0 for count, alive in zip(self.counts, self.alive, strict=True)]


def merge_states(states: list[State], rows: BatchRows) -> State:
    """One State for the batched stages: the members' rows (latents, prompt and negative inputs)
    concatenated along dim 0; events go to every member; it stops when every member asks to, and goes
    on without the rows of members cancelled while others are still wanted."""
    check_mergeable(states)
    first = states[0]
    return replace(
        first,
        events=FanOutEvents([state.events for state in states]),
        should_stop=rows.all_cancelled,
        rows_to_keep=rows.rows_to_keep,
        inputs={path: data for state in states for path, data in state.inputs.items()},
        cond=concat_rows([state.cond for state in states]),
        # (check_mergeable: every member has uncond or none has; the stages before have set the latents)
        uncond=None if first.uncond is None else concat_rows([state.uncond for state in states]),  # type: ignore[misc]
        shared=dict(first.shared),
        latents=torch.cat([state.latents for state in states], dim=0),  # type: ignore[misc]  # [sum N_i, ...]
        generator=None,  # a member's noise stream is its own: batchable stages draw no noise
        images=None,
        videos=None,
        stage_seconds={},
        step_seconds=[],
        skipped_steps={},
    )


def split_outputs(merged: State, states: list[State], rows: list[int]) -> None:
    """The batch's outputs back to its members, `rows[i]` rows each in member order (images
    [N, H, W, 3], videos [N, T, H, W, 3], latents; a member dropped from the batch has 0 rows and no
    outputs); each member gets the batched stages' seconds."""
    start = 0
    for state, count in zip(states, rows, strict=True):
        end = start + count
        for name in ("latents", "images", "videos"):
            value = getattr(merged, name)
            setattr(state, name, value[start:end] if value is not None and count else None)
        state.stage_seconds.update(merged.stage_seconds)
        state.step_seconds.extend(merged.step_seconds)
        state.skipped_steps.update(merged.skipped_steps)
        start = end
    assert merged.latents is None or start == merged.latents.shape[0], "rows of the batch lost"

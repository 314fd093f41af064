"""The one interface a model family declares: how it loads, which sampling fields its requests carry
(its own SamplingParams dataclass), its request rules, its schedule, its shard plan for sequence
parallelism and the groups its transformers offer the speed toggles. Generic code asks the family
and never names a family's field.

A family is one folder under sgdiff/families/ (its transformer's math in it, or under sgdiff/models/)
whose __init__ registers it (pipeline/registry.py finds the folder); a caller may register its own."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sgdiff.errors import UserError
from sgdiff.pipeline.base import ComposedPipeline, PipelineEvents
from sgdiff.sampling import FamilyParams, SamplingParams

if TYPE_CHECKING:
    from sgdiff.models.layers import Linear
    from sgdiff.parallel.groups import ParallelGroups
    from sgdiff.parallel.sequence import SequenceParallelAttention
    from sgdiff.pipeline.registry import ModelInfo
    from sgdiff.pipeline.stages.validation import ValidationRule


@dataclass
class FusableGroups:
    """What one transformer offers the speed toggles (speed/fuse.py applies them)."""

    # Linears (models/layers.py's) that always read the same input, in the order `project` takes them
    projections: list[tuple[Linear, ...]] = field(default_factory=list)
    # Linears whose output goes straight into tanh GELU (the MLPs' input projections)
    gelu_projections: list[Linear] = field(default_factory=list)


@dataclass
class CachePlan:
    """What one transformer offers the step caches (speed/step_cache/ applies them)."""

    # its repeated blocks, in the order its forward runs them (FLUX: the double-stream, then the single-stream
    # blocks). A block's first k positional arguments are its k token streams and it returns them (one: a
    # tensor), updated; between two lists the forward only joins or cuts streams.
    segments: list[list[nn.Module]]
    # TeaCache: the first block's timestep-modulated input, from (that block, its positional arguments);
    # None: the family offers no TeaCache
    modulated_input: Callable[[nn.Module, tuple], torch.Tensor] | None = None
    # TeaCache: the polynomial (highest power first) fitted for the model that rescales the input's relative
    # L1 change to the output's; None: the change as it is
    rescale: tuple[float, ...] | None = None
    # MagCache: the model's magnitude ratios, one per step of the run they were calibrated on (the mean over
    # tokens of ||residual_t|| / ||residual_t-1||, the first 1.0); None: the family offers no MagCache
    magnitude_ratios: tuple[float, ...] | None = None
    # MagCache: the negative (CFG) branch's own ratios where they were calibrated apart (Wan); None: the above
    magnitude_ratios_uncond: tuple[float, ...] | None = None
    # MagCache: the most steps skipped in a row (K in its paper) its authors use for this model
    magcache_max_skips: int = 3


class imported_when_used:  # noqa: N801 - used as a decorator-like descriptor, spelled as a function
    """A family's function that lives in a heavier module of its folder (its pipeline, its shard plan),
    imported when it is first used: finding a checkpoint's family imports no other family's code.

    >>> load = imported_when_used("sgdiff.families.wan.pipeline", "load_wan_pipeline")"""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name  # name may be dotted: "WanSchedule.from_dict"

    def __get__(self, instance: Any, owner: type) -> Any:
        value = importlib.import_module(self.module)
        for part in self.name.split("."):
            value = getattr(value, part)
        return value


class ModelFamily:
    """Subclass, fill in the class attributes and the methods the family needs, and register an
    instance (registry.register_family)."""

    name: str = ""
    pipeline_classes: tuple[str, ...] = ()  # the model_index.json `_class_name`s it serves
    output: str = "image"  # or "video"
    sampling: type[SamplingParams] = SamplingParams  # the fields its requests may carry
    text_encoders: frozenset[str] = frozenset({"text_encoder"})  # parts only rank 0 loads

    def schedule(self, options: dict[str, Any], /) -> Any:
        """The schedule object from the merged scheduler options (preset < checkpoint); refuses what
        it cannot honour, before any weight loads."""
        raise NotImplementedError

    def rules(self, info: ModelInfo) -> list[ValidationRule]:
        """Request checks from the checkpoint's configs, run before any weight loads (and again by
        the pipeline's validation stage)."""
        return []

    def load(
        self,
        model_dir: Path,
        device: torch.device,
        dtype: torch.dtype,
        schedule: Any,
        events: PipelineEvents,
        skip: frozenset[str],
        ahead: Sequence[SamplingParams] = (),
    ) -> ComposedPipeline:
        """The loaded pipeline; `skip` names components this process never runs (None in their place);
        `ahead`: requests to come, whose prompts the family may encode while its transformer still loads
        (stages/text_encoding.py, encode_ahead)."""
        raise NotImplementedError

    def fill_unset(self, info: ModelInfo, params: FamilyParams, unset: frozenset[str]) -> FamilyParams:
        """`params` with the fields that neither the caller nor the preset set (`unset`) given the values the
        request's own inputs imply (e.g. an edit model's output size, from its input image's aspect ratio);
        before `adjust` and the rules."""
        return params

    def adjust(self, params: FamilyParams) -> FamilyParams:
        """A request's values made final (e.g. a frame count rounded as asked)."""
        return params

    def given_rules(self, given: set[str], params: FamilyParams) -> None:
        """Refuse fields given explicitly (`given`) that this request would silently ignore."""

    def cfg_scale_of(self, params: FamilyParams) -> float | None:
        """The request's CFG scale, or None when it runs without CFG (CFG parallel has nothing to split)."""
        return None

    def batch_key(self, params: FamilyParams) -> Hashable | None:
        """Requests with equal keys may run as one batch (pipeline/batch.py): they differ only in what
        each row of the batch holds (prompt, negative prompt, seed), never in what every row shares
        (size, steps, guidance, ...). None: this request always runs alone (the default)."""
        return None

    def input_images(self, params: FamilyParams) -> list[str]:
        """The images (paths or URLs) the request reads, fetched once by the engine before it runs."""
        return []

    def activation_floor(self, info: ModelInfo, params: SamplingParams, dtype: torch.dtype) -> int:
        """The least memory, in bytes, a request like `params` needs for its own tensors at their peak,
        besides the weights: a lower bound, with which engine/memory.py refuses on the CPU what surely
        cannot fit, before anything is allocated. 0: unknown."""
        return 0

    def fps(self, params: FamilyParams) -> int | None:
        """Frames per second of a video request's output (None: image models, or the writer's default)."""
        return None

    def shard(self, model: nn.Module, attention: SequenceParallelAttention, groups: ParallelGroups) -> None:
        """Split and join `model`'s tokens for sequence parallelism: forward hooks added to
        `attention.hooks` (parallel/plans.py has the shared pieces)."""
        raise UserError(f"sequence parallelism is not available for {self.name} models", field="ulysses_degree")

    def fusable(self, model: nn.Module) -> FusableGroups:
        return FusableGroups()

    def cache_plan(self, model: nn.Module) -> CachePlan:
        """The step caches' view of `model`; by default its nn.ModuleLists' blocks, no TeaCache."""
        return CachePlan([list(child) for child in model.children() if isinstance(child, nn.ModuleList)])

    def warm_up(
        self,
        info: ModelInfo,
        params: FamilyParams,
        device: torch.device,
        dtype: torch.dtype,
        prepare: Callable[[nn.Module], None],
    ) -> None:
        """Run once the kernels a request like `params` runs in its denoising steps, on a transformer of
        one block of each kind with uninitialised weights (`prepare` gives it the speed toggles), so that
        their first calls (Triton's loading, CUDA's lazy loading, cuBLAS and cuDNN plans) are paid while
        the checkpoint loads (speed/warm_up.py). Families without one: nothing."""

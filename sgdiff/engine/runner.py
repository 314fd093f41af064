"""One model in this process: resolve a checkpoint, pick its preset, check requests, load its
pipeline once, run requests one by one. The engine (service.py) runs one of these on a thread of the
caller's process, or one per worker process on several GPUs (worker.py)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from sgdiff.config import RECOMMENDED_CACHE, Preset, RuntimeConfig, merge_layers, select_preset, with_recommended_cache
from sgdiff.engine.adapters import EngineAdapters, Wanted
from sgdiff.engine.memory import cap_gpu_memory, check_gpu_memory_limit
from sgdiff.errors import UserError
from sgdiff.models.resolve import is_hub_repo, resolve_model_path, snapshot_commit
from sgdiff.offload.apply import Offloaded, apply_offload, check_offload, load_device, place
from sgdiff.pipeline.base import ComposedPipeline, NullEvents, PipelineEvents, State
from sgdiff.pipeline.registry import family_of_field, inspect_model
from sgdiff.pipeline.vae_tiling import apply_vae_tiling
from sgdiff.sampling import SamplingParams, build_sampling_params, sampling_fields
from sgdiff.speed.apply import apply_speed, check_speed, resolve_speed
from sgdiff.speed.warm_up import start_warm_up, warms_up

DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"`device` {name} is not a device: use cpu, cuda or cuda:N", field="device") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"`device` {name}: sgdiff runs on cpu, cuda or cuda:N", field="device")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"`device` {name}: no CUDA GPU is visible; use `device` cpu", field="device")
    return device


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"`dtype` {name} is not supported: use bf16, fp16 or fp32", field="dtype")
    return DTYPES[name]


@dataclass
class GenerationResult:
    params: SamplingParams
    images: np.ndarray | None  # [N, H, W, 3] uint8 (image models)
    videos: np.ndarray | None  # [N, T, H, W, 3] uint8 (video models)
    stage_seconds: dict[str, float]
    step_seconds: list[float]
    total_seconds: float
    peak_gpu_memory_bytes: int | None  # during this request (None on CPU)
    latents: torch.Tensor | None = None  # the final latents, before decoding (None once sent between processes)
    peak_rss_bytes: int = 0  # of the process that ran it, so far
    fps: int | None = None  # video models: frames per second the request asks for (None: the writer's default)
    batch_size: int = 1  # how many requests ran in the batch this one was part of
    # --cache: the steps whose blocks were skipped, per CFG branch run in this process (empty: none)
    skipped_steps: dict[str, list[int]] = field(default_factory=dict)


class ModelRunner:
    """Load a model once, generate many times, in this process.

    >>> runner = ModelRunner("black-forest-labs/FLUX.1-dev")
    >>> result = runner.generate(runner.sampling_params("a red cube", seed=7))
    """

    def __init__(
        self,
        model_path: str,
        preset: str | None = None,
        runtime: RuntimeConfig = RuntimeConfig(),
        events: PipelineEvents | None = None,
        revision: str | None = None,
    ):
        """`revision`: a branch, tag or commit hash of the Hub repo `model_path` names (default: main)."""
        self.model_path = model_path
        self.events = events or NullEvents()
        self.device = resolve_device(runtime.device)
        self.dtype = resolve_dtype(runtime.dtype, self.device)
        # (`cache` recommended is the preset's, known below: the other toggles are checked before the model is found)
        recommended = runtime.speed.cache == RECOMMENDED_CACHE
        self.speed = resolve_speed(replace(runtime.speed, cache="none") if recommended else runtime.speed,
                                   self.device, self.dtype)  # fmt: skip
        self.attention = check_speed(self.speed, self.device, self.dtype)
        self.offload = runtime.offload
        check_offload(self.offload, self.speed)
        self.offloaded: Offloaded | None = None  # what load() offloaded
        self.vae_tiling = runtime.vae_tiling
        self.gpu_memory_limit = runtime.gpu_memory_limit
        check_gpu_memory_limit(self.device, self.gpu_memory_limit)
        self.from_hub = is_hub_repo(model_path)
        self.model_dir = resolve_model_path(model_path, revision)
        self.model_commit = snapshot_commit(self.model_dir)  # the Hub commit loaded (None: not a HF cache snapshot)
        self.info = inspect_model(self.model_dir)
        self.preset: Preset | None = select_preset(
            preset, model_path, self.info.pipeline_class, self.info.transformer_config, self.info.model_index
        )
        if recommended:
            self.speed = resolve_speed(with_recommended_cache(runtime.speed, self.preset), self.device, self.dtype)
        self.family = self.info.family
        self._rules = self.family.rules(self.info)
        # preset [schedule] < the checkpoint's scheduler_config.json; checked now, before any weight loads
        schedule_options = merge_layers(self.preset.schedule if self.preset else None, self.info.scheduler_config)
        self.schedule = self.family.schedule(schedule_options)
        if self.preset is not None and self.preset.schedule:  # its own values too, though the checkpoint's win
            try:
                self.family.schedule(self.preset.schedule)
            except UserError as exc:
                raise UserError(f"preset {self.preset.name}: [schedule] {exc}") from None
        # LoRA adapters: their files read now (a bad one refused before any weight loads), applied by load()
        self.adapters = EngineAdapters(runtime.lora, runtime.gpu_memory_limit)
        self.pipeline: ComposedPipeline | None = None  # load() makes it
        self.load_seconds = 0.0

    def sampling_params(self, prompt: str, loras: Wanted | None = None, **fields: Any) -> SamplingParams:
        """The family's defaults < the preset < `fields` (None means not given), checked against this
        model's rules: an instance of the family's own SamplingParams dataclass. `loras`: the LoRA adapters
        to run with, (name, scale or None for the adapter's own), of those loaded (None: every one at its
        scale; engine/adapters.py)."""
        family = self.family
        given = {name for name, value in fields.items() if value is not None}
        for name in sorted(given - sampling_fields(family.sampling)):
            if family_of_field(name) is not None:  # another family's field
                kind = "an image" if family.output == "image" else "a video"
                raise UserError(f"`{name}` does not apply to {self.info.pipeline_class} ({kind} model)", field=name)
        params = build_sampling_params(family.sampling, prompt, self.preset, fields)
        unset = sampling_fields(family.sampling) - given - set(self.preset.sampling if self.preset else ())
        params = family.adjust(family.fill_unset(self.info, params, frozenset(unset)))
        family.given_rules(given, params)
        if params.generator_device == "cuda" and self.device.type != "cuda":
            raise UserError("`generator_device` cuda needs the model on a CUDA device", field="generator_device")
        for rule in self._rules:
            rule(params)
        return replace(params, loras=self.adapters.resolve(loras))

    def batch_key(self, params: SamplingParams) -> Hashable | None:
        """The family's batch key (ModelFamily.batch_key), and the adapters: a batch runs with one set of scales."""
        key = self.family.batch_key(params)
        return None if key is None else (key, params.loras)

    def load(
        self,
        skip: frozenset[str] = frozenset(),
        warm_up: SamplingParams | None = None,
        encode_ahead: Sequence[SamplingParams] = (),
    ) -> None:
        """Load every component once; `skip` names components this process never runs (e.g. the text
        encoders on the ranks that receive the prompt embeddings from rank 0). `encode_ahead`: requests
        to come, whose prompts are encoded while the transformer still loads (the text encoders' first
        kernels paid there: FLUX.1-dev's text stage took 0.49 s in the request on an H100, run FG).
        `warm_up`: a request like those to come, whose kernels then warm up meanwhile on a GPU
        (speed/warm_up.py): the first request runs as fast as the next ones, but the load takes longer
        (on an H100, FLUX.1-dev's first step 0.20 s instead of 1.01 s and its text 0.07 s instead of
        0.49 s, the load 4.8 s instead of 1.7 s: docs/benchmarks.md, run FG), so only a server, which
        loads once, asks for it."""
        if self.pipeline is not None:
            return
        cap_gpu_memory(self.device, self.gpu_memory_limit)  # before the first byte lands on the GPU
        start = time.perf_counter()
        warming = None
        if warm_up is not None and warms_up(self.device, self.speed):
            warming = start_warm_up(
                self.family, self.info, warm_up, self.device, self.dtype, self.speed, self.attention, self.events
            )
        loading = load_device(self.offload, self.device)  # the CPU where parts wait there (offload/apply.py)
        ahead = encode_ahead if loading == self.device else ()  # (text encoders in CPU memory: in the request)
        try:
            pipeline = self.family.load(self.model_dir, loading, self.dtype, self.schedule, self.events, skip, ahead)
        finally:
            if warming is not None:
                warming.join()
        place(pipeline, self.offload, self.device)
        # LoRA adapters: on the transformer where it computes, before the speed toggles (fused: the updates go
        # into the full-precision weights, which FP8 then quantises once; unfused: torch.compile traces the
        # blocks with their low-rank factors, once, and switching scales never compiles again) and before
        # offloading (it swaps weights for placeholders; it lends the unfused factors with their Linears and keeps
        # their scales, written per request, on the device: models/lora.py)
        self.adapters.apply(pipeline)
        apply_speed(pipeline, self.speed, self.attention, self.family, self.device)
        if self.vae_tiling:
            apply_vae_tiling(pipeline)
        self.offloaded = apply_offload(pipeline, self.offload, self.device, self.family.text_encoders,
                                       self.gpu_memory_limit)  # fmt: skip
        self.pipeline = pipeline
        self.load_seconds = time.perf_counter() - start

    def default_request(self) -> SamplingParams | None:
        """A request with every field at this model's default (None where the model has no such request,
        e.g. one that needs an input image)."""
        try:
            return self.sampling_params("a default request")
        except UserError:
            return None

    def generate(
        self,
        params: SamplingParams,
        events: PipelineEvents | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        inputs: dict[str, bytes] | None = None,
    ) -> GenerationResult:
        """Run one request; `events` (default: the runner's) hear its progress; `should_stop()`, asked
        between stages and steps, ends it early with RequestCancelled; `inputs`: the bytes of its
        input files, by path, as the engine fetched them (a file not among them is read here)."""
        self.load()
        self.adapters.activate(params.loras)
        self._reset_peak_memory()
        start = time.perf_counter()
        state = State(params, self.device, self.dtype, events or self.events, should_stop, inputs or {})
        assert self.pipeline is not None  # (loaded)
        state = self.pipeline(state)
        return self._result(state, time.perf_counter() - start, batch_size=1)

    def generate_batch(
        self,
        params_list: list[SamplingParams],
        events_list: list[PipelineEvents],
        cancelled: Callable[[], list[bool]] | None = None,
        inputs_list: list[dict[str, bytes]] | None = None,
    ) -> list[GenerationResult | None]:
        """Run requests that share a batch key (ModelFamily.batch_key) as one batch: each keeps its
        prompt, seed, progress `events` and result. `cancelled()`: each member's wish to stop, asked
        between stages and steps; a member that wishes so while others go on is dropped from the batch
        after the step in hand (its result None), every member wishing so ends the batch
        (RequestCancelled)."""
        self.load()
        self.adapters.activate(params_list[0].loras)  # (one batch key: one set of adapters)
        self._reset_peak_memory()
        start = time.perf_counter()
        cancelled = cancelled or (lambda: [False] * len(params_list))
        inputs_list = inputs_list or [{} for _ in params_list]
        states = [
            State(params, self.device, self.dtype, events, lambda: all(cancelled()), inputs)
            for params, events, inputs in zip(params_list, events_list, inputs_list, strict=True)
        ]
        assert self.pipeline is not None  # (loaded)
        states = self.pipeline.run_batch(states, cancelled)
        seconds = time.perf_counter() - start
        return [
            self._result(state, seconds, batch_size=len(states)) if state.latents is not None else None
            for state in states
        ]

    def _reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def _result(self, state: State, seconds: float, batch_size: int) -> GenerationResult:
        on_gpu = self.device.type == "cuda"
        return GenerationResult(
            params=state.params,
            images=state.images,
            videos=state.videos,
            stage_seconds=state.stage_seconds,
            step_seconds=state.step_seconds,
            total_seconds=seconds,
            peak_gpu_memory_bytes=torch.cuda.max_memory_allocated(self.device) if on_gpu else None,
            latents=state.latents,
            peak_rss_bytes=self.peak_rss_bytes(),
            fps=self.family.fps(state.params),
            batch_size=batch_size,
            skipped_steps=state.skipped_steps,
        )

    @staticmethod
    def peak_rss_bytes() -> int:
        """Peak resident memory of this process so far (Linux reports KiB)."""
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

"""The engine: one loaded model serving many requests, from any thread, for any client (the CLI, a
server, a Python caller). It checks each request in the caller's thread, queues it, runs one at a
time (or, with BatchingConfig, requests that can share a forward pass as one batch) and hands back a
RequestHandle (progress events, cancel, the result as arrays). On one GPU the model runs on a thread
of this process; on several, in a pool of worker processes started once."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch

from sgdiff.config import (
    BatchingConfig,
    EngineConfig,
    LoraConfig,
    OffloadConfig,
    ParallelConfig,
    RuntimeConfig,
    SpeedConfig,
    switching_loras,
)
from sgdiff.engine.handle import RequestHandle
from sgdiff.engine.ranks import under_torchrun
from sgdiff.engine.runner import GenerationResult, ModelRunner
from sgdiff.errors import UserError
from sgdiff.io.input_image import fetch
from sgdiff.models.resolve import DEMO_IMAGE_MODEL
from sgdiff.offload.apply import check_offload_parallel
from sgdiff.pipeline.base import NullEvents, PipelineEvents
from sgdiff.sampling import SamplingParams

SPEED_OPTIONS = [f.name for f in fields(SpeedConfig)]


@dataclass
class GenerationOutput:
    """What `engine(prompt)` returns, as a diffusers pipeline would: PIL images (image models) or
    videos as lists of PIL frames (video models), and the raw result (uint8 arrays, timings)."""

    images: list | None
    videos: list[list] | None
    result: GenerationResult

    @classmethod
    def of(cls, result: GenerationResult) -> GenerationOutput:
        from PIL import Image

        images = [Image.fromarray(np.asarray(image)) for image in result.images] if result.images is not None else None
        videos = None
        if result.videos is not None:
            videos = [[Image.fromarray(np.asarray(frame)) for frame in video] for video in result.videos]
        return cls(images, videos, result)


class Engine:
    """Load a model once and serve requests.

    >>> engine = Engine.from_pretrained("black-forest-labs/FLUX.1-schnell")
    >>> engine("a red cube", seed=7).images[0].save("cube.png")
    >>> handle = engine.submit("a blue sphere", num_inference_steps=8)   # returns at once
    >>> for event in handle.events(): ...                                # progress, step by step
    >>> handle.result().images                                           # [N, H, W, 3] uint8
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        preset: str | None = None,
        runtime: RuntimeConfig = RuntimeConfig(),
        parallel: ParallelConfig = ParallelConfig(),
        load_events: PipelineEvents | None = None,
        batching: BatchingConfig = BatchingConfig(),
        revision: str | None = None,
    ):
        """Resolve the model and check the configuration (nothing loads yet: start() or the first
        submit() loads). `model`: a Hub repo id, a local diffusers-format folder or an embedded demo
        model's name (default: sgdiff/demo-image). `revision`: a branch, tag or commit hash of a Hub
        repo id (default: its main; refused for a folder). `batching`: requests that may share a forward
        pass (the model family decides which) and arrive within its delay run as one batch."""
        if under_torchrun():  # the processes torchrun started are the ranks
            world = int(os.environ["WORLD_SIZE"])
            if parallel.num_gpus not in (1, world):
                raise UserError(
                    f"`num_gpus` {parallel.num_gpus} but torchrun started {world} processes", field="num_gpus"
                )
            parallel = replace(parallel, num_gpus=world)
        self.parallel = parallel.resolved()
        assert self.parallel.ulysses_degree is not None and self.parallel.ring_degree is not None  # resolved
        backend = runtime.speed.attention_backend
        if self.parallel.ring_degree > 1 and backend != "auto":
            raise UserError(  # a ring merges partial attentions by their log-sum-exp: its own kernels
                f"`attention_backend` {backend} cannot run ring attention, which needs each block's log-sum-exp "
                "(cuDNN on Hopper, else flash): use `attention_backend` auto with `ring_degree`",
                field="attention_backend",
            )
        check_offload_parallel(runtime.offload, self.parallel)
        self.revision = revision
        self.config = EngineConfig(model or DEMO_IMAGE_MODEL, preset, runtime, self.parallel, batching, revision)
        self.load_events = load_events or NullEvents()
        self.runner = ModelRunner(self.config.model_path, preset, runtime, self.load_events, revision)
        if self.runner.from_hub and self.runner.model_commit is not None:
            # worker processes load the very commit resolved here, even if its branch moves meanwhile
            self.config = replace(self.config, revision=self.runner.model_commit)
        if self.parallel.num_gpus > 1 or under_torchrun():
            from sgdiff.parallel.plans import check_heads  # (parallel/ is imported by several processes only)

            heads = self.runner.info.transformer_config.get("num_attention_heads", 1)
            check_heads(heads, self.parallel.ulysses_degree, self.parallel.ring_degree)
            if not under_torchrun():
                check_devices(runtime.device, self.parallel.num_gpus)
        self._executor: Any = None
        self._placements: tuple[Any, ...] | None = None  # WeightPlacements (_weight_placements)
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def from_pretrained(
        cls,
        model: str | None = None,
        *,
        dtype: str | None = None,
        device: str | None = None,
        num_gpus: int = 1,
        ulysses_degree: int | None = None,
        ring_degree: int | None = None,
        enable_cfg_parallel: bool = False,
        preset: str | None = None,
        revision: str | None = None,
        max_batch_size: int = 1,
        batching_delay_ms: float = 0.0,
        vae_tiling: bool = False,
        cpu_offload: str = "none",
        text_encoder_offload: bool = False,
        offload_prefetch: int = 1,
        offload_resident_blocks: int | str = "auto",
        gpu_memory_limit: int | None = None,
        loras: Sequence[tuple[str, float]] = (),
        lora_mode: str = "auto",
        lora_switching: bool = False,
        **speed: Any,
    ) -> Engine:
        """Load `model` and return the engine, ready. `max_batch_size`, `batching_delay_ms`: BatchingConfig
        (1: every request runs alone). `vae_tiling`, `gpu_memory_limit` (bytes each process may allocate on its
        GPU): RuntimeConfig's. `cpu_offload`, `text_encoder_offload`, `offload_prefetch`,
        `offload_resident_blocks`: OffloadConfig's.
        `loras` ((a .safetensors file, folder or Hub repo id, scale), ...), `lora_mode`: LoraConfig's;
        `lora_switching`: each request picks its adapters (`request(..., loras=...)`), as on a server
        (config.py switching_loras), instead of all running the configured ones.
        `speed`: SpeedConfig's toggles by name (attention_backend="auto", fused_projections, fused_gelu,
        fused_norms, torch_compile, cuda_graph, dit_precision="default")."""
        unknown = sorted(set(speed) - set(SPEED_OPTIONS))
        if unknown:
            raise UserError(f"unknown engine option(s) {unknown}; the speed options are {SPEED_OPTIONS}")
        offload = OffloadConfig(cpu_offload, text_encoder_offload, offload_prefetch, offload_resident_blocks)
        lora = LoraConfig(tuple((source, scale) for source, scale in loras), lora_mode)
        runtime = RuntimeConfig(device, dtype, SpeedConfig(**speed), vae_tiling, offload, gpu_memory_limit, lora)
        parallel = ParallelConfig(num_gpus, ulysses_degree, ring_degree, enable_cfg_parallel)
        if lora_switching:
            runtime = switching_loras(runtime, parallel)
        batching = BatchingConfig(max_batch_size, batching_delay_ms)
        engine = cls(model, preset=preset, runtime=runtime, parallel=parallel, batching=batching, revision=revision)
        engine.start()
        return engine

    # What the engine serves.

    @property
    def output_kind(self) -> str:
        """What the model makes: image or video."""
        return self.runner.family.output

    @property
    def preset_name(self) -> str | None:
        return self.runner.preset.name if self.runner.preset else None

    @property
    def model_commit(self) -> str | None:
        """The Hub commit the model was loaded from (its HF cache snapshot's name); None for a folder that
        is not such a snapshot (an embedded demo model, a checkpoint of one's own)."""
        return self.runner.model_commit

    @property
    def lora_mode(self) -> str | None:
        """How the LoRA adapters are applied: fused or unfused (None: there are none)."""
        return self.runner.adapters.mode if self.runner.adapters else None

    @property
    def lora_switching(self) -> bool:
        """Whether requests choose their LoRA adapters (a server's, or unfused ones), rather than all running
        the configured ones."""
        return self.runner.adapters.switching

    def loras(self) -> list[dict[str, Any]]:
        """The LoRA adapters loaded: name (what a request calls it), source, scale (what a request naming it
        without one gets), rank (its largest), layers (the Linears it updates) and mode."""
        return self.runner.adapters.describe()

    def lora_record(self, params: SamplingParams) -> list[dict[str, Any]]:
        """The adapters a request ran with, as its outputs' metadata records them: name, source, scale."""
        return self.runner.adapters.record(params.loras)

    @property
    def load_seconds(self) -> float:
        return self._executor.load_seconds if self._executor is not None else 0.0

    def health(self) -> str | None:
        """None while the engine can take requests; else why not (a worker died, it is closed)."""
        if self._closed:
            return "the engine is closed"
        return self._executor.health() if self._executor is not None else None

    def pending(self) -> int:
        """Requests queued or running (a server's queue depth)."""
        return self._executor.dispatcher.pending() if self._executor is not None else 0

    # Requests.

    def request(self, prompt: str, **fields: Any) -> SamplingParams:
        """A request checked against this model, nothing run: defaults < the preset < `fields`
        (SamplingParams' names; None means not given). `loras`: the LoRA adapters it runs with, of those
        loaded, as (name, scale) pairs (scale None: the adapter's own; None: every one at its scale; where
        requests do not switch adapters, only that). Raises UserError naming what is wrong."""
        params = self.runner.sampling_params(prompt, **fields)
        if self.parallel.enable_cfg_parallel and self.runner.family.cfg_scale_of(params) is None:
            raise UserError(
                "`enable_cfg_parallel` splits the prompt and negative branches of CFG, but this request runs "
                "without CFG: give it a negative prompt and a CFG scale above 1, in the fields this model takes",
                field="enable_cfg_parallel",
            )
        for path in self.runner.family.input_images(params):
            fetch(path)  # a bad file or URL fails here, before anything loads or runs
        self._check_memory(params)
        return params

    def _check_memory(self, params: SamplingParams) -> None:
        """Refuse a request that surely cannot fit: on the CPU in the memory available (engine/memory.py), on
        one GPU in the GPU's (offload/memory.py). Both count the weights the offload mode leaves there."""
        runner = self.runner
        if runner.device.type == "cuda":
            self._check_gpu_memory(params)
            return
        if runner.device.type != "cpu":
            return
        from sgdiff.engine.memory import available_memory_bytes, check_fits_in_memory

        activations = runner.family.activation_floor(runner.info, params, runner.dtype)
        if self._executor is not None:
            # loaded, and maybe running a request whose memory comes back when it ends: only what can
            # never fit is refused now
            total = available_memory_bytes("MemTotal")
            check_fits_in_memory(0, activations, params, 1, total, "this machine has {}")
            return
        first, other, _ = self._weight_placements()
        n = self.parallel.num_gpus
        # the compute device is the CPU: the offloaded weights' homes and their loans both take its memory
        weights = sum(p.host + max(p.lending - activations, p.resident) for p in [first, *[other] * (n - 1)])
        check_fits_in_memory(weights, activations, params, n, available_memory_bytes())

    def _check_gpu_memory(self, params: SamplingParams) -> None:
        """One GPU in this process, before loading: refuse what surely cannot fit in all its memory."""
        runner = self.runner
        if self._executor is not None or self.parallel.num_gpus > 1 or under_torchrun():
            return
        if getattr(runner.speed, "dit_precision", "default") != "default":  # FP8 weights: fewer bytes than counted
            return
        from sgdiff.offload.memory import check_fits_on_gpu

        activations = runner.family.activation_floor(runner.info, params, runner.dtype)
        memory = runner.gpu_memory_limit or gpu_memory_bytes(runner.device)  # (the cap: at most the GPU's)
        check_fits_on_gpu(self._weight_placements()[2], activations, params, runner.offload, memory)

    def _weight_placements(self) -> tuple[Any, Any, Any]:
        """Where the weights are under the offload mode (offload/memory.py WeightPlacement): rank 0's, the other
        ranks' (no text encoders), and the transformers' alone (every tensor of their files is loaded, where
        other parts may leave some unread, a vision tower or a VAE's encoder: a sure lower bound)."""
        if self._placements is None:
            from sgdiff.engine.memory import tensor_bytes
            from sgdiff.offload.memory import DENOISERS, weight_placement

            runner = self.runner
            texts = runner.family.text_encoders
            every = tensor_bytes(runner.model_dir, runner.info.model_index, runner.dtype, frozenset())
            shared = {name: tensors for name, tensors in every.items() if name not in texts}  # rank 0 alone encodes
            denoisers = {name: tensors for name, tensors in every.items() if name in DENOISERS}
            self._placements = tuple(weight_placement(t, runner.offload, texts) for t in (every, shared, denoisers))
        return self._placements

    def start(self, warm_up: SamplingParams | None = None, encode_ahead: Sequence[SamplingParams] = ()) -> None:
        """Load the model (start the worker pool on several GPUs); returns once it can serve. `warm_up`: a
        request like those to come (one GPU: the kernels warm up at its shapes while the model loads, so
        that the first request runs as fast as the next ones, for a longer load: ModelRunner.load).
        `encode_ahead`: the first requests to come (their prompts are encoded while the transformer still
        loads, by rank 0 on several GPUs; the requests themselves are still to be submitted)."""
        with self._lock:
            if self._closed:
                raise UserError("the engine is closed")
            if self._executor is not None:
                return
            executor = self._make_executor(warm_up, encode_ahead)
            try:
                executor.start()
            except BaseException:
                executor.close(graceful=False)
                raise
            self._executor = executor

    def submit(self, request: str | SamplingParams, **fields: Any) -> RequestHandle:
        """Queue a request (a prompt and its fields, or what request() returned); returns at once."""
        params = request if isinstance(request, SamplingParams) else self.request(request, **fields)
        # its input files, read (downloaded) once here: every rank gets these very bytes
        inputs = {path: fetch(path) for path in self.runner.family.input_images(params)}
        self.start()
        return self._executor.dispatcher.submit(params, inputs)

    def __call__(self, prompt: str, **fields: Any) -> GenerationOutput:
        """Generate and wait, as a diffusers pipeline call does; Ctrl-C cancels the request."""
        handle = self.submit(prompt, **fields)
        try:
            return GenerationOutput.of(handle.result())
        except KeyboardInterrupt:
            handle.cancel()
            raise

    def follow(self) -> None:
        """Under torchrun, on ranks other than 0: serve rank 0's requests until its engine closes."""
        from sgdiff.engine.local import follow_torchrun

        follow_torchrun(self.config, torchrun_spec())

    def close(self, graceful: bool = True) -> None:
        """Cancel what is queued or running and stop (the workers end; a later submit fails)."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.close(graceful)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(graceful=kind is None)

    def _make_executor(self, warm_up: SamplingParams | None, encode_ahead: Sequence[SamplingParams]):
        if under_torchrun():
            from sgdiff.engine.local import TorchrunRankExecutor

            spec = torchrun_spec()
            if spec.rank != 0:
                raise UserError("under torchrun only rank 0 takes requests; the other ranks call Engine.follow()")
            return TorchrunRankExecutor(self.config, spec, self.load_events, self.runner.batch_key)
        if self.parallel.num_gpus > 1:
            from sgdiff.engine.pool import WorkerPool

            return WorkerPool(self.config, self.load_events, self.runner.batch_key, encode_ahead)
        from sgdiff.engine.local import LocalExecutor

        return LocalExecutor(self.runner, self.config.batching, warm_up, encode_ahead)


def torchrun_spec():
    from sgdiff.engine.worker import RankSpec

    return RankSpec(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]), "env://")


# set to 1: --device cpu --num-gpus may start more processes than the machine has cores
ALLOW_MORE_PROCESSES_THAN_CORES = "SGDIFF_ALLOW_MORE_PROCESSES_THAN_CORES"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the cores this process may run on (taskset, cgroups' cpusets)
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def gpu_memory_bytes(device: torch.device) -> int:
    """All the memory of a CUDA GPU (what other processes hold is not known to be held for long)."""
    return torch.cuda.get_device_properties(device).total_memory


def check_devices(device: str | None, num_gpus: int) -> None:
    if device is not None and torch.device(device).type == "cpu":  # --device cpu --num-gpus N: N CPU processes
        cores = usable_cores()
        if num_gpus > cores and os.environ.get(ALLOW_MORE_PROCESSES_THAN_CORES) != "1":
            raise UserError(
                f"`num_gpus` {num_gpus} CPU processes, but this machine gives sgdiff {cores} cores: each process "
                f"holds a copy of the model and they wait on each other at every step; give at most {cores} "
                f"(or set {ALLOW_MORE_PROCESSES_THAN_CORES}=1 to start them anyway)",
                field="num_gpus",
            )
        return
    if device is not None and torch.device(device).index is not None:
        raise UserError(
            f"`device` {device} names one GPU; with `num_gpus` give `device` cuda (ranks use cuda:0..N-1)",
            field="device",
        )
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < num_gpus:
        raise UserError(
            f"`num_gpus` {num_gpus} but {visible} CUDA GPU(s) are visible (for CPU processes: `device` cpu)",
            field="num_gpus",
        )

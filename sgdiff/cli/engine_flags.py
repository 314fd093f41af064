"""The flags that say how a model runs (dtype, device, parallelism, speed toggles), defined once and
added to every command that runs one (`generate`, `serve`) by `with_engine_flags`."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, fields

from sgdiff.cli import options as opt
from sgdiff.cli.errors import fail

# (parameter name, its Typer option, its default), in the order --help lists them
ENGINE_OPTIONS = (
    ("dtype", opt.Dtype, None),
    ("device", opt.Device, None),
    ("num_gpus", opt.NumGpus, 1),
    ("ulysses_degree", opt.UlyssesDegree, None),
    ("ring_degree", opt.RingDegree, None),
    ("enable_cfg_parallel", opt.EnableCfgParallel, False),
    ("attention_backend", opt.AttentionBackend, opt.AttentionBackendChoice.auto),  # type: ignore[attr-defined]
    ("enable_fused_projections", opt.EnableFusedProjections, None),
    ("enable_fused_gelu", opt.EnableFusedGelu, None),
    ("enable_fused_norms", opt.EnableFusedNorms, None),
    ("enable_torch_compile", opt.EnableTorchCompile, False),
    ("torch_compile_mode", opt.TorchCompileMode, None),
    ("enable_cuda_graph", opt.EnableCudaGraph, False),
    ("dit_precision", opt.DitPrecision, opt.DitPrecisionChoice.default),
    ("cache", opt.Cache, opt.CacheChoice.none),
    ("cache_threshold", opt.CacheThreshold, None),
    ("cache_warmup_steps", opt.CacheWarmupSteps, None),
    ("cache_interval", opt.CacheInterval, None),
    ("vae_tiling", opt.VaeTiling, False),
    ("cpu_offload", opt.CpuOffload, opt.CpuOffloadChoice.none),
    ("text_encoder_offload", opt.TextEncoderOffload, False),
    ("offload_prefetch", opt.OffloadPrefetch, 1),
    ("offload_resident_blocks", opt.OffloadResidentBlocks, "auto"),
    ("gpu_memory_limit", opt.GpuMemoryLimit, None),
    ("lora_path", opt.LoraPath, None),
    ("lora_scale", opt.LoraScale, None),
    ("lora_mode", opt.LoraMode, None),
)
# flags that with `generate --server` make the request's `loras` (the server's adapters, by name)
REQUEST_FLAGS = ("lora_path", "lora_scale")


@dataclass(frozen=True)
class EngineFlags:
    dtype: str | None = None
    device: str | None = None
    num_gpus: int = 1
    ulysses_degree: int | None = None
    ring_degree: int | None = None
    enable_cfg_parallel: bool = False
    attention_backend: opt.AttentionBackendChoice = opt.AttentionBackendChoice.auto  # type: ignore[attr-defined]
    enable_fused_projections: bool | None = None  # None: on for a CUDA GPU in bf16
    enable_fused_gelu: bool | None = None  # None: on for a CUDA GPU in bf16
    enable_fused_norms: bool | None = None  # None: on for a CUDA GPU in bf16
    enable_torch_compile: bool = False
    torch_compile_mode: opt.TorchCompileModeChoice | None = None  # None: ahead
    enable_cuda_graph: bool = False
    dit_precision: opt.DitPrecisionChoice = opt.DitPrecisionChoice.default
    cache: opt.CacheChoice = opt.CacheChoice.none
    cache_threshold: float | None = None  # None: the method's default
    cache_warmup_steps: int | None = None  # None: the method's default
    cache_interval: int | None = None  # None: taylorseer's default
    vae_tiling: bool = False
    cpu_offload: opt.CpuOffloadChoice = opt.CpuOffloadChoice.none
    text_encoder_offload: bool = False
    offload_prefetch: int = 1
    offload_resident_blocks: str = "auto"  # auto or a count, as typed
    gpu_memory_limit: str | None = None  # a size as typed (24GiB)
    lora_path: list[str] | None = None  # PATH_OR_REPO[:SCALE], as typed
    lora_scale: float | None = None  # None: 1.0
    lora_mode: opt.LoraModeChoice | None = None  # None: auto

    def runtime(self):
        from sgdiff.config import OffloadConfig, RuntimeConfig
        from sgdiff.engine.memory import parse_size

        speed = opt.speed_config(
            self.attention_backend,
            self.enable_fused_projections,
            self.enable_fused_gelu,
            self.enable_fused_norms,
            self.enable_torch_compile,
            self.enable_cuda_graph,
            self.dit_precision,
            self.cache,
            self.cache_threshold,
            self.cache_warmup_steps,
            self.cache_interval,
            self.torch_compile_mode,
        )
        offload = OffloadConfig(self.cpu_offload.value, self.text_encoder_offload, self.offload_prefetch,
                                opt.resident_blocks(self.offload_resident_blocks))  # fmt: skip
        limit = None if self.gpu_memory_limit is None else parse_size(self.gpu_memory_limit, "gpu_memory_limit")
        return RuntimeConfig(
            device=self.device,
            dtype=self.dtype,
            speed=speed,
            vae_tiling=self.vae_tiling,
            offload=offload,
            gpu_memory_limit=limit,
            lora=self.lora(),
        )

    def lora(self):
        """--lora-path, --lora-scale and --lora-mode as the library's LoraConfig."""
        from sgdiff.config import LoraConfig

        mode = self.lora_mode.value if self.lora_mode is not None else "auto"
        if self.lora_mode is not None and not self.lora_path:
            fail(f"--lora-mode {mode} says how LoRA adapters are applied: give --lora-path too")
        return LoraConfig(tuple((source, 1.0 if scale is None else scale) for source, scale in self.lora_specs()), mode)

    def lora_specs(self, default: float | None = 1.0) -> list[tuple[str, float | None]]:
        """Each --lora-path as (its path, repo id or name; its scale): its own :SCALE, else --lora-scale, else
        `default` (with --server None: the server's own scale of the adapter)."""
        from sgdiff.lora.files import parse_lora_spec

        if self.lora_scale is not None and not self.lora_path:
            fail("--lora-scale sets the scale of the --lora-path adapters: give --lora-path too")
        if self.lora_scale is not None and not math.isfinite(self.lora_scale):
            fail(f"--lora-scale must be a finite number, got {self.lora_scale}")
        fallback = self.lora_scale if self.lora_scale is not None else default
        specs: list[tuple[str, float | None]] = []
        own_scales = 0
        for spec in self.lora_path or ():
            source, own = parse_lora_spec(spec)
            own_scales += source != spec  # (a spec that keeps its whole text has no :SCALE)
            specs.append((source, own if source != spec else fallback))
        if self.lora_scale is not None and own_scales == len(specs):
            fail("--lora-scale sets the scale of each --lora-path given without :SCALE, and every one has its own: "
                 "leave --lora-scale out")  # fmt: skip
        return specs

    def parallel(self):
        from sgdiff.config import ParallelConfig

        return ParallelConfig(self.num_gpus, self.ulysses_degree, self.ring_degree, self.enable_cfg_parallel)

    def given(self) -> list[str]:
        """The flags of how a model runs set to something other than their default, as typed (--dtype, ...);
        not the adapters a request picks (REQUEST_FLAGS)."""
        defaults = EngineFlags()
        return [
            "--" + f.name.replace("_", "-")
            for f in fields(self)
            if f.name not in REQUEST_FLAGS and getattr(self, f.name) != getattr(defaults, f.name)
        ]


def with_engine_flags(command: Callable) -> Callable:
    """Give a Typer command every engine flag; it receives them as one `engine: EngineFlags` argument."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "engine"]
    added = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
             for name, annotation, default in ENGINE_OPTIONS]  # fmt: skip

    @functools.wraps(command)
    def run(**given):
        engine = EngineFlags(**{name: given.pop(name) for name, _, _ in ENGINE_OPTIONS})
        return command(**given, engine=engine)

    # (mypy: a function has no __signature__ to set)
    run.__signature__ = inspect.Signature([*(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own), *added])  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in [*own, *added]}
    return run

"""The one place where the speed toggles (config.SpeedConfig) change a loaded pipeline."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from typing import Any

import torch

from sgdiff.config import SpeedConfig
from sgdiff.errors import UserError
from sgdiff.models.attention import AttentionImpl
from sgdiff.pipeline.base import ComposedPipeline
from sgdiff.pipeline.family import ModelFamily
from sgdiff.speed.attention_backends import attention_backend
from sgdiff.speed.compile import compile_blocks
from sgdiff.speed.cuda_graph import CudaGraphForward
from sgdiff.speed.fp8 import DIT_PRECISIONS, check_fp8, use_fp8_weights
from sgdiff.speed.fuse import fuse_gelu, fuse_norms, fuse_projections
from sgdiff.speed.step_cache import apply_step_cache, step_cache_of
from sgdiff.speed.step_cache.rules import DEFAULT_THRESHOLDS, DEFAULT_WARMUP_STEPS
from sgdiff.speed.step_cache.schedules import DEFAULT_INTERVALS

DEFAULT_ON = ("fused_projections", "fused_gelu", "fused_norms")  # None: on where they run and are faster


def resolve_speed(speed: SpeedConfig, device: torch.device, dtype: torch.dtype) -> SpeedConfig:
    """The toggles left at None decided for this device, on where they are never slower and stay within
    bf16 noise (docs/benchmark-log.md, run T: every toggle in turn): the fused GELU and norms on a CUDA
    GPU in bfloat16 (the norms also need Triton); the fused projections there too, but only with
    torch.compile (eagerly their strided outputs make a forward slower). Off elsewhere, and the fused
    GELU off with FP8 weights (its epilogue is a bf16 GEMM's)."""
    gpu_bf16 = device.type == "cuda" and dtype == torch.bfloat16
    default: dict[str, Any] = {
        "fused_projections": gpu_bf16 and speed.torch_compile,
        "fused_gelu": gpu_bf16 and speed.dit_precision != "fp8",
        "fused_norms": gpu_bf16 and importlib.util.find_spec("triton") is not None,
    }
    speed = replace(speed, **{name: default[name] for name in DEFAULT_ON if getattr(speed, name) is None})
    if speed.cache != "none":  # the method's defaults (speed/step_cache/rules.py, schedules.py say whose)
        threshold, warmup, interval = speed.cache_threshold, speed.cache_warmup_steps, speed.cache_interval
        speed = replace(
            speed,
            cache_threshold=DEFAULT_THRESHOLDS.get(speed.cache) if threshold is None else threshold,
            cache_warmup_steps=DEFAULT_WARMUP_STEPS[speed.cache] if warmup is None else warmup,
            cache_interval=DEFAULT_INTERVALS.get(speed.cache) if interval is None else interval,
        )
    return speed


def check_speed(speed: SpeedConfig, device: torch.device, dtype: torch.dtype) -> AttentionImpl:
    """Toggles this device cannot honour fail here, before anything loads (`speed` resolved: no None);
    returns the attention kernel."""
    if speed.cuda_graph and device.type != "cuda":
        raise UserError(
            f"`cuda_graph` needs a CUDA GPU; the model runs on {device.type}: drop `cuda_graph`", field="cuda_graph"
        )
    if speed.fused_norms:
        check_fused_norms(device, dtype)
    if speed.dit_precision not in DIT_PRECISIONS:
        raise UserError(
            f"`dit_precision` {speed.dit_precision!r} is not one of {', '.join(DIT_PRECISIONS)}", field="dit_precision"
        )
    if speed.dit_precision == "fp8":
        check_fp8(device, dtype)
        if speed.fused_gelu:
            raise UserError(
                "`fused_gelu` computes the GELU in a bf16 GEMM's epilogue, and with `dit_precision` fp8 the MLPs "
                "run FP8 GEMMs (torch._scaled_mm has no such epilogue): drop `fused_gelu`",
                field="fused_gelu",
            )
    return attention_backend(speed.attention_backend, device, dtype)


def check_fused_norms(device: torch.device, dtype: torch.dtype) -> None:
    if device.type != "cuda":
        raise UserError(
            f"`fused_norms` runs a Triton kernel on CUDA GPUs; the model runs on {device.type}: drop `fused_norms`",
            field="fused_norms",
        )
    if dtype != torch.bfloat16:
        dtype_name = str(dtype).removeprefix("torch.")
        raise UserError(
            f"`fused_norms` runs in bfloat16 only; the model runs in {dtype_name}: drop `fused_norms`",
            field="fused_norms",
        )
    if importlib.util.find_spec("triton") is None:
        raise UserError(
            "`fused_norms` needs the triton package, which is not installed: drop `fused_norms`", field="fused_norms"
        )


def apply_speed(
    pipeline: ComposedPipeline,
    speed: SpeedConfig,
    attention: AttentionImpl,
    family: ModelFamily,
    device: torch.device | None = None,
) -> None:
    pipeline.attention = attention
    for model in pipeline.transformers:
        speed_up_transformer(model, speed, family, device)


def speed_up_transformer(
    model: torch.nn.Module, speed: SpeedConfig, family: ModelFamily, device: torch.device | None = None
) -> None:
    """The toggles that change a transformer itself (the attention kernel is the pipeline's); the
    family says what in `model` may be fused. `device`: where it computes, if its weights wait elsewhere
    (offloading: FP8 weights are quantised there)."""
    groups = family.fusable(model)
    if speed.fused_gelu:  # before fusing projections: a Linear with a GELU epilogue is its own GEMM
        fuse_gelu(groups)
    if speed.dit_precision == "fp8":  # before fusing projections too: a group fuses its float8 rows
        use_fp8_weights(model, device)
    if speed.fused_projections:
        fuse_projections(groups)
    if speed.fused_norms:
        fuse_norms(model)
    if speed.torch_compile:
        compile_blocks(model, ahead=speed.torch_compile_mode == "ahead")
    if speed.cache != "none":  # after compile: its decisions run between the compiled blocks
        apply_step_cache(model, speed, family)
    if speed.cuda_graph:
        model.forward = CudaGraphForward(model.forward)


def speed_report(pipeline: ComposedPipeline, speed: SpeedConfig) -> dict:
    """What the toggles did in this process, for the perf dump: the toggles as resolved, torch.compile's
    use of its on-disk cache, the seconds spent capturing CUDA graphs."""
    report: dict = {name: getattr(speed, name) for name in speed.__dataclass_fields__}
    if speed.torch_compile:
        from sgdiff.speed.compile import compile_cache_stats

        report["torch_compile_cache"] = compile_cache_stats()
    if speed.cuda_graph:
        forwards = [model.forward for model in pipeline.transformers]
        report["cuda_graph_capture_seconds"] = sum(getattr(f, "capture_seconds", 0.0) for f in forwards)
    caches = [cache.report() for cache in map(step_cache_of, pipeline.transformers) if cache is not None]
    if caches:  # per transformer: forwards computed and skipped since the load (each request's steps: its own)
        report["step_cache"] = caches
    return report

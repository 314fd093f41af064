"""What `sgdiff generate` does, as a client of the engine: check every prompt and output place, load
the model once, submit every prompt, draw each one's progress and write its outputs as it finishes."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgdiff import __version__
from sgdiff.config import ParallelConfig, RuntimeConfig
from sgdiff.engine.ranks import under_torchrun
from sgdiff.engine.runner import GenerationResult
from sgdiff.engine.service import Engine
from sgdiff.io.files import write_atomically
from sgdiff.io.outputs import DEFAULT_FPS, OutputConfig, output_metadata, planned_outputs, save_output
from sgdiff.models.resolve import DEMO_IMAGE_MODEL, DEMO_VIDEO_MODEL
from sgdiff.pipeline.base import PipelineEvents


@dataclass(frozen=True)
class BatchRequest:
    model_path: str | None  # None: the embedded demo model (video if --num-frames is given)
    prompts: list[str]
    sampling_flags: dict[str, Any] = field(default_factory=dict)  # only flags given explicitly
    preset: str | None = None
    runtime: RuntimeConfig = RuntimeConfig()
    output: OutputConfig = OutputConfig()
    parallel: ParallelConfig = ParallelConfig()


@dataclass
class BatchReport:
    results: list[GenerationResult]
    saved: list[Path]
    load_seconds: float
    total_seconds: float
    peak_rss_bytes: int  # the largest of this process's and the model's process's
    output_kind: str = "image"  # or "video"


def default_model_path(flags: dict[str, Any]) -> str:
    """No --model-path: the embedded demo video model when --num-frames is given, else the image one."""
    return DEMO_VIDEO_MODEL if flags.get("num_frames") is not None else DEMO_IMAGE_MODEL


def run_batch(
    request: BatchRequest, events: PipelineEvents, on_saved: Callable[[Path], None] = lambda p: None
) -> BatchReport:
    """Every prompt of `request` through one engine; the outputs written here as each finishes."""
    start = time.perf_counter()
    model_path = request.model_path or default_model_path(request.sampling_flags)
    with Engine(
        model_path, preset=request.preset, runtime=request.runtime, parallel=request.parallel, load_events=events
    ) as engine:
        all_params = [engine.request(prompt, **request.sampling_flags) for prompt in request.prompts]
        suffix, paths = planned_outputs(all_params, request.output, engine.output_kind)
        if under_torchrun() and os.environ["RANK"] != "0":
            engine.follow()  # rank 0 takes the requests and writes; this rank computes with it
            return BatchReport([], [], 0.0, time.perf_counter() - start, engine.runner.peak_rss_bytes())
        engine.start()
        handles = [engine.submit(params) for params in all_params]
        about = {
            "model": model_path,
            "preset": engine.preset_name,
            "dtype": str(engine.runner.dtype).removeprefix("torch."),
            "sgdiff_version": __version__,
        }
        remaining = iter(paths)
        results, saved = [], []
        for handle in handles:
            for event in handle.events():
                event.replay(events)
            result = handle.result()
            results.append(result)
            if not request.output.save_output:
                continue
            outputs = result.images if result.videos is None else result.videos
            for index, output in enumerate(outputs):
                path = next(remaining)
                metadata = output_metadata(result.params, index, **about)
                saved.append(save_output(output, path, suffix, result.fps or DEFAULT_FPS, metadata))
                on_saved(path)
        load_seconds = engine.load_seconds
    peak_rss = max([engine.runner.peak_rss_bytes(), *(r.peak_rss_bytes for r in results)])
    report = BatchReport(results, saved, load_seconds, time.perf_counter() - start, peak_rss, engine.output_kind)
    if request.output.perf_dump_path is not None:
        write_perf_dump(report, engine, request.output.perf_dump_path)
    return report


def write_perf_dump(report: BatchReport, engine: Engine, path: Path) -> None:
    dump = {
        "model": engine.config.model_path,
        "device": str(engine.runner.device),
        "dtype": str(engine.runner.dtype).removeprefix("torch."),
        "load_seconds": report.load_seconds,
        "total_seconds": report.total_seconds,
        "peak_rss_bytes": report.peak_rss_bytes,  # whole run, loading included
        "requests": [
            {
                "prompt": r.params.prompt,
                "height": r.params.height,
                "width": r.params.width,
                "num_inference_steps": r.params.num_inference_steps,
                "num_outputs": len(r.images if r.videos is None else r.videos),
                "total_seconds": r.total_seconds,
                "stage_seconds": r.stage_seconds,
                "step_seconds": r.step_seconds,
                "peak_gpu_memory_bytes": r.peak_gpu_memory_bytes,
            }
            for r in report.results
        ],
    }
    write_atomically(path, lambda handle: handle.write(json.dumps(dump, indent=2).encode()))

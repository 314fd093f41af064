"""Run every prompt of a request on one loaded model and write the outputs (what `sgdiff generate` does)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sgdiff import __version__
from sgdiff.config import ParallelConfig, RuntimeConfig
from sgdiff.engine.engine import Engine, GenerationResult
from sgdiff.errors import UserError
from sgdiff.io.files import write_atomically
from sgdiff.io.image import OutputNamer, check_output_file_name, save_png
from sgdiff.io.input_image import prefetch
from sgdiff.io.video import mp4_writer_problem, save_mp4, save_png_frames
from sgdiff.models.resolve import default_model_path
from sgdiff.pipeline.base import PipelineEvents


@dataclass(frozen=True)
class OutputConfig:
    save_output: bool = True
    output_path: Path = Path("outputs")
    output_file_name: str | None = None
    perf_dump_path: Path | None = None
    output_format: str | None = None  # "png" or "mp4"; None: png for image models, mp4 for video models


DEFAULT_FPS = 16


def output_suffix(output_kind: str, output_format: str | None) -> str:
    """The file suffix a run writes: ".png" (images), ".mp4" (videos) or "" (a video as PNG frames)."""
    fmt = output_format or ("mp4" if output_kind == "video" else "png")
    if output_kind == "image" and fmt != "png":
        raise UserError("--output-format mp4 is for video models; this model makes images (png)")
    return ".png" if output_kind == "image" else (".mp4" if fmt == "mp4" else "")


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
    peak_rss_bytes: int
    output_kind: str = "image"  # or "video"


@dataclass
class PreparedBatch:
    """A request checked against its model (no weights loaded yet): what every rank will run."""

    model_path: str
    engine: Engine
    all_params: list
    suffix: str
    paths: list[Path]


def prepare_batch(request: BatchRequest, events: PipelineEvents, runtime: RuntimeConfig | None = None) -> PreparedBatch:
    """Resolve the model and check every prompt and output place: a bad request fails in a second."""
    model_path = request.model_path or default_model_path(request.sampling_flags)
    engine = Engine(model_path, request.preset, runtime or request.runtime, events)
    all_params = [engine.sampling_params(prompt, **request.sampling_flags) for prompt in request.prompts]
    if request.parallel.enable_cfg_parallel:
        for params in all_params:
            if engine.info.spec.cfg_scale_of(params) is None:
                raise UserError(
                    "--enable-cfg-parallel splits the prompt and negative branches of CFG, but this request runs "
                    "without CFG (Wan: --guidance-scale > 1; FLUX: --negative-prompt with --true-cfg-scale > 1)"
                )
    for params in all_params:
        if params.image_path is not None:
            prefetch(params.image_path)  # a URL is fetched once, and fails here rather than after loading
    out = request.output
    suffix = output_suffix(engine.info.spec.output, out.output_format)
    if out.output_file_name is not None and (problem := check_output_file_name(out.output_file_name, suffix)):
        raise UserError(problem)
    if out.save_output and suffix == ".mp4" and (problem := mp4_writer_problem()):
        raise UserError(problem)
    paths = output_paths(all_params, out, suffix) if out.save_output else []
    return PreparedBatch(model_path, engine, all_params, suffix, paths)


def run_batch(
    request: BatchRequest, events: PipelineEvents, on_saved: Callable[[Path], None] = lambda p: None
) -> BatchReport:
    """Run a request: in this process, or in one worker process per GPU when --num-gpus > 1 (or
    under torchrun)."""
    from sgdiff.engine.ranks import under_torchrun

    if request.parallel.num_gpus > 1 or under_torchrun():
        from sgdiff.engine.launcher import launch

        return launch(request, events, on_saved)
    return execute_batch(prepare_batch(request, events), request, on_saved)


def execute_batch(
    prepared: PreparedBatch,
    request: BatchRequest,
    on_saved: Callable[[Path], None] = lambda p: None,
    setup: Callable[[Engine], Any] | None = None,
    writer: bool = True,
) -> BatchReport:
    """Load, generate every prompt, and (the writing rank) save. `setup(engine)`, after loading, makes
    the pipeline parallel and returns a context to generate in."""
    start = time.perf_counter()
    engine, out = prepared.engine, request.output
    engine.load()
    context = setup(engine) if setup is not None else nullcontext()
    paths = iter(prepared.paths)
    results, saved = [], []
    with context:
        for params in prepared.all_params:
            result = engine.generate(params)
            results.append(result)
            if not (out.save_output and writer):
                continue
            outputs = result.images if result.videos is None else result.videos
            for index, output in enumerate(outputs):
                path = next(paths)
                metadata = {
                    **asdict(params),
                    "output_index": index,
                    "model": prepared.model_path,
                    "preset": engine.preset.name if engine.preset else None,
                    "dtype": str(engine.dtype).removeprefix("torch."),
                    "sgdiff_version": __version__,
                }
                saved.append(save_output(output, path, prepared.suffix, params.fps or DEFAULT_FPS, metadata))
                on_saved(path)
    report = BatchReport(
        results,
        saved,
        engine.load_seconds,
        time.perf_counter() - start,
        engine.peak_rss_bytes(),
        engine.info.spec.output,
    )
    if out.perf_dump_path is not None and writer:
        write_perf_dump(report, engine, out.perf_dump_path)
    return report


def output_paths(all_params: list, out: OutputConfig, suffix: str) -> list[Path]:
    """Every path the run will write, in order, checked before any weight loads: a folder of frames
    must not land on a file, a file not on a folder."""
    namer = OutputNamer(
        out.output_path, out.output_file_name, sum(p.num_outputs_per_prompt for p in all_params), suffix
    )
    paths = [
        namer.next_path(p.prompt, p.seed, index, p.num_outputs_per_prompt)
        for p in all_params
        for index in range(p.num_outputs_per_prompt)
    ]
    for path in paths:
        if suffix == "" and path.exists() and not path.is_dir():
            raise UserError(f"{path} is a file; the frames would go into a folder of that name: pick another name")
        if suffix and path.is_dir():
            raise UserError(f"{path} is a folder; pick another --output-file-name or --output-path")
    return paths


def save_output(output, path: Path, suffix: str, fps: int, metadata: dict) -> Path:
    """An image [H, W, 3] as PNG, or a video [T, H, W, 3] as MP4 or a folder of PNG frames."""
    if suffix == ".png":
        return save_png(output, path, metadata)
    if suffix == ".mp4":
        return save_mp4(output, path, fps, metadata)
    return save_png_frames(output, path, metadata)


def write_perf_dump(report: BatchReport, engine: Engine, path: Path) -> None:
    dump = {
        "model": engine.model_path,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
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

"""What `sgdiff generate` does, as a client of the engine: check every prompt and output place, load
the model once, submit every prompt, draw each one's progress and write its outputs as it finishes."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from sgdiff import __version__
from sgdiff.cli.prompts import PromptLine
from sgdiff.cli.prompts import name_fields as names_of
from sgdiff.config import ParallelConfig, RuntimeConfig
from sgdiff.engine.adapters import adapter_name
from sgdiff.engine.ranks import under_torchrun
from sgdiff.engine.runner import GenerationResult
from sgdiff.engine.service import Engine
from sgdiff.io.files import write_atomically
from sgdiff.io.outputs import DEFAULT_FPS, OutputConfig, output_metadata, planned_outputs, save_output
from sgdiff.models.resolve import DEMO_IMAGE_MODEL, DEMO_VIDEO_MODEL
from sgdiff.pipeline.base import PipelineEvents
from sgdiff.sampling import SamplingParams
from sgdiff.speed.apply import speed_report


@dataclass(frozen=True)
class BatchRequest:
    model_path: str | None  # None: the embedded demo model (video if --num-frames is given)
    prompts: list[str]
    sampling_flags: dict[str, Any] = field(default_factory=dict)  # only flags given explicitly
    preset: str | None = None
    runtime: RuntimeConfig = RuntimeConfig()
    output: OutputConfig = OutputConfig()
    parallel: ParallelConfig = ParallelConfig()
    revision: str | None = None  # of a Hub repo id given as model_path: a branch, tag or commit hash
    prompt_lines: list[PromptLine] = field(default_factory=list)  # a JSON Lines file: each prompt's own fields


class BatchEvents(PipelineEvents, Protocol):
    """A pipeline's events, and which prompt of the batch the events that follow belong to."""

    def request_started(self, index: int, total: int) -> None: ...


class LoadTimes:
    """Passes a pipeline's events on and keeps when each 'load <part>' stage began and ended, in seconds
    after `start` (perf_counter): the perf dump's, to see which part held the load up."""

    def __init__(self, events: BatchEvents, start: float):
        self.events, self.start = events, start
        self.spans: dict[str, list[float]] = {}

    def stage_started(self, name: str) -> None:
        if name.startswith("load "):
            self.spans[name.removeprefix("load ")] = [time.perf_counter() - self.start]
        self.events.stage_started(name)

    def stage_finished(self, name: str, seconds: float) -> None:
        if name.startswith("load "):
            self.spans[name.removeprefix("load ")].append(time.perf_counter() - self.start)
        self.events.stage_finished(name, seconds)

    def step_finished(self, index: int, total: int, seconds: float) -> None:
        self.events.step_finished(index, total, seconds)

    def request_started(self, index: int, total: int) -> None:
        self.events.request_started(index, total)


def process_age_seconds() -> float | None:
    """Seconds since this process was spawned (Linux: /proc), so that the perf dump can tell the time
    before sgdiff's own clock starts (interpreter, imports, checks) from the time after it."""
    try:
        fields_after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields_after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, in ticks after boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None


@dataclass
class BatchReport:
    results: list[GenerationResult]
    saved: list[Path]
    load_seconds: float
    total_seconds: float
    peak_rss_bytes: int  # the largest of this process's and the model's process's
    output_kind: str = "image"  # or "video"
    load_parts: dict[str, list[float]] = field(default_factory=dict)  # each component's [began, ended] load
    load_began: float | None = None  # when the load began (all in seconds after run_batch began)
    started_at_process_age: float | None = None  # seconds after spawn when run_batch began


ENCODED_WHILE_LOADING = 4  # requests whose prompts are encoded during the load (each a few MB on the GPU)


def default_model_path(flags: dict[str, Any], lines: Sequence[PromptLine] = ()) -> str:
    """No --model-path: the embedded demo video model when --num-frames (or a prompt file's line's
    num_frames) is given, else the image one."""
    frames = [flags.get("num_frames"), *(line.fields.get("num_frames") for line in lines)]
    return DEMO_VIDEO_MODEL if any(n is not None for n in frames) else DEMO_IMAGE_MODEL


def run_batch(
    request: BatchRequest, events: BatchEvents, on_saved: Callable[[Path], None] = lambda p: None
) -> BatchReport:
    """Every prompt of `request` through one engine; the outputs written here as each finishes."""
    start, started_at = time.perf_counter(), process_age_seconds()
    events = load_times = LoadTimes(events, start)
    model_path = request.model_path or default_model_path(request.sampling_flags, request.prompt_lines)
    with Engine(
        model_path, preset=request.preset, runtime=request.runtime, parallel=request.parallel, load_events=events,
        revision=request.revision,
    ) as engine:  # fmt: skip
        all_params = requested(engine, request)
        lines: Sequence[PromptLine | None] = request.prompt_lines or [None] * len(request.prompts)
        loras = [(adapter_name(source), scale) for source, scale in request.runtime.lora.adapters]
        name_fields = [names_of(request.sampling_flags, line, model_path, loras) for line in lines]
        suffix, paths = planned_outputs(all_params, request.output, engine.output_kind, name_fields)
        if under_torchrun() and os.environ["RANK"] != "0":
            engine.follow()  # rank 0 takes the requests and writes; this rank computes with it
            return BatchReport([], [], 0.0, time.perf_counter() - start, engine.runner.peak_rss_bytes())
        load_began = time.perf_counter() - start
        # no kernels' warm-up: from the shell it costs more load than it saves (runner.load); the first
        # prompts are encoded while the transformer loads
        engine.start(encode_ahead=all_params[:ENCODED_WHILE_LOADING])
        handles = [engine.submit(params) for params in all_params]
        about = {
            "model": model_path,
            "model_revision": request.revision,  # as given (None: the repo's main, or not a repo)
            "model_commit": engine.model_commit,  # the Hub commit loaded (None: a folder of one's own)
            "preset": engine.preset_name,
            "dtype": str(engine.runner.dtype).removeprefix("torch."),
            "sgdiff_version": __version__,
        }
        remaining = iter(paths)
        results, saved = [], []
        for number, handle in enumerate(handles, start=1):
            events.request_started(number, len(handles))
            for event in handle.events():
                event.replay(events)
            result = handle.result()
            results.append(result)
            if not request.output.save_output:
                continue
            outputs = result.images if result.videos is None else result.videos
            for index, output in enumerate(outputs):
                path = next(remaining)
                metadata = output_metadata(result.params, index, **about, loras=engine.lora_record(result.params))
                saved.append(save_output(output, path, suffix, result.fps or DEFAULT_FPS, metadata))
                on_saved(path)
        load_seconds = engine.load_seconds
    peak_rss = max([engine.runner.peak_rss_bytes(), *(r.peak_rss_bytes for r in results)])
    report = BatchReport(
        results, saved, load_seconds, time.perf_counter() - start, peak_rss, engine.output_kind,
        load_times.spans, load_began, started_at,
    )  # fmt: skip
    if request.output.perf_dump_path is not None:
        write_perf_dump(report, engine, request.output.perf_dump_path)
    return report


def requested(engine: Engine, request: BatchRequest) -> list[SamplingParams]:
    """Each prompt's request checked by the engine (nothing loads): the flags, and over them the fields
    of its line of a JSON Lines prompt file, whose errors name that line."""
    if not request.prompt_lines:
        return [engine.request(prompt, **request.sampling_flags) for prompt in request.prompts]
    params = []
    for prompt, line in zip(request.prompts, request.prompt_lines, strict=True):
        with line.blamed():
            params.append(engine.request(prompt, **{**request.sampling_flags, **line.fields}))
    return params


# 2: versions, gpu, load spans, and each request's seed, frames and fps; 3: model_revision, model_commit;
# 4: the LoRA adapters loaded, and each request's
PERF_DUMP_SCHEMA = 4


def write_perf_dump(report: BatchReport, engine: Engine, path: Path) -> None:
    device = engine.runner.device
    dump = {
        "schema_version": PERF_DUMP_SCHEMA,
        "versions": library_versions(),
        "model": engine.config.model_path,
        "model_revision": engine.revision,  # --revision as given (null: none)
        "model_commit": engine.model_commit,  # the Hub commit loaded (null: a local folder, not a HF cache snapshot)
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": str(engine.runner.dtype).removeprefix("torch."),
        "load_seconds": report.load_seconds,
        # seconds after run_batch began (process_age_at_start): the load's start, each part's [began, ended]
        "load_began": report.load_began,
        "load_part_spans": report.load_parts,
        "total_seconds": report.total_seconds,
        # seconds after the process was spawned (Linux): before run_batch began (interpreter, imports,
        # checks), and now, with everything written but this file; null where unknown
        "process_age_at_start": report.started_at_process_age,
        "process_age_at_dump": process_age_seconds(),
        "speed": speed_report(engine.runner.pipeline, engine.runner.speed) if engine.runner.pipeline else None,
        # --cpu-offload / --text-encoder-offload: what was offloaded and how many copies it took (null: none)
        "offload": engine.runner.offloaded.report() if engine.runner.offloaded else None,
        # --lora-path: each adapter's name, source, scale, rank, layers it updates and mode ([]: none)
        "loras": engine.loras(),
        "peak_rss_bytes": report.peak_rss_bytes,  # whole run, loading included
        "requests": [
            {
                "prompt": r.params.prompt,
                "height": r.params.height,
                "width": r.params.width,
                "num_inference_steps": r.params.num_inference_steps,
                "seed": r.params.seed,
                "num_frames": getattr(r.params, "num_frames", None),  # video models
                "fps": (r.fps or DEFAULT_FPS) if r.videos is not None else None,  # as written
                "num_outputs": len(r.images if r.videos is None else r.videos),  # type: ignore[arg-type]  # one is set
                "total_seconds": r.total_seconds,
                "stage_seconds": r.stage_seconds,
                "step_seconds": r.step_seconds,
                "peak_gpu_memory_bytes": r.peak_gpu_memory_bytes,
                # --cache: the steps whose blocks were skipped, per CFG branch run on rank 0 ({}: none)
                "skipped_steps": r.skipped_steps,
                "loras": engine.lora_record(r.params),  # the adapters it ran with: name, source, scale
            }
            for r in report.results
        ],
    }
    write_atomically(path, lambda handle: handle.write(json.dumps(dump, indent=2).encode()))


def library_versions() -> dict[str, str | None]:
    """sgdiff's and the libraries' versions (None: not installed), read without importing them."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {"sgdiff": __version__}
    for name in ("torch", "diffusers", "transformers"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions

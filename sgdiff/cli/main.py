"""`sgdiff` command line: flags -> a typed BatchRequest; the library does the rest."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from sgdiff import __version__
from sgdiff.bytecode import use_bytecode_cache
from sgdiff.cli import options as opt
from sgdiff.cli.bench import bench
from sgdiff.cli.engine_flags import EngineFlags, with_engine_flags
from sgdiff.cli.errors import fail, user_errors
from sgdiff.cli.prompts import MAX_PROMPTS, PromptLine, read_prompt_file  # noqa: F401 - MAX_PROMPTS: read here too
from sgdiff.cli.serve import serve

app = typer.Typer(
    name="sgdiff",
    help="Generate images and videos with diffusion transformers, fast.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's own help layout: it wraps every flag's name and text at any width, where rich's tables cut
    # them at 80 columns (`--enable-fused-projec…`) and Typer 0.29's adds `<bool>` to plain flags
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sgdiff {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = None,
) -> None:
    """sgdiff: image and video generation with diffusion transformers."""


def read_prompts(prompt: str | None, prompt_file: Path | None) -> tuple[list[str], list[PromptLine]]:
    """The prompts and, from a JSON Lines --prompt-file, each one's line (its own fields); else no lines."""
    if prompt is not None and prompt_file is not None:
        fail("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        return read_prompt_file(prompt_file)
    if prompt is None:
        fail("pass --prompt TEXT or --prompt-file FILE")
    if not prompt.strip():
        fail("--prompt is empty: describe the image to generate")
    return [prompt], []


def image_paths(given: list[str] | None) -> str | tuple[str, ...] | None:
    """--image-path, repeated and/or comma-separated: one path as it is, several as a tuple (a value that
    names an existing file is never split at its commas)."""
    paths = []
    for value in given or ():
        parts = [value] if "," not in value or Path(value).expanduser().is_file() else value.split(",")
        paths += [part.strip() for part in parts if part.strip()]
    if not paths:
        return None
    return paths[0] if len(paths) == 1 else tuple(paths)


def check_outputs(save_output: bool, output_path: Path, file_name: str | None, perf_dump_path: Path | None) -> None:
    """Every place the run will write is checked before any weight loads."""
    from sgdiff.io.files import output_location_problem
    from sgdiff.io.image import check_output_file_name

    problems = [
        check_output_file_name(file_name) if file_name is not None else None,
        output_location_problem(output_path, "--output-path", want_folder=True) if save_output else None,
        output_location_problem(perf_dump_path, "--perf-dump-path", want_folder=False) if perf_dump_path else None,
    ]
    for problem in problems:
        if problem:
            fail(problem)


@app.command()
@with_engine_flags
def generate(
    model_path: opt.ModelPath = None,
    revision: opt.Revision = None,
    prompt: opt.Prompt = None,
    prompt_file: opt.PromptFile = None,
    negative_prompt: opt.NegativePrompt = None,
    height: opt.Height = None,
    width: opt.Width = None,
    num_inference_steps: opt.Steps = None,
    guidance_scale: opt.GuidanceScale = None,
    true_cfg_scale: opt.TrueCfgScale = None,
    seed: opt.Seed = None,
    generator_device: opt.GeneratorDevice = None,
    num_outputs_per_prompt: opt.OutputsPerPrompt = None,
    max_sequence_length: opt.MaxSequenceLength = None,
    num_frames: opt.NumFrames = None,
    num_frames_round_down: opt.NumFramesRoundDown = False,
    fps: opt.Fps = None,
    guidance_scale_2: opt.GuidanceScale2 = None,
    flow_shift: opt.FlowShift = None,
    image_path: opt.ImagePath = None,
    preset: opt.PresetName = None,
    save_output: opt.SaveOutput = True,
    output_path: opt.OutputPath = Path("outputs"),
    output_file_name: opt.OutputFileName = None,
    output_format: opt.OutputFormat = None,
    perf_dump_path: opt.PerfDumpPath = None,
    quiet: opt.Quiet = False,
    server: opt.Server = None,
    engine: EngineFlags = EngineFlags(),
) -> None:
    """Generate images or videos from a prompt (or a file of prompts)."""
    with user_errors():
        from sgdiff.io.outputs import OutputConfig

        flags = {
            "negative_prompt": negative_prompt,
            "height": height,
            "width": width,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "true_cfg_scale": true_cfg_scale,
            "seed": seed,
            "generator_device": generator_device,
            "num_outputs_per_prompt": num_outputs_per_prompt,
            "max_sequence_length": max_sequence_length,
            "num_frames": num_frames,
            "num_frames_round_down": num_frames_round_down or None,  # only given when set
            "fps": fps,
            "guidance_scale_2": guidance_scale_2,
            "flow_shift": flow_shift,
            "image_path": image_paths(image_path),
        }
        flags = {k: v for k, v in flags.items() if v is not None}
        from sgdiff.pipeline.registry import check_given_values

        check_given_values(flags)
        prompts, lines = read_prompts(prompt, prompt_file)
        check_outputs(save_output, output_path, output_file_name, perf_dump_path)
        output = OutputConfig(
            save_output, output_path, output_file_name, perf_dump_path, output_format.value if output_format else None
        )
        if server is not None:
            from sgdiff.cli.remote import RemoteRequest, run_remote

            remote = RemoteRequest(server, model_path, prompts, flags, output, preset, engine.given(), lines, revision,
                                   engine.lora_specs(default=None))  # fmt: skip
            run_remote(remote, quiet)
            return
        from sgdiff.cli.batch import BatchRequest

        request = BatchRequest(
            model_path=model_path,
            prompts=prompts,
            sampling_flags=flags,
            preset=preset,
            runtime=engine.runtime(),
            parallel=engine.parallel(),
            output=output,
            revision=revision,
            prompt_lines=lines,
        )
        run(request, quiet)


FINISHED = {"cleanly": False}  # `run` sets it when every output is written and the engine is closed


def run(request, quiet: bool) -> None:
    from rich.console import Console

    from sgdiff.cli.batch import run_batch
    from sgdiff.cli.progress import QuietEvents, RichProgress, show_library_warnings
    from sgdiff.engine.ranks import is_writer_rank, under_torchrun

    quiet = quiet or not is_writer_rank()  # under torchrun only rank 0 speaks
    console = Console(stderr=True)
    show_library_warnings(console, quiet)
    events = QuietEvents() if quiet else RichProgress(console)
    with events:
        report = run_batch(request, events, on_saved=lambda path: typer.echo(str(path)))
    if not quiet:
        outputs = sum(r.params.num_outputs_per_prompt for r in report.results)
        kind = report.output_kind
        steps = [s for r in report.results for s in r.step_seconds]
        per_step = f", {sum(steps) / len(steps):.3f} s/step" if steps else ""
        skipped = sum(len(s) for r in report.results for s in r.skipped_steps.values())  # --cache
        cached = f", {skipped} branch-step(s) skipped by --cache" if skipped else ""
        console.print(
            f"generated {outputs} {kind}(s) in {report.total_seconds:.1f} s "
            f"(load {report.load_seconds:.1f} s{per_step}{cached}); saved {len(report.saved)}"
        )
    FINISHED["cleanly"] = not under_torchrun()  # torchrun's ranks leave through their process group


app.command()(bench)
app.command()(serve)


def main() -> None:
    """The `sgdiff` command. After a generate that finished cleanly the process leaves at once, without
    the interpreter's teardown (freeing every module and tensor one by one: 0.6 s of a demo run on the
    CPU machine, more with a model on a GPU); everything is written, closed and flushed by then. After
    Ctrl-C or SIGTERM it leaves the same way, once the half-written files are removed and the workers
    stopped: the engine's thread may still be inside one long kernel, and C++'s static destructors would
    abort under it ('terminate called without an active exception', exit 134)."""
    use_bytecode_cache()  # before anything imports torch
    try:
        app()
    except SystemExit as exit_:
        interrupted = exit_.code in INTERRUPTED_EXIT_CODES and engine_thread_busy()
        if (FINISHED["cleanly"] and exit_.code in (0, None)) or interrupted:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(exit_.code or 0)  # type: ignore[arg-type]  # an int here (its tests above)
        raise


INTERRUPTED_EXIT_CODES = (130, 143)  # Ctrl-C, SIGTERM (cli/errors.py)


def engine_thread_busy() -> bool:
    """Whether a thread of this process still runs the model (engine/local.py, speed/warm_up.py)."""
    import threading

    return any(t.name in MODEL_THREADS and t.is_alive() for t in threading.enumerate())


MODEL_THREADS = ("sgdiff-engine", "sgdiff-rank0", "sgdiff-warm-up")

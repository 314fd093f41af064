"""`sgdiff bench`: flags -> sgdiff.bench.run.run_bench; prints the table, optionally writes JSON."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from sgdiff.cli import options as opt
from sgdiff.cli.errors import user_errors
from sgdiff.errors import UserError

# the names of sgdiff/bench/parts.py BENCH_MODELS (a test keeps them equal); mypy cannot list its members
BENCH_MODEL_NAMES = ("flux.1-dev", "flux.1-schnell", "wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "qwen-image",
                     "qwen-image-edit", "hunyuanvideo", "hunyuanvideo-1.5")  # fmt: skip
DEMO_MODEL_NAMES = ("demo-image", "demo-video")  # --e2e only (sgdiff/bench/end_to_end.py DEMO_MODELS)
BenchModelChoice = Enum(  # type: ignore[misc]
    "BenchModelChoice", {name: name for name in BENCH_MODEL_NAMES + DEMO_MODEL_NAMES}, type=str
)


def bench(
    model: Annotated[
        BenchModelChoice | None,
        typer.Option(
            "--model",
            metavar="<name>",
            help="The model to build at full size: flux.1-dev, flux.1-schnell, wan2.1-t2v-1.3b, wan2.1-t2v-14b, "
            "qwen-image, qwen-image-edit (like Qwen-Image-Edit-2509: one 1024x1024 input image), hunyuanvideo "
            "(1280x720x129), hunyuanvideo-1.5 (480p text to video, 848x480x121, CFG); with --e2e also the embedded "
            "demo-image and demo-video (at their presets' size; a CPU is enough). Required but with --quality.",
        ),
    ] = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="Also write the numbers to this JSON file.")] = None,
    tiny: Annotated[bool, typer.Option("--tiny", help="Tiny models instead (checks the benchmark on a CPU).")] = False,
    warmup: Annotated[
        int | None, typer.Option("--warmup", min=0, help="Untimed calls first (default 2; --quality: 1 a mode).")
    ] = None,
    repeat: Annotated[
        int | None, typer.Option("--repeat", min=1, help="Timed calls; the median is reported (default 5).")
    ] = None,
    height: Annotated[
        int | None, typer.Option("--height", help="Output height instead of the model's (a multiple of 16; not --e2e).")
    ] = None,
    width: Annotated[
        int | None, typer.Option("--width", help="Output width instead of the model's (a multiple of 16; not --e2e).")
    ] = None,
    attention_backend: opt.AttentionBackend = opt.AttentionBackendChoice.auto,  # type: ignore[attr-defined]
    enable_fused_projections: opt.EnableFusedProjections = None,
    enable_fused_gelu: opt.EnableFusedGelu = None,
    enable_fused_norms: opt.EnableFusedNorms = None,
    enable_torch_compile: opt.EnableTorchCompile = False,
    torch_compile_mode: opt.TorchCompileMode = None,
    enable_cuda_graph: opt.EnableCudaGraph = False,
    dit_precision: opt.DitPrecision = opt.DitPrecisionChoice.default,
    cache: opt.Cache = opt.CacheChoice.none,
    cache_threshold: opt.CacheThreshold = None,
    cache_warmup_steps: opt.CacheWarmupSteps = None,
    cache_interval: opt.CacheInterval = None,
    vae_tiling: opt.VaeTiling = False,
    cpu_offload: opt.CpuOffload = opt.CpuOffloadChoice.none,
    offload_prefetch: opt.OffloadPrefetch = 1,
    offload_resident_blocks: opt.OffloadResidentBlocks = "auto",
    gpu_memory_limit: opt.GpuMemoryLimit = None,
    e2e: Annotated[
        bool,
        typer.Option(
            "--e2e",
            help="Shell to file: `sgdiff generate` and a diffusers script as fresh processes on a checkpoint "
            "written to disk (FLUX.1, Wan2.1-T2V-1.3B, Qwen-Image); --warmup and --repeat count whole runs "
            "of each.",
        ),
    ] = False,  # fmt: skip
    quality: Annotated[
        bool,
        typer.Option(
            "--quality",
            help="The lossy modes' quality instead of speed: every --cache method, FP8 weights and both (or only "
            "the mode --cache / --dit-precision fp8 name) on the embedded demo models, against their lossless "
            "output for the held-out prompts: PSNR, max difference, the demo checks' pass rates, seconds per "
            "output (the demo models: no --model).",
        ),
    ] = False,  # fmt: skip
    prompts: Annotated[
        int | None,
        typer.Option(
            "--prompts",
            min=1,
            help="--e2e: prompts per process (default 1); --quality: N held-out prompts "
            "of each demo model, spread over them (default: all).",
        ),
    ] = None,  # fmt: skip
    cold: Annotated[bool, typer.Option("--cold", help="--e2e: drop the page cache before each run (root).")] = False,
    sgdiff_only: Annotated[
        bool,
        typer.Option(
            "--sgdiff-only",
            help="--e2e: run `sgdiff generate` alone, not the diffusers script (to set sgdiff's modes against each "
            "other: a lossy mode against the lossless default, an offload against the run in memory).",
        ),
    ] = False,  # fmt: skip
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint-dir",
            help="--e2e: where the checkpoint is written once and reused (default: ~/.cache/sgdiff/bench/MODEL).",
        ),
    ] = None,  # fmt: skip
) -> None:
    """sgdiff against diffusers on the same random weights, inputs and GPU: ms per forward and per
    step, text encoding, VAE decode, the sum of those, memory, TFLOP/s, bf16 agreement; or, with
    --e2e, what a user waits for from the shell to the file."""
    with user_errors():
        if json_path is not None and not json_path.parent.is_dir():
            raise UserError(f"--json {json_path}: the folder {json_path.parent} does not exist")
        from sgdiff.io.files import write_atomically

        speed = opt.speed_config(attention_backend, enable_fused_projections, enable_fused_gelu, enable_fused_norms,
                                 enable_torch_compile, enable_cuda_graph, dit_precision, cache, cache_threshold,
                                 cache_warmup_steps, cache_interval, torch_compile_mode)  # fmt: skip
        if quality:
            memory = memory_flags(vae_tiling, cpu_offload.value, offload_prefetch, offload_resident_blocks,
                                  gpu_memory_limit)  # fmt: skip
            given = {
                "--model": model is not None,
                "--e2e": e2e,
                "--tiny": tiny,
                "--repeat": repeat is not None,
                "--height/--width": height is not None or width is not None,
                "the memory options": memory != [],
            }
            not_for_quality = [name for name, present in given.items() if present]
            if not_for_quality:
                raise UserError(f"--quality runs the embedded demo models, each output once: drop {not_for_quality[0]}")
            from sgdiff.bench.quality import render_quality

            rows = quality_rows(speed, warmup, prompts)
            typer.echo(render_quality(rows))
            if json_path is not None:
                write_atomically(json_path, lambda f: f.write(json.dumps(rows, indent=1).encode()))
            return
        warmup, repeat = 2 if warmup is None else warmup, 5 if repeat is None else repeat
        if model is None:
            raise UserError(f"--model names the model to bench: one of {', '.join(BENCH_MODEL_NAMES)}")
        if e2e and (height is not None or width is not None):
            raise UserError("--height and --width size the per-forward bench; --e2e runs the model's preset size")
        if sgdiff_only and not e2e:
            raise UserError("--sgdiff-only leaves diffusers' script out of --e2e's runs: give --e2e too")
        memory = memory_flags(vae_tiling, cpu_offload.value, offload_prefetch, offload_resident_blocks,
                              gpu_memory_limit)  # fmt: skip
        if model.value in DEMO_MODEL_NAMES:
            check_demo_flags(model.value, e2e, tiny, checkpoint_dir)
        if e2e:
            from sgdiff.bench.end_to_end import render_end_to_end, run_end_to_end

            sides = ("sgdiff",) if sgdiff_only else ("diffusers", "sgdiff")
            result = run_end_to_end(model.value, checkpoint_dir, tiny=tiny, prompts=prompts or 1, warmup=warmup,
                                    repeat=repeat, cold=cold, speed_flags=speed_flags(speed) + memory,
                                    sides=sides)  # fmt: skip
            typer.echo(render_end_to_end(result))
        else:
            from sgdiff.bench.run import render, run_bench

            if speed.cache != "none":
                raise UserError(
                    "--cache skips steps of a whole request: it runs with --e2e (shell to file) or --quality; the "
                    "per-forward bench times one transformer forward"
                )
            if [f for f in memory if f.startswith("--") and f != "--gpu-memory-limit"]:
                raise UserError(
                    "--vae-tiling and --cpu-offload run with --e2e (`sgdiff generate` applies them); the per-forward "
                    "bench builds sgdiff's transformer on diffusers' weights, on the GPU"
                )
            result = run_bench(model.value, speed, tiny=tiny, warmup=warmup, repeat=repeat, height=height, width=width,
                               gpu_memory_limit=gpu_memory_limit)  # fmt: skip
            typer.echo(render(result))
        if json_path is not None:
            write_atomically(json_path, lambda f: f.write(json.dumps(result, indent=1).encode()))


def check_demo_flags(name: str, e2e: bool, tiny: bool, checkpoint_dir: Path | None) -> None:
    """The embedded demo models run shell to file only, from their own folder."""
    if not e2e:
        raise UserError(f"{name} runs with --e2e (shell to file, as `sgdiff generate` runs it); the per-forward "
                        "bench builds full-size models, or --tiny ones")  # fmt: skip
    if tiny:
        raise UserError(f"{name} is the embedded model itself, small already: drop --tiny")
    if checkpoint_dir is not None:
        raise UserError(f"{name} runs from its embedded folder and writes no checkpoint: drop --checkpoint-dir")


def quality_rows(speed, warmup: int | None, prompts: int | None) -> list[dict]:
    """--quality: the lossy modes --cache / --dit-precision name (none named: all of them), each on top of
    the other speed flags given."""
    from sgdiff.bench.quality import lossy_modes, run_quality
    from sgdiff.cli.errors import flag

    named = speed.cache if speed.cache != "none" else None
    modes = lossy_modes(speed, named, fp8=speed.dit_precision == "fp8")
    return run_quality(modes, prompts, warmup=1 if warmup is None else warmup, spell=flag)


def memory_flags(
    vae_tiling: bool, cpu_offload: str, offload_prefetch: int, resident_blocks: str, gpu_memory_limit: str | None
) -> list[str]:
    """The memory options given, as `sgdiff generate` flags (what --e2e runs sgdiff with; diffusers' side runs
    as its script always does, on the whole GPU)."""
    flags = ["--vae-tiling"] if vae_tiling else []
    flags += ["--cpu-offload", cpu_offload] if cpu_offload != "none" else []
    flags += ["--offload-prefetch", str(offload_prefetch)] if offload_prefetch != 1 else []
    flags += ["--offload-resident-blocks", resident_blocks] if resident_blocks.strip() != "auto" else []
    return flags + (["--gpu-memory-limit", gpu_memory_limit] if gpu_memory_limit is not None else [])


def speed_flags(speed) -> list[str]:
    """The speed options as `sgdiff generate` flags (what --e2e runs it with)."""
    from sgdiff.cli.errors import flag

    flags = [] if speed.attention_backend == "auto" else ["--attention-backend", speed.attention_backend]
    flags += [] if speed.dit_precision == "default" else ["--dit-precision", speed.dit_precision]
    if speed.cache != "none":
        flags += ["--cache", speed.cache]
        for name in ("cache_threshold", "cache_warmup_steps", "cache_interval"):
            flags += [flag(name), str(getattr(speed, name))] if getattr(speed, name) is not None else []
    toggles = ("fused_projections", "fused_gelu", "fused_norms", "torch_compile", "cuda_graph")
    flags += [flag(name) for name in toggles if getattr(speed, name)]
    flags += ["--torch-compile-mode", speed.torch_compile_mode] if speed.torch_compile_mode != "ahead" else []
    return flags + [flag(name).replace("--enable-", "--disable-") for name in toggles if getattr(speed, name) is False
                    and name in ("fused_projections", "fused_gelu", "fused_norms")]  # fmt: skip

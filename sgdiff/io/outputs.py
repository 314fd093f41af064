"""Where a client writes a request's outputs: PNG images, MP4 videos or folders of PNG frames, with
the request's parameters as metadata, at paths all checked before any weight loads."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sgdiff.errors import UserError
from sgdiff.io.image import OutputNamer, check_output_file_name, save_png
from sgdiff.io.video import mp4_writer_problem, save_mp4, save_png_frames
from sgdiff.sampling import SamplingParams

DEFAULT_FPS = 16


@dataclass(frozen=True)
class OutputConfig:
    save_output: bool = True
    output_path: Path = Path("outputs")
    output_file_name: str | None = None
    perf_dump_path: Path | None = None
    output_format: str | None = None  # "png" or "mp4"; None: png for image models, mp4 for video models


def output_suffix(output_kind: str, output_format: str | None) -> str:
    """The file suffix a run writes: ".png" (images), ".mp4" (videos) or "" (a video as PNG frames)."""
    fmt = output_format or ("mp4" if output_kind == "video" else "png")
    if output_kind == "image" and fmt != "png":
        raise UserError("--output-format mp4 is for video models; this model makes images (png)")
    return ".png" if output_kind == "image" else (".mp4" if fmt == "mp4" else "")


def planned_outputs(
    all_params: list[SamplingParams],
    out: OutputConfig,
    output_kind: str,
    name_fields: Sequence[Mapping[str, Any] | None] | None = None,
) -> tuple[str, list[Path]]:
    """The suffix and every path a run will write, in order, checked before any weight loads.
    `name_fields`: per request, the fields that set it apart from another of the same prompt and seed (a
    prompt file's line's own), folded into its default name (OutputNamer)."""
    suffix = output_suffix(output_kind, out.output_format)
    if out.output_file_name is not None and (problem := check_output_file_name(out.output_file_name, suffix)):
        raise UserError(problem)
    if out.save_output and suffix == ".mp4" and (problem := mp4_writer_problem()):
        raise UserError(problem)
    return suffix, output_paths(all_params, out, suffix, name_fields) if out.save_output else []


def output_paths(
    all_params: list[SamplingParams],
    out: OutputConfig,
    suffix: str,
    name_fields: Sequence[Mapping[str, Any] | None] | None = None,
) -> list[Path]:
    """A folder of frames must not land on a file, a file not on a folder."""
    namer = OutputNamer(
        out.output_path, out.output_file_name, sum(p.num_outputs_per_prompt for p in all_params), suffix
    )
    paths = [
        namer.next_path(p.prompt, p.seed, index, p.num_outputs_per_prompt, own)
        for p, own in zip(all_params, name_fields or [None] * len(all_params), strict=True)
        for index in range(p.num_outputs_per_prompt)
    ]
    for path in paths:
        if suffix == "" and path.exists() and not path.is_dir():
            raise UserError(f"{path} is a file; the frames would go into a folder of that name: pick another name")
        if suffix and path.is_dir():
            raise UserError(f"{path} is a folder; pick another --output-file-name or --output-path")
    return paths


def output_metadata(params: SamplingParams, index: int, **about: object) -> dict:
    """What a written file records of how it was made: the request's parameters, its index among the
    request's outputs, and `about` (model, preset, dtype, version; `loras`, the adapters it ran with as
    Engine.lora_record tells them, over the parameters' names and scales)."""
    return {**asdict(params), "output_index": index, **about}


def save_output(output, path: Path, suffix: str, fps: int, metadata: dict) -> Path:
    """An image [H, W, 3] as PNG, or a video [T, H, W, 3] as MP4 or a folder of PNG frames."""
    if suffix == ".png":
        return save_png(output, path, metadata)
    if suffix == ".mp4":
        return save_mp4(output, path, fps, metadata)
    return save_png_frames(output, path, metadata)

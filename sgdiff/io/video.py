"""Video output: H.264 MP4 (yuv420p, plays in browsers) or a folder of lossless PNG frames,
both written atomically and carrying the generation parameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sgdiff.io.files import write_folder_atomically, write_path_atomically
from sgdiff.io.image import save_png


def even_sized(frames: np.ndarray) -> np.ndarray:
    """yuv420p needs even width and height: repeat the last row/column where one is odd.
    frames: [T, H, W, 3] uint8."""
    _, h, w, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def mp4_writer_problem() -> str | None:
    """Why MP4s cannot be written here (imageio-ffmpeg or its ffmpeg binary missing), or None; checked
    before any weight loads, so a broken install fails in a second rather than after a whole run."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as error:
        return (
            f"MP4 output needs ffmpeg through the imageio-ffmpeg package ({error}): "
            "pip install imageio-ffmpeg, or write PNG frames with --output-format png"
        )
    return None


def save_mp4(frames: np.ndarray, path: Path, fps: int, parameters: dict[str, Any]) -> Path:
    """frames: [T, H, W, 3] uint8. The parameters go into the MP4's `comment` metadata as JSON."""
    import imageio.v2 as imageio

    def write(tmp: Path) -> None:
        writer = imageio.get_writer(
            tmp,
            format="FFMPEG",
            mode="I",
            fps=fps,
            codec="libx264",
            pixelformat="yuv420p",
            macro_block_size=1,  # sizes are kept as they are (odd ones padded above), never rescaled
            output_params=["-movflags", "+faststart", "-metadata", f"comment={json.dumps(parameters, sort_keys=True)}"],
            ffmpeg_log_level="error",
        )
        try:
            for frame in even_sized(frames):
                writer.append_data(frame)
        finally:
            writer.close()

    write_path_atomically(path, write)
    return path


def save_png_frames(frames: np.ndarray, folder: Path, parameters: dict[str, Any]) -> Path:
    """frames: [T, H, W, 3] uint8 -> folder/frame_00000.png, ... (lossless, for exact comparisons)."""

    def write(tmp: Path) -> None:
        for index, frame in enumerate(frames):
            save_png(frame, tmp / f"frame_{index:05d}.png", {**parameters, "frame_index": index})

    write_folder_atomically(folder, write)
    return folder


def read_png_frames(folder: Path) -> np.ndarray:
    """The frames of a folder written by save_png_frames, [T, H, W, 3] uint8."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("frame_*.png"))])

"""Video output: H.264 MP4 (yuv420p, plays in browsers; ffmpeg from imageio-ffmpeg) or a folder of
lossless PNG frames, both written atomically and carrying the generation parameters."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import tempfile
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from sgdiff.io.files import write_folder_atomically, write_path_atomically
from sgdiff.io.image import save_png

# what ffmpeg's log may name when writing the file fails (its words are strerror's)
FFMPEG_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EIO)


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
    """frames: [T, H, W, 3] uint8. The parameters go into the MP4's `comment` metadata as JSON. If ffmpeg
    fails (a full disk, ...) this raises WriteFailed and no file is left; ffmpeg's own log never reaches
    the terminal (it is a note on the error's cause, which SGDIFF_DEBUG=1's traceback shows)."""
    write_path_atomically(path, lambda tmp: encode_mp4(even_sized(frames), tmp, fps, parameters))
    return path


def ffmpeg_command(width: int, height: int, fps: int, parameters: dict[str, Any], target: Path) -> list[str]:
    """H.264 yuv420p from raw RGB frames on stdin: imageio's FFMPEG writer's command, sizes kept as they
    are (never rescaled), the moov atom first (+faststart: plays while it downloads)."""
    import imageio_ffmpeg

    comment = json.dumps(parameters, sort_keys=True)
    return [
        imageio_ffmpeg.get_ffmpeg_exe(), "-y",
        "-f", "rawvideo", "-vcodec", "rawvideo", "-s", f"{width}x{height}", "-pix_fmt", "rgb24",
        "-r", str(Fraction(fps).limit_denominator()), "-i", "-", "-an",
        "-vcodec", "libx264", "-pix_fmt", "yuv420p", "-v", "error",
        "-movflags", "+faststart", "-metadata", f"comment={comment}", str(target),
    ]  # fmt: skip


def encode_mp4(frames: np.ndarray, target: Path, fps: int, parameters: dict[str, Any]) -> None:
    """frames: [T, H, W, 3] uint8, H and W even. Runs ffmpeg with its log in a temp file, and raises an
    OSError if it fails. ffmpeg runs in its own process group: Ctrl-C interrupts Python, which stops it."""
    _, height, width, _ = frames.shape
    command = ffmpeg_command(width, height, fps, parameters, target)
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
            env={**os.environ, "LC_ALL": "C"},  # its messages in English: ffmpeg_failure reads them
        )
        try:
            # (numpy's stubs give an array no buffer before Python 3.12; communicate takes any buffer)
            process.communicate(memoryview(np.ascontiguousarray(frames, dtype=np.uint8)).cast("B"))  # type: ignore[arg-type]
        except BaseException:
            process.kill()
            process.wait()
            raise
        if process.returncode != 0:
            log.seek(0)
            raise ffmpeg_failure(process.returncode, log.read().decode(errors="replace"))


def ffmpeg_failure(code: int, log: str) -> OSError:
    """ffmpeg's failure as an OSError: with the errno its log names (a full disk: ENOSPC), else its last
    line; the whole log is a note."""
    named = [number for number in FFMPEG_ERRNOS if os.strerror(number) in log]
    if named:
        error = OSError(named[0], os.strerror(named[0]))
    else:
        lines = [line.strip() for line in log.splitlines() if line.strip()]
        why = lines[-1] if lines else (f"killed by signal {-code}" if code < 0 else f"exit code {code}")
        error = OSError(f"ffmpeg failed: {why}")
    error.__notes__ = [f"ffmpeg's log (exit code {code}):\n{log.rstrip()}"]  # type: ignore[attr-defined]  # (3.10)
    return error


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

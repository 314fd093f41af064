"""A write that fails mid-run (a full disk): one line naming the disk and the file, exit code 1, and
nothing partial left behind: no half-written file, no temp file, no folder sgdiff created for it."""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.io import files

runner = CliRunner()
IMAGE = ["--prompt", "a red circle", "--quiet"]
VIDEO = ["--prompt", "a cube", "--num-frames", "9", "--steps", "2", "--quiet"]


class FullDiskFile(io.FileIO):
    """A file on a full disk: a few bytes land, then the write fails as the kernel's does."""

    def write(self, data) -> int:
        super().write(bytes(memoryview(data)[:16]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def full_disk(monkeypatch):
    """Every file sgdiff writes itself (PNGs, frames, the perf dump) fails at its lowest write call."""
    monkeypatch.setattr(files, "open", lambda path, mode="r": FullDiskFile(path, mode), raising=False)


@pytest.fixture
def ffmpeg_on_full_disk(monkeypatch, tmp_path_factory):
    """The real ffmpeg, writing each MP4 to /dev/full: the kernel's own ENOSPC, as on a full disk."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    import imageio_ffmpeg

    folder = tmp_path_factory.mktemp("ffmpeg")
    full = folder / "full.mp4"  # ffmpeg picks the format by the name's extension
    full.symlink_to("/dev/full")
    wrapper = folder / "ffmpeg"
    wrapper.write_text(
        f"#!{sys.executable}\nimport os, sys\n"
        f"exe = {imageio_ffmpeg.get_ffmpeg_exe()!r}\n"
        f"os.execv(exe, [exe, *sys.argv[1:-1], {str(full)!r}])\n"
    )
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("IMAGEIO_FFMPEG_EXE", str(wrapper))


def no_space_line(result, path: Path) -> None:
    """Exit code 1 and exactly `error: no space left on <mount> writing <path>`: no traceback."""
    assert result.exit_code == 1, result.output
    assert re.fullmatch(rf"error: no space left on /\S* writing {re.escape(str(path))}\n", result.stderr), result.stderr
    assert result.stdout == ""


def test_full_disk_png(full_disk, tmp_path):
    out = tmp_path / "new" / "sub"
    result = runner.invoke(app, ["generate", *IMAGE, "--output-path", str(out), "--output-file-name", "x"])
    no_space_line(result, out / "x.png")
    assert list(tmp_path.iterdir()) == []  # neither the file nor the folders made for it


def test_full_disk_perf_dump(full_disk, tmp_path):
    perf = tmp_path / "new" / "perf.json"
    result = runner.invoke(app, ["generate", *IMAGE, "--no-save-output", "--perf-dump-path", str(perf)])
    no_space_line(result, perf)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_png_frames(full_disk, tmp_path):
    out = tmp_path / "new"
    result = runner.invoke(app, ["generate", *VIDEO, "--output-format", "png", "--output-path", str(out),
                                 "--output-file-name", "clip"])  # fmt: skip
    no_space_line(result, out / "clip")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_mp4_is_an_error_and_ffmpeg_stays_quiet(ffmpeg_on_full_disk, tmp_path, capfd):
    """ffmpeg fails on the real ENOSPC: no 0-byte or truncated MP4 reported as saved, and ffmpeg's own
    lines stay off the terminal (capfd: ffmpeg writes to the process's stderr, not Python's)."""
    out = tmp_path / "new"
    result = runner.invoke(app, ["generate", *VIDEO, "--output-path", str(out), "--output-file-name", "clip"])
    no_space_line(result, out / "clip.mp4")
    assert list(tmp_path.iterdir()) == []
    assert capfd.readouterr().err == ""


def test_ffmpeg_failure_keeps_its_log_for_debugging(ffmpeg_on_full_disk, tmp_path):
    """The library raises WriteFailed (an OSError) with the errno; ffmpeg's own log is a note on its
    cause, which SGDIFF_DEBUG=1's traceback shows."""
    from sgdiff.errors import WriteFailed
    from sgdiff.io.video import save_mp4

    with pytest.raises(WriteFailed) as caught:
        save_mp4(np.zeros((5, 16, 16, 3), np.uint8), tmp_path / "v.mp4", 16, {})
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert "No space left on device" in "\n".join(getattr(caught.value.__cause__, "__notes__", []))
    assert list(tmp_path.iterdir()) == []


def test_full_disk_keeps_the_previous_output(full_disk, tmp_path):
    """A failed write replaces nothing: an earlier file of the same name stays as it was."""
    (tmp_path / "x.png").write_bytes(b"earlier")
    result = runner.invoke(app, ["generate", *IMAGE, "--output-path", str(tmp_path), "--output-file-name", "x"])
    no_space_line(result, tmp_path / "x.png")
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"] and (tmp_path / "x.png").read_bytes() == b"earlier"

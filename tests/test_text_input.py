"""Text that is no text (bytes that are not UTF-8, as a shell passes `$'\\xff'` on) is refused up front, by
name, before any weight loads: from the shell and from the library (and so from the server)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sgdiff.config import RuntimeConfig
from sgdiff.engine.runner import ModelRunner
from sgdiff.errors import UserError


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prompt", b"a red circle \xff on blue"], "error: --prompt is not valid UTF-8: byte 0xff at character 14"),
        (
            ["--prompt", b"a red circle", "--negative-prompt", b"blurry \xfe", "--output-file-name", b"x"],
            "error: --negative-prompt is not valid UTF-8: byte 0xfe at character 8",
        ),
    ],
)
def test_the_shell_gets_one_line_and_nothing_is_written(tmp_path, flags, message):
    out = tmp_path / "out"
    args = [os.fsencode(a) if isinstance(a, str) else a for a in ["generate", *flags, "--output-path", str(out)]]
    code = "from sgdiff.cli.main import main; main()"
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.decode() == message + "; pass the text in UTF-8\n" and done.stdout == b""
    assert not out.exists()


def test_the_library_refuses_it_by_field(tiny_flux_dev):
    runner = ModelRunner(str(tiny_flux_dev), runtime=RuntimeConfig(device="cpu"))
    with pytest.raises(UserError, match=r"^prompt is not valid UTF-8: byte 0xed at character 3") as caught:
        runner.sampling_params("ok\udced")
    assert caught.value.field == "prompt" and runner.pipeline is None
    assert runner.sampling_params("ok ünïcode ✓").prompt == "ok ünïcode ✓"  # real UTF-8 is welcome

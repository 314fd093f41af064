"""`sgdiff bench --quality`: each lossy mode on the embedded demo models against their lossless output."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from sgdiff.bench.quality import Mode, lossy_modes, psnr, run_quality
from sgdiff.cli.main import app
from sgdiff.config import CACHE_METHODS, SpeedConfig

runner = CliRunner()


def test_psnr_is_over_the_whole_output_in_db():
    reference = np.zeros((2, 4, 4, 3), np.uint8)  # a 2-frame clip
    out = reference.copy()
    out[0, 0, 0, 0] = 255  # one of 96 values off by 255: mse = 255**2 / 96
    assert psnr([out, reference], [reference, reference]) == [pytest.approx(10 * math.log10(96)), math.inf]


def test_every_lossy_mode_is_benched_unless_one_is_named():
    compiled = SpeedConfig(torch_compile=True)
    modes = lossy_modes(compiled, None, fp8=False)
    assert [m.name for m in modes] == [*CACHE_METHODS, "fp8", *(f"{method} + fp8" for method in CACHE_METHODS)]
    assert all(m.speed.torch_compile and m.speed.cache == (m.name.split(" ")[0] if m.name != "fp8" else "none")
               for m in modes)  # fmt: skip
    named = SpeedConfig(cache="taylorseer", cache_interval=2, dit_precision="fp8")
    expected = Mode("taylorseer + fp8", SpeedConfig(cache="taylorseer", cache_interval=2), fp8=True)
    assert lossy_modes(named, "taylorseer", fp8=True) == [expected]


def test_a_lossless_setting_matches_the_reference_exactly():
    """taylorseer with interval 1 computes every step: both demo models' outputs equal the lossless ones."""
    mode = Mode("taylorseer", SpeedConfig(cache="taylorseer", cache_interval=1))
    rows = run_quality([mode], prompts=1, warmup=0)
    assert [(row["model"], row["mode"]) for row in rows] == [
        ("sgdiff/demo-image", "lossless"), ("sgdiff/demo-image", "taylorseer"),
        ("sgdiff/demo-video", "lossless"), ("sgdiff/demo-video", "taylorseer"),
    ]  # fmt: skip
    for row in rows[1::2]:
        assert row["psnr_mean_db"] is None and row["max_diff"] == 0 and row["skipped"]["skipped"] == 0
        assert row["checks_passed"] and row["skipped"]["computed"] > 0


@pytest.mark.slow
def test_the_cli_measures_a_lossy_mode_and_names_what_a_model_lacks(tmp_path):
    """magcache with FP8 weights (emulated on the CPU): the demo image model (a FLUX) skips steps and stays
    close; the demo video model (a Wan) has no MagCache ratios, and the row says so."""
    out = tmp_path / "quality.json"
    args = ["bench", "--quality", "--cache", "magcache", "--dit-precision", "fp8", "--prompts", "1", "--warmup", "0"]
    result = runner.invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "| sgdiff/demo-image | magcache + fp8 |" in result.output
    image, video = [row for row in json.loads(out.read_text()) if row["mode"] != "lossless"]
    assert image["skipped"]["skipped"] > 0 and 25 < image["psnr_mean_db"] < 60 and image["max_diff"] > 0
    assert set(image["checks"]) == {"background", "colour", "position", "shape"}
    assert video["unavailable"].startswith("--cache magcache is not available for wan models")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--quality", "--model", "flux.1-dev"], "--quality runs the embedded demo models, each output once: drop"),
        (["--quality", "--e2e"], "drop --e2e"),
        (["--quality", "--repeat", "3"], "drop --repeat"),
        (["--quality", "--cpu-offload", "layers"], "drop the memory options"),
        ([], "--model names the model to bench: one of flux.1-dev, "),
        (["--model", "flux.1-dev", "--tiny", "--cache", "fbcache"], "--cache skips steps of a whole request"),
    ],
)  # fmt: skip
def test_bad_quality_flags_end_as_one_line(flags, message):
    result = runner.invoke(app, ["bench", *flags])
    assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, (
        result.output
    )

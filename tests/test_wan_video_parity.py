"""Whole videos: `sgdiff generate --output-format png` writes the frames diffusers' WanPipeline makes
with the same weights, prompt, size, frames, steps, guidance and CPU-generator seed (fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.io.video import read_png_frames

runner = CliRunner()
MAX_PIXEL_DIFF = 2  # of 255


def generate(model, out_dir, *args: str):
    result = runner.invoke(app, ["generate", "--model-path", str(model), "--output-path", str(out_dir), "-q", *args])
    assert result.exit_code == 0, result.output
    return [line for line in result.stdout.splitlines() if line]


def diffusers_frames(model, seed: int, **kwargs) -> np.ndarray:
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).frames
    return (frames * 255).round().astype(np.uint8)  # [N, T, H, W, 3]


def assert_same_videos(folders, expected: np.ndarray) -> None:
    assert len(folders) == len(expected)
    for folder, reference in zip(folders, expected, strict=True):
        actual = read_png_frames(__import__("pathlib").Path(folder))
        assert actual.shape == reference.shape
        assert actual.std() > 1
        assert np.abs(actual.astype(int) - reference.astype(int)).max() <= MAX_PIXEL_DIFF


REQUEST = dict(prompt="a red cube", negative_prompt="blurry", height=32, width=32, num_frames=5)
FLAGS = "--prompt", "a red cube", "--negative-prompt", "blurry", "--height", "32", "--width", "32", "--num-frames", "5"


@pytest.mark.parametrize(
    ("variant", "extra_flags", "extra_kwargs"),
    [
        ("t2v", ["--guidance-scale", "4.0"], dict(guidance_scale=4.0)),
        ("t2v", ["--guidance-scale", "1.0"], dict(guidance_scale=1.0)),  # no CFG: one branch
        (
            "t2v-a14b",
            ["--guidance-scale", "4.0", "--guidance-scale-2", "2.0"],
            dict(guidance_scale=4.0, guidance_scale_2=2.0),
        ),
        ("ti2v", ["--guidance-scale", "5.0"], dict(guidance_scale=5.0)),  # one timestep per token
    ],
)
def test_video_matches_diffusers(tiny_wan, tmp_path, variant, extra_flags, extra_kwargs):
    model = tiny_wan(variant)
    flags, request = list(FLAGS), dict(REQUEST)
    if extra_kwargs["guidance_scale"] <= 1:  # no CFG: a negative prompt would be refused as unused
        flags = flags[:2] + flags[4:]
        request.pop("negative_prompt")
    folders = generate(model, tmp_path, *flags, "--steps", "3", "--seed", "3", "--output-format", "png", *extra_flags)
    expected = diffusers_frames(model, seed=3, num_inference_steps=3, **request, **extra_kwargs)
    assert_same_videos(folders, expected)


def test_two_outputs_and_flow_shift_match_diffusers(tiny_wan, tmp_path):
    from diffusers import UniPCMultistepScheduler, WanPipeline

    model = tiny_wan("t2v")
    folders = generate(model, tmp_path, *FLAGS, "--steps", "2", "--seed", "5", "--output-format", "png",
                       "--num-outputs-per-prompt", "2", "--flow-shift", "7.0")  # fmt: skip
    pipe = WanPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=7.0)
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(**REQUEST, num_inference_steps=2, num_videos_per_prompt=2, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(5)).frames  # fmt: skip
    expected = (frames * 255).round().astype(np.uint8)
    assert not np.array_equal(expected[0], expected[1])
    assert_same_videos(folders, expected)

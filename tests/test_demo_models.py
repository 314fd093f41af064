"""The embedded demo models: the default with no --model-path, and quality measured on the generated
pixels for held-out prompts (and shown to fail when the trained weights are replaced by random ones)."""

from __future__ import annotations

import shutil

import imageio.v3 as iio
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.demo.checks import motion, read
from sgdiff.demo.quality import PASS_RATE, grade_model
from sgdiff.engine.runner import ModelRunner
from sgdiff.models.resolve import demo_model_dir

runner = CliRunner()


@pytest.fixture(scope="module")
def image_engine():
    return ModelRunner("sgdiff/demo-image")


@pytest.fixture(scope="module")
def video_engine():
    return ModelRunner("sgdiff/demo-video")


def test_no_model_path_generates_the_prompt_with_the_demo_model(tmp_path):
    prompt = "a large red circle on the left on a blue background"
    result = runner.invoke(app, ["generate", "--prompt", prompt, "--output-path", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("*.png")
    image = iio.imread(path)
    assert image.shape == (128, 128, 3)
    reading = read(image)
    assert (reading.background, reading.colour) == ("blue", "red")
    assert (reading.position(), reading.shape()) == ("left", "circle")


def test_num_frames_without_a_model_picks_the_demo_video_model(tmp_path):
    result = runner.invoke(
        app,
        ["generate", "--prompt", "a small green square moving up on a white background", "--num-frames", "9"]
        + ["--output-path", str(tmp_path), "--output-format", "png"],
    )
    assert result.exit_code == 0, result.output
    (folder,) = tmp_path.iterdir()
    frames = [iio.imread(p) for p in sorted(folder.glob("frame_*.png"))]
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)
    assert motion(frames) == "up"
    assert (read(frames[4]).background, read(frames[4]).colour) == ("white", "green")


def test_demo_presets_follow_the_model_by_name_and_by_folder():
    assert ModelRunner("sgdiff/demo-image").preset.name == "demo-image"
    assert ModelRunner(str(demo_model_dir("sgdiff/demo-video"))).preset.name == "demo-video"  # matched by its config


@pytest.mark.slow
def test_image_model_draws_held_out_prompts(image_engine):
    grades = grade_model(image_engine, clip=False)
    assert grades.passed(), f"{grades.summary()}; missed: {grades.misses}"


@pytest.mark.slow
def test_video_model_moves_objects_as_held_out_prompts_say(video_engine):
    grades = grade_model(video_engine, clip=True)
    assert grades.passed(), f"{grades.summary()}; missed: {grades.misses}"


def with_random_transformer(name: str, folder):
    """A copy of a demo model whose transformer weights are random, at each tensor's own scale."""
    shutil.copytree(demo_model_dir(name), folder)
    path = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    generator = torch.Generator().manual_seed(0)
    tensors = {
        key: (torch.randn(t.shape, generator=generator) * t.float().std().nan_to_num(0.02) + t.float().mean()).to(
            t.dtype
        )
        for key, t in load_file(path).items()
    }
    save_file(tensors, path, metadata={"format": "pt"})
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name, clip", [("sgdiff/demo-image", False), ("sgdiff/demo-video", True)])
def test_the_checks_fail_random_weights(name, clip, tmp_path):
    # (12 prompts spread over the set: a random transformer gets a colour right by chance, ~1 in 6)
    grades = grade_model(ModelRunner(str(with_random_transformer(name, tmp_path / "model"))), clip=clip, prompts=12)
    assert not grades.passed(), grades.summary()
    assert grades.rates["colour"] < PASS_RATE / 2, grades.summary()

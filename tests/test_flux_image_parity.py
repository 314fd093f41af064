"""Whole images: `sgdiff generate` writes the PNG that diffusers' FluxPipeline makes with the same
weights, prompt, size, steps, guidance and CPU-generator seed (fp32, max abs diff <= 2/255)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.io.image import read_png_parameters

runner = CliRunner()
MAX_PIXEL_DIFF = 2  # of 255


def generate(model, out_dir, *args: str) -> list:
    result = runner.invoke(
        app, ["generate", "--model-path", str(model), "--output-path", str(out_dir), "--quiet", *args]
    )
    assert result.exit_code == 0, result.output
    return [line for line in result.output.splitlines() if line.endswith(".png")]


def diffusers_images(pipe, **kwargs) -> np.ndarray:
    seed = kwargs.pop("seed")
    images = pipe(output_type="np", generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images
    return (images * 255).round().astype(np.uint8)  # what diffusers' PIL output holds


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def assert_same_images(paths, expected: np.ndarray) -> None:
    assert len(paths) == len(expected)
    for path, reference in zip(paths, expected, strict=True):
        actual = read_png(path)
        assert actual.shape == reference.shape
        assert actual.std() > 1  # a real decoded image, not a constant
        assert np.abs(actual.astype(int) - reference.astype(int)).max() <= MAX_PIXEL_DIFF


def generate_both(model, pipe, out_dir, prompt: str, flags: str, **diffusers_kwargs):
    """`sgdiff generate --prompt PROMPT FLAGS` and diffusers' call with the same request."""
    paths = generate(model, out_dir, "--prompt", prompt, *flags.split())
    return paths, diffusers_images(pipe, prompt=prompt, **diffusers_kwargs)


def test_dev_image_matches_diffusers(tiny_flux_dev, diffusers_pipeline, tmp_path):
    pipe = diffusers_pipeline(tiny_flux_dev)
    flags = "--height 48 --width 80 --steps 4 --guidance-scale 4.0 --seed 7"
    paths, expected = generate_both(
        tiny_flux_dev, pipe, tmp_path, "a red cube on a table", flags,
        height=48, width=80, num_inference_steps=4, guidance_scale=4.0, seed=7,
    )  # fmt: skip
    assert_same_images(paths, expected)
    params = read_png_parameters(paths[0])
    summary = (params["prompt"], params["seed"], params["guidance_scale"], params["preset"])
    assert summary == ("a red cube on a table", 7, 4.0, "flux.1-dev")


def test_schnell_image_matches_diffusers(tiny_flux_schnell, diffusers_pipeline, tmp_path):
    # schnell preset: 4 steps, fixed shift, 256 T5 tokens
    pipe = diffusers_pipeline(tiny_flux_schnell)
    paths, expected = generate_both(
        tiny_flux_schnell, pipe, tmp_path, "the photo of a cube", "--height 64 --width 32 --seed 3",
        height=64, width=32, num_inference_steps=4, guidance_scale=0.0, max_sequence_length=256, seed=3,
    )  # fmt: skip
    assert_same_images(paths, expected)
    assert read_png_parameters(paths[0])["num_inference_steps"] == 4


def test_schnell_with_diffusers_default_sequence_length(tiny_flux_schnell, diffusers_pipeline, tmp_path):
    pipe = diffusers_pipeline(tiny_flux_schnell)
    flags = "--height 32 --width 32 --seed 3 --max-sequence-length 512"
    paths, expected = generate_both(
        tiny_flux_schnell, pipe, tmp_path, "the photo of a cube", flags,
        height=32, width=32, num_inference_steps=4, seed=3,
    )  # fmt: skip
    assert_same_images(paths, expected)
    assert read_png_parameters(paths[0])["max_sequence_length"] == 512


def test_true_cfg_with_several_outputs_matches_diffusers(tiny_flux_dev, diffusers_pipeline, tmp_path):
    pipe = diffusers_pipeline(tiny_flux_dev)
    flags = "--negative-prompt blurry --true-cfg-scale 3.0 --num-outputs-per-prompt 2"
    flags += " --height 32 --width 48 --steps 3 --seed 11"
    paths, expected = generate_both(
        tiny_flux_dev, pipe, tmp_path, "a cube", flags,
        negative_prompt="blurry", true_cfg_scale=3.0, num_images_per_prompt=2, height=32, width=48,
        num_inference_steps=3, seed=11,
    )  # fmt: skip
    assert not np.array_equal(expected[0], expected[1])  # two different samples from one generator
    assert_same_images(paths, expected)


def test_default_seed_is_42(tiny_flux_dev, diffusers_pipeline, tmp_path):
    pipe = diffusers_pipeline(tiny_flux_dev)
    paths, expected = generate_both(
        tiny_flux_dev, pipe, tmp_path, "an apple", "--height 32 --width 32 --steps 2",
        height=32, width=32, num_inference_steps=2, seed=42,
    )  # fmt: skip
    assert_same_images(paths, expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_different_seeds_give_different_images(tiny_flux_dev, tmp_path, seed):
    flags = "--height 32 --width 32 --steps 2 --seed".split()
    a = generate(tiny_flux_dev, tmp_path / "a", "--prompt", "x", *flags, str(seed))
    b = generate(tiny_flux_dev, tmp_path / "b", "--prompt", "x", *flags, str(seed + 10))
    assert not np.array_equal(read_png(a[0]), read_png(b[0]))

"""Image-to-video: Wan2.1 I2V (CLIP image features + first-frame latents), Wan2.2 I2V A14B (two
experts, no CLIP) and Wan2.2 TI2V (the first latent frame replaced by the image) against diffusers'
WanImageToVideoPipeline, through the CLI with --output-format png (fp32, CPU generator)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.io.video import read_png_frames

runner = CliRunner()
REQUEST = dict(prompt="a red cube", negative_prompt="blurry", height=32, width=32, num_frames=5, num_inference_steps=3)
FLAGS = ["--prompt", "a red cube", "--negative-prompt", "blurry", "--height", "32", "--width", "32",
         "--num-frames", "5", "--steps", "3"]  # fmt: skip


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    """A 48x40 image with structure (so resizing and the VAE have something to keep)."""
    y, x = np.mgrid[0:40, 0:48]
    pixels = np.stack([x * 5, y * 6, (x + y) * 3], axis=-1).astype(np.uint8)
    path = tmp_path_factory.mktemp("img") / "first.png"
    Image.fromarray(pixels).save(path)
    return path


def diffusers_frames(model, image_path: Path, seed: int, **kwargs) -> np.ndarray:
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(image_path).convert("RGB")
    generator = torch.Generator("cpu").manual_seed(seed)
    frames = pipe(image=image, generator=generator, output_type="np", **REQUEST, **kwargs).frames
    return (frames * 255).round().astype(np.uint8)


@pytest.mark.parametrize(
    ("variant", "extra_flags", "extra_kwargs"),
    [
        ("i2v", ["--guidance-scale", "4.0"], dict(guidance_scale=4.0)),
        (
            "i2v-a14b",
            ["--guidance-scale", "3.5", "--guidance-scale-2", "2.0"],
            dict(guidance_scale=3.5, guidance_scale_2=2.0),
        ),
        ("ti2v", ["--guidance-scale", "5.0"], dict(guidance_scale=5.0)),
    ],
)
def test_image_to_video_matches_diffusers(tiny_wan, picture, tmp_path, variant, extra_flags, extra_kwargs):
    model = tiny_wan(variant)
    output = ["--output-format", "png", "--output-path", str(tmp_path), "--output-file-name", "v", "-q"]
    args = ["generate", "--model-path", str(model), *FLAGS, "--image-path", str(picture), "--seed", "4", *output]
    args += extra_flags
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    actual = read_png_frames(tmp_path / "v")
    expected = diffusers_frames(model, picture, seed=4, **extra_kwargs)[0]
    assert actual.shape == expected.shape == (5, 32, 32, 3) and actual.std() > 1
    assert np.abs(actual.astype(int) - expected.astype(int)).max() <= 2


def test_the_image_changes_the_video(tiny_wan, picture, tmp_path):
    other = tmp_path / "other.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(other)
    videos = []
    for name, image in (("a", picture), ("b", other)):
        args = ["generate", "--model-path", str(tiny_wan("i2v")), *FLAGS, "--image-path", str(image),
                "--output-format", "png", "--output-path", str(tmp_path), "--output-file-name", name, "-q"]  # fmt: skip
        assert runner.invoke(app, args).exit_code == 0
        videos.append(read_png_frames(tmp_path / name))
    assert np.abs(videos[0].astype(int) - videos[1].astype(int)).mean() > 1


@pytest.mark.parametrize(
    ("variant", "image", "message"),
    [
        ("i2v", None, "this image-to-video model needs --image-path"),
        ("t2v", "picture", "--image-path: this model makes video from text only"),
        ("i2v", "missing.png", "--image-path missing.png does not exist"),
        ("i2v", "not-an-image", "is not an image PIL can read"),
        ("i2v", "http://127.0.0.1:9/none.png", "could not be downloaded"),
    ],
)
def test_bad_image_inputs_are_one_line(tiny_wan, picture, tmp_path, variant, image, message):
    args = ["generate", "--model-path", str(tiny_wan(variant)), *FLAGS, "--no-save-output"]
    if image == "picture":
        args += ["--image-path", str(picture)]
    elif image == "not-an-image":
        bad = tmp_path / "bad.png"
        bad.write_text("hello")
        args += ["--image-path", str(bad)]
    elif image is not None:
        args += ["--image-path", image]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")


def test_image_path_on_an_image_model_is_refused(tiny_flux_dev, picture):
    result = runner.invoke(
        app, ["generate", "--model-path", str(tiny_flux_dev), "--prompt", "p", "--image-path", str(picture)]
    )
    assert result.exit_code == 2 and "--image-path does not apply to FluxPipeline" in result.stderr


@pytest.fixture
def served_picture(picture):
    """The picture's URL on a server on loopback, and the list of paths it was asked for."""
    import functools
    import http.server
    import threading

    asked: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(picture.parent))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/{picture.name}", asked
    server.shutdown()


def generate_video(model, image: str, out: Path, name: str, *extra: str) -> np.ndarray:
    output = ["--output-format", "png", "--output-path", str(out), "--output-file-name", name, "-q"]
    result = runner.invoke(
        app, ["generate", "--model-path", str(model), *FLAGS, "--image-path", image, *output, *extra]
    )
    assert result.exit_code == 0, result.output
    return read_png_frames(out / name)


@pytest.mark.slow
def test_image_from_an_http_url(tiny_wan, picture, served_picture, tmp_path):
    """A URL is downloaded once and gives the same video as the file; on two processes too (the
    front fetches the image once and sends its bytes to every rank)."""
    url, asked = served_picture
    from_file = generate_video(tiny_wan("i2v"), str(picture), tmp_path, "from_file")
    assert np.array_equal(generate_video(tiny_wan("i2v"), url, tmp_path, "from_url"), from_file)
    assert len(asked) == 1
    from sgdiff.io.input_image import _download_checked

    _download_checked.cache_clear()  # (the run above left it there: this run downloads it again, once)
    two = generate_video(tiny_wan("i2v"), url, tmp_path, "two", "--num-gpus", "2", "--device", "cpu")
    assert np.abs(two.astype(int) - from_file.astype(int)).max() <= 1 and len(asked) == 2  # not by the workers

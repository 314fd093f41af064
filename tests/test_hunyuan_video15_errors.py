"""HunyuanVideo-1.5 from the CLI: requests the model cannot make refused on one line before anything loads or is
written (frame counts, sizes, an input image where the checkpoint takes none or none where it needs one, a
negative prompt without CFG, a guider sgdiff cannot follow), and its MP4 output (frames, size, the preset's fps)."""

from __future__ import annotations

import json
import shutil

import imageio.v2 as imageio
import pytest
from PIL import Image
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.errors import UserError
from sgdiff.families.hunyuan_video15.sampling import HunyuanVideo15Sampling, hunyuan_video15_rules
from sgdiff.testing.tiny_hunyuan_video15 import build_tiny_hunyuan_video15

runner = CliRunner()
SMALL = ["--num-frames", "5", "--steps", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hunyuan-video15")
    return {
        "t2v": build_tiny_hunyuan_video15(folder / "t2v"),
        "i2v": build_tiny_hunyuan_video15(folder / "i2v", image_to_video=True),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (60, 40), (200, 30, 30)).save(folder / "red.png")
    (folder / "notes.txt").write_text("not an image")
    return {"image": folder / "red.png", "text": folder / "notes.txt", "missing": folder / "absent.png"}


def generate(model, out_dir, *args: str):
    return runner.invoke(app, ["generate", "--model-path", str(model), "--output-path", str(out_dir), *SMALL, *args])


def one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("variant", "args", "message"),
    [
        (
            "t2v",
            ["--num-frames", "8"],
            "--num-frames must be 4k+1 (e.g. 5 or 9), got 8; or pass --num-frames-round-down",
        ),
        ("t2v", ["--height", "40", "--width", "48"], "--height must be a positive multiple of 16 up to 8192, got 40"),
        ("t2v", ["--height", "32", "--width", "56"], "--width must be a positive multiple of 16 up to 8192, got 56"),
        ("t2v", ["--height", "32"], "--height needs --width too: give both, or neither for the model's size"),
        ("i2v", ["--width", "48", "--image-path", "{image}"], "--width needs --height too"),
        ("t2v", ["--image-path", "{image}"], "--image-path: HunyuanVideo15Pipeline makes video from text only"),
        ("i2v", [], "this image-to-video model needs --image-path: the first frame, a file or an http(s) URL"),
        ("i2v", ["--image-path", "{missing}"], "--image-path {missing} does not exist"),
        ("i2v", ["--image-path", "{text}"], "--image-path {text} is not an image PIL can read"),
        ("t2v", ["--negative-prompt", "blurry", "--guidance-scale", "1"], "--negative-prompt is used only with CFG"),
        ("t2v", ["--true-cfg-scale", "4"], "--true-cfg-scale does not apply to HunyuanVideo15Pipeline (a video model)"),
        ("t2v", ["--max-sequence-length", "1001"], "--max-sequence-length must be between 1 and 1000, got 1001"),
    ],
)
def test_requests_it_cannot_make_are_refused_on_one_line_and_nothing_is_written(tiny, files, tmp_path, variant,
                                                                                args, message):  # fmt: skip
    out = tmp_path / "out"
    args = [arg.format(**files) for arg in args]
    one_line_error(generate(tiny[variant], out, "--prompt", "a red cube", *args), message.format(**files))
    assert not out.exists()


def test_a_guider_beyond_plain_cfg_is_refused_before_loading(tiny, tmp_path):
    """guidance_rescale, a start or stop, the original formulation: diffusers' guider would do more than sgdiff's
    CFG; refused, naming the file and the option, rather than ignored."""
    model = tmp_path / "rescaled"
    shutil.copytree(tiny["t2v"], model)
    config_path = model / "guider" / "guider_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "guidance_rescale": 0.7}))
    result = generate(model, tmp_path / "out", "--prompt", "a red cube")
    assert result.exit_code == 2 and "guider option guidance_rescale=0.7 is not supported" in result.stderr
    assert str(config_path) in result.stderr and not (tmp_path / "out").exists()


def test_a_size_must_fill_the_vae_and_the_patches():
    """A VAE of 16x spatial compression and 2x2 patches: 32 pixels a token (the shared rule asks only 16)."""
    rules = hunyuan_video15_rules("HunyuanVideo15Pipeline", {"patch_size": 2}, {"spatial_compression_ratio": 16})
    size_fits_patches = rules[1]
    size_fits_patches(HunyuanVideo15Sampling("p", height=64, width=96))
    with pytest.raises(UserError, match="width must be a multiple of 32 for this model, got 80") as caught:
        size_fits_patches(HunyuanVideo15Sampling("p", height=64, width=80))
    assert caught.value.field == "width"
    with pytest.raises(UserError, match="does not compress time by 4"):
        hunyuan_video15_rules("HunyuanVideo15Pipeline", {}, {"temporal_compression_ratio": 8})


def test_mp4_opens_with_the_frames_size_and_the_presets_fps(tiny, tmp_path):
    result = generate(tiny["t2v"], tmp_path, "--prompt", "a cat walks on the grass", "--num-frames", "8",
                      "--num-frames-round-down", "--output-file-name", "clip")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(tmp_path / "clip.mp4")]
    assert "generated 1 video(s)" in result.stderr
    reader = imageio.get_reader(tmp_path / "clip.mp4")
    meta = reader.get_meta_data()
    # 8 rounded down to 5; 48x32: 16:9 at the tiny checkpoint's target size (diffusers' default size)
    assert reader.count_frames() == 5 and meta["fps"] == 24 and meta["size"] == (48, 32)

"""HunyuanVideo from the CLI: requests the model cannot make refused on one line before anything loads or is
written (frame counts, sizes, an input image for this text-to-video model, true CFG's pair of fields), and its
MP4 output (frames, size, the preset's fps)."""

from __future__ import annotations

import imageio.v2 as imageio
import pytest
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.errors import UserError
from sgdiff.families.hunyuan_video.sampling import HunyuanVideoSampling, hunyuan_video_rules
from sgdiff.testing.tiny_hunyuan_video import build_tiny_hunyuan_video

runner = CliRunner()
SMALL = ["--height", "32", "--width", "48", "--num-frames", "5", "--steps", "2"]


@pytest.fixture(scope="module")
def tiny_hunyuan(tmp_path_factory):
    return build_tiny_hunyuan_video(tmp_path_factory.mktemp("hunyuan-video") / "tiny")


def generate(model, out_dir, *args: str):
    return runner.invoke(app, ["generate", "--model-path", str(model), "--output-path", str(out_dir), *SMALL, *args])


def one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-frames", "8"], "--num-frames must be 4k+1 (e.g. 5 or 9), got 8; or pass --num-frames-round-down"),
        (["--height", "40"], "--height must be a positive multiple of 16 up to 8192, got 40"),
        (["--width", "56"], "--width must be a positive multiple of 16 up to 8192, got 56"),
        (["--image-path", "cat.png"], "--image-path does not apply to HunyuanVideoPipeline (a video model)"),
        (["--negative-prompt", "blurry"], "--negative-prompt is used only with true CFG: add --true-cfg-scale > 1"),
        (["--true-cfg-scale", "4"], "--true-cfg-scale needs a --negative-prompt"),
        (["--guidance-scale-2", "2"], "--guidance-scale-2 does not apply to HunyuanVideoPipeline (a video model)"),
        (["--max-sequence-length", "513"], "--max-sequence-length must be between 1 and 512, got 513"),
    ],
)
def test_requests_it_cannot_make_are_refused_on_one_line_and_nothing_is_written(tiny_hunyuan, tmp_path, args,
                                                                                message):  # fmt: skip
    out = tmp_path / "out"
    one_line_error(generate(tiny_hunyuan, out, "--prompt", "a red cube", *args), message)
    assert not out.exists()


def test_a_size_must_fill_the_vae_and_the_patches():
    """A VAE of 16x spatial compression and 2x2 patches: 32 pixels a token (the shared rule asks only 16)."""
    rules = hunyuan_video_rules({"patch_size": 2}, {"spatial_compression_ratio": 16, "temporal_compression_ratio": 4})
    size_fits_patches = rules[1]
    size_fits_patches(HunyuanVideoSampling("p", height=64, width=96))
    with pytest.raises(UserError, match="width must be a multiple of 32 for this model, got 80") as caught:
        size_fits_patches(HunyuanVideoSampling("p", height=64, width=80))
    assert caught.value.field == "width"
    with pytest.raises(UserError, match="does not compress time by 4"):
        hunyuan_video_rules({}, {"temporal_compression_ratio": 8})


def test_mp4_opens_with_the_frames_size_and_the_presets_fps(tiny_hunyuan, tmp_path):
    result = generate(tiny_hunyuan, tmp_path, "--prompt", "a cat walks on the grass", "--num-frames", "8",
                      "--num-frames-round-down", "--output-file-name", "clip")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(tmp_path / "clip.mp4")]
    assert "generated 1 video(s)" in result.stderr
    reader = imageio.get_reader(tmp_path / "clip.mp4")
    meta = reader.get_meta_data()
    assert reader.count_frames() == 5 and meta["fps"] == 24 and meta["size"] == (48, 32)  # 8 rounded down to 5


def test_a_llama_3_tokenizer_named_llama_tokenizer_fast_still_splits_as_its_file_says(tiny_hunyuan, tmp_path):
    """transformers 5 builds `LlamaTokenizerFast` anew with SentencePiece's pre-tokenizer: Llama 3's byte-level
    vocabulary then splits the template into characters. The pipeline reads the file's own pipeline instead."""
    import json
    import shutil

    from transformers import LlamaTokenizerFast

    from sgdiff.families.hunyuan_video.text import CROP_START, load_llama_tokenizer, template_prefix_tokens

    folder = tmp_path / "tokenizer"
    shutil.copytree(tiny_hunyuan / "tokenizer", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "LlamaTokenizerFast"}))
    assert template_prefix_tokens(LlamaTokenizerFast.from_pretrained(folder)) > CROP_START
    assert template_prefix_tokens(load_llama_tokenizer(folder)) == CROP_START
    with pytest.raises(UserError, match=rf"prompt template up to the prompt into 411 tokens, not the {CROP_START}"):
        load_llama_tokenizer(tiny_hunyuan / "tokenizer_2")  # CLIP's: no template of Llama 3's in its vocabulary

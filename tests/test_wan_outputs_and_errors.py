"""Wan from the CLI: MP4 output, frame-count rules, flags a model cannot use, presets by config."""

from __future__ import annotations

import json
import sys

import imageio.v2 as imageio
import pytest
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.config import select_preset

runner = CliRunner()
SMALL = ["--height", "32", "--width", "32", "--steps", "2"]


def generate(model, *args: str):
    return runner.invoke(app, ["generate", "--model-path", str(model), *SMALL, *args])


def one_line_error(result, message: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_mp4_opens_with_the_right_frames_size_and_fps(tiny_wan, tmp_path):
    result = generate(tiny_wan("t2v"), "--prompt", "a cube", "--num-frames", "9", "--fps", "12",
                      "--output-path", str(tmp_path), "--output-file-name", "clip")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(tmp_path / "clip.mp4")]
    assert "generated 1 video(s)" in result.stderr
    reader = imageio.get_reader(tmp_path / "clip.mp4")
    meta = reader.get_meta_data()
    assert reader.count_frames() == 9 and meta["fps"] == 12 and meta["size"] == (32, 32) and meta["codec"] == "h264"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]  # no temp files left


def test_png_frames_folder_holds_parameters(tiny_wan, tmp_path):
    result = generate(tiny_wan("t2v"), "--prompt", "a cube", "--num-frames", "5", "--output-format", "png",
                      "--output-path", str(tmp_path), "--output-file-name", "clip")  # fmt: skip
    assert result.exit_code == 0, result.output
    frames = sorted((tmp_path / "clip").iterdir())
    assert [f.name for f in frames] == [f"frame_{i:05d}.png" for i in range(5)]
    from sgdiff.io.image import read_png_parameters

    params = read_png_parameters(frames[3])
    assert params["frame_index"] == 3 and params["num_frames"] == 5 and params["prompt"] == "a cube"


def test_num_frames_must_be_4k_plus_1_unless_rounded_down(tiny_wan, tmp_path):
    model = tiny_wan("t2v")
    one_line_error(
        generate(model, "--prompt", "p", "--num-frames", "8"), "--num-frames must be 4k+1 (e.g. 5 or 9), got 8"
    )
    result = generate(model, "--prompt", "p", "--num-frames", "8", "--num-frames-round-down", "--output-format",
                      "png", "--output-path", str(tmp_path), "--output-file-name", "v")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "v").iterdir())) == 5


def test_a_video_model_without_a_preset_needs_num_frames(tiny_wan):
    one_line_error(generate(tiny_wan("t2v"), "--prompt", "p"), "this video model needs --num-frames")


@pytest.mark.parametrize(
    ("variant", "args", "message"),
    [
        ("t2v", ["--guidance-scale-2", "2"], "--guidance-scale-2 (given or from a preset) is for Wan2.2 A14B"),
        ("t2v", ["--true-cfg-scale", "4"], "--true-cfg-scale does not apply to WanPipeline (a video model)"),
        ("t2v", ["--height", "48"], None),  # 48 is fine for Wan2.1 (multiple of 16)
        ("t2v", ["--negative-prompt", "x", "--guidance-scale", "1"], "--negative-prompt is used only with CFG"),
        ("t2v-a14b", ["--guidance-scale-2", "3", "--guidance-scale", "1"], "--guidance-scale-2 is used only with CFG"),
        ("ti2v", ["--height", "48"], "--height must be a multiple of 32 for this model"),
        ("t2v", ["--output-file-name", "clip.png"], "this run writes .mp4 files"),
    ],
)
def test_video_flags_checked_before_loading(tiny_wan, variant, args, message, tmp_path):
    result = generate(tiny_wan(variant), "--prompt", "p", "--num-frames", "5", "--output-path", str(tmp_path), *args)
    if message is None:
        assert result.exit_code == 0, result.output
    else:
        one_line_error(result, message)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-frames", "5"], "--num-frames does not apply to FluxPipeline (an image model)"),
        (["--fps", "8"], "--fps does not apply to FluxPipeline"),
        (["--flow-shift", "3"], "--flow-shift does not apply to FluxPipeline"),
        (["--output-format", "mp4"], "--output-format mp4 is for video models"),
        (["--output-file-name", "x.jpg"], "this run writes .png files"),
    ],
)
def test_image_model_refuses_video_flags(tiny_flux_dev, args, message):
    one_line_error(generate(tiny_flux_dev, "--prompt", "p", *args), message)


@pytest.mark.parametrize(
    ("transformer", "model_index", "expected"),
    [
        ({"num_layers": 30, "in_channels": 16, "num_attention_heads": 12}, {}, "wan2.1-t2v-1.3b"),
        ({"num_layers": 40, "in_channels": 16, "num_attention_heads": 40}, {}, "wan2.1-t2v-14b"),
        (
            {"num_layers": 40, "in_channels": 16, "num_attention_heads": 40},
            {"boundary_ratio": 0.875},
            "wan2.2-t2v-a14b",
        ),
        (
            {"num_layers": 30, "in_channels": 48, "num_attention_heads": 24},
            {"expand_timesteps": True},
            "wan2.2-ti2v-5b",
        ),
    ],
)
def test_wan_presets_follow_the_checkpoint_config(transformer, model_index, expected):
    assert select_preset(None, "/local/finetune", "WanPipeline", transformer, model_index).name == expected


@pytest.mark.parametrize(
    ("transformer", "model_index", "expected"),
    [
        ({"num_layers": 40, "in_channels": 36, "image_dim": 1280}, {}, "wan2.1-i2v-14b-480p"),
        ({"num_layers": 40, "in_channels": 36, "image_dim": None}, {"boundary_ratio": 0.9}, "wan2.2-i2v-a14b"),
    ],
)
def test_wan_i2v_presets_follow_the_checkpoint_config(transformer, model_index, expected):
    assert select_preset(None, "/x", "WanImageToVideoPipeline", transformer, model_index).name == expected
    assert select_preset(None, "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers", "WanImageToVideoPipeline", transformer,
                         model_index).name == "wan2.1-i2v-14b-720p"  # fmt: skip


def test_wan_preset_fills_fps_negative_prompt_and_flow_shift(tiny_wan, tmp_path):
    from sgdiff.config import load_preset
    from sgdiff.io.image import read_png_parameters

    result = generate(tiny_wan("t2v"), "--prompt", "p", "--preset", "wan2.1-t2v-1.3b", "--num-frames", "5",
                      "--output-format", "png", "--output-path", str(tmp_path), "--output-file-name", "v")  # fmt: skip
    assert result.exit_code == 0, result.output
    params = read_png_parameters(tmp_path / "v" / "frame_00000.png")
    preset = load_preset("wan2.1-t2v-1.3b").sampling
    assert (params["fps"], params["flow_shift"], params["guidance_scale"]) == (16, 3.0, 3.0)
    assert params["negative_prompt"] == preset["negative_prompt"] and params["num_frames"] == 5  # the flag wins


def test_a_two_expert_checkpoint_missing_an_expert_fails_before_loading(tiny_wan, tmp_path):
    import shutil

    broken = tmp_path / "a14b"
    shutil.copytree(tiny_wan("t2v-a14b"), broken)
    shutil.rmtree(broken / "transformer_2")
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "transformer_2": [None, None]}))
    one_line_error(generate(broken, "--prompt", "p", "--num-frames", "5"), "lacks transformer/ or transformer_2/")


@pytest.mark.parametrize(
    ("variant", "args", "message"),
    [
        ("i2v", ["--max-sequence-length", "64"], "--max-sequence-length must stay 512 for Wan2.1 I2V"),
        ("t2v-a14b", ["--preset", "fastwan2.1-t2v-1.3b"], "DMD sampling (FastWan) is for single-expert Wan2.1 T2V"),
    ],
)
def test_requests_the_model_cannot_serve(tiny_wan, tmp_path, variant, args, message):
    image = tmp_path / "i.png"
    __import__("PIL.Image", fromlist=["Image"]).new("RGB", (32, 32)).save(image)
    extra = ["--num-frames", "5", "--image-path", str(image)] if variant == "i2v" else []
    one_line_error(generate(tiny_wan(variant), "--prompt", "p", *extra, *args), message)


def test_interrupted_frame_folder_keeps_the_previous_output(tmp_path, monkeypatch):
    import os

    import numpy as np

    from sgdiff.io import files
    from sgdiff.io.video import save_png_frames

    frames = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    save_png_frames(frames, tmp_path / "clip", {})
    real_replace, calls = os.replace, []

    def replace_then_interrupt(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new folder moving into place
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_png_frames(frames + 1, tmp_path / "clip", {})
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip"]  # nothing hidden, nothing half-written
    assert len(list((tmp_path / "clip").iterdir())) == 2


def test_odd_sized_video_is_padded_to_even_for_yuv420p(tmp_path):
    import numpy as np

    from sgdiff.io.video import save_mp4

    frames = (np.random.default_rng(0).random((5, 31, 45, 3)) * 255).astype(np.uint8)
    save_mp4(frames, tmp_path / "odd.mp4", 8, {"prompt": "x"})
    reader = imageio.get_reader(tmp_path / "odd.mp4")
    assert reader.get_meta_data()["size"] == (46, 32) and reader.count_frames() == 5


def test_wan_pipeline_stages_and_parallel_modes(tiny_wan):
    from sgdiff.engine.runner import ModelRunner
    from sgdiff.pipeline.base import ParallelMode

    engine = ModelRunner(str(tiny_wan("i2v")))
    engine.load()
    assert [(s.name, s.parallel) for s in engine.pipeline.stages] == [
        ("input_validation", ParallelMode.ALL_RANKS),
        ("text_encoding", ParallelMode.RANK0_ONLY),
        ("image_encoding", ParallelMode.ALL_RANKS),
        ("timesteps", ParallelMode.ALL_RANKS),
        ("latents", ParallelMode.ALL_RANKS),
        ("denoising", ParallelMode.CFG_SPLIT),
        ("decoding", ParallelMode.RANK0_ONLY),
    ]


def test_missing_mp4_writer_is_refused_before_loading(tiny_wan, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # `import imageio_ffmpeg` now fails
    one_line_error(generate(tiny_wan("t2v"), "--prompt", "p", "--num-frames", "5", "--output-path", str(tmp_path)),
                   "MP4 output needs ffmpeg through the imageio-ffmpeg package")  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    frames = generate(tiny_wan("t2v"), "--prompt", "p", "--num-frames", "5", "--output-path", str(tmp_path),
                      "--output-format", "png", "--output-file-name", "clip")  # fmt: skip
    assert frames.exit_code == 0, frames.output
    assert len(list((tmp_path / "clip").glob("frame_*.png"))) == 5


def test_output_targets_of_the_other_kind_are_refused_before_loading(tiny_wan, tmp_path):
    (tmp_path / "clip").write_text("not a folder")
    (tmp_path / "movie.mp4").mkdir()
    frames = generate(tiny_wan("t2v"), "--prompt", "p", "--num-frames", "5", "--output-format", "png",
                      "--output-path", str(tmp_path), "--output-file-name", "clip")  # fmt: skip
    one_line_error(frames, "is a file; the frames would go into a folder of that name")
    movie = generate(tiny_wan("t2v"), "--prompt", "p", "--num-frames", "5", "--output-path", str(tmp_path),
                     "--output-file-name", "movie")  # fmt: skip
    one_line_error(movie, "movie.mp4 is a folder")
    assert (tmp_path / "clip").read_text() == "not a folder"

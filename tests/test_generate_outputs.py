"""What `sgdiff generate` writes: names, PNG metadata, perf dumps, several prompts on one load."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from sgdiff import __version__
from sgdiff.cli.main import app
from sgdiff.engine.runner import ModelRunner
from sgdiff.io.image import OutputNamer, read_png_parameters, save_png

runner = CliRunner()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


SMALL = ["--height", "32", "--width", "32", "--steps", "2"]


def generate(model, *args: str):
    return runner.invoke(app, ["generate", "--model-path", str(model), *SMALL, *args])


def test_output_file_name_is_exact(tiny_flux_dev, tmp_path):
    result = generate(tiny_flux_dev, "--prompt", "p", "--output-path", str(tmp_path), "--output-file-name", "cat")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.png"]
    assert str(tmp_path / "cat.png") in result.output


def test_several_outputs_get_numbered_suffixes(tiny_flux_dev, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sphere\n")
    out = tmp_path / "out"
    result = generate(
        tiny_flux_dev,
        "--prompt-file",
        str(prompts),
        "--num-outputs-per-prompt",
        "2",
        "--output-path",
        str(out),
        "--output-file-name",
        "img.png",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["img_0.png", "img_1.png", "img_2.png", "img_3.png"]
    prompts_written = [read_png_parameters(out / f"img_{i}.png")["prompt"] for i in range(4)]
    assert prompts_written == ["a red cube", "a red cube", "a blue sphere", "a blue sphere"]
    assert result.output.split() == [str(out / f"img_{i}.png") for i in range(4)]  # --quiet: only the paths


def test_default_names_come_from_prompt_and_seed(tmp_path):
    namer = OutputNamer(tmp_path, None, total_outputs=4)
    first = namer.next_path("A red cube!", 7, 0, 1).name
    assert re.fullmatch(r"a-red-cube-[0-9a-f]{6}_7\.png", first)
    assert namer.next_path("a red cube", 7, 0, 1).name != first  # same slug, another prompt: another file
    assert re.fullmatch(r"x-[0-9a-f]{6}_1_1\.png", namer.next_path("x", 1, 1, 2).name)
    assert namer.next_path("猫", 1, 0, 1).name != namer.next_path("犬", 1, 0, 1).name


def test_runs_that_differ_only_in_steps_or_frames_keep_their_own_files(tmp_path):
    """Default names hash what a run was given besides prompt and seed: --steps 1 and --steps 2 (or two
    frame counts) write two files; the same command again overwrites its own file."""
    video = ["--model-path", "sgdiff/demo-video", "--prompt", "a red ball", "--height", "32", "--width", "32",
             "--seed", "3", "--output-path", str(tmp_path)]  # fmt: skip
    runs = [["--steps", "1", "--num-frames", "5"], ["--steps", "2", "--num-frames", "5"],
            ["--steps", "1", "--num-frames", "9"], ["--steps", "1", "--num-frames", "5"]]  # fmt: skip
    written = []
    for flags in runs:
        result = runner.invoke(app, ["generate", *video, *flags, "--quiet"])
        assert result.exit_code == 0, result.output
        written.append(result.output.strip())
    assert len(set(written[:3])) == 3 and written[3] == written[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({os.path.basename(w) for w in written})
    assert all(re.fullmatch(r"a-red-ball-[0-9a-f]{6}_3\.mp4", os.path.basename(w)) for w in written)


def test_output_file_name_keeps_its_extension(tmp_path):
    assert OutputNamer(tmp_path, "x.PNG", 1).next_path("p", 1, 0, 1).name == "x.PNG"
    assert OutputNamer(tmp_path, "x.v2", 1).next_path("p", 1, 0, 1).name == "x.v2.png"
    namer = OutputNamer(tmp_path, "x.PNG", 2)
    assert [namer.next_path("p", 1, i, 2).name for i in range(2)] == ["x_0.PNG", "x_1.PNG"]


def test_png_holds_the_generation_parameters(tiny_flux_dev, tmp_path):
    result = generate(tiny_flux_dev, "--prompt", "a cube", "--seed", "5", "--output-path", str(tmp_path), "-q")
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("a-cube-*_5.png")
    assert (path.stat().st_mode & 0o777) == 0o666 & ~current_umask()  # not mkstemp's 0600
    params = read_png_parameters(path)
    assert params["prompt"] == "a cube" and params["seed"] == 5 and params["model"] == str(tiny_flux_dev)
    assert (params["height"], params["width"], params["num_inference_steps"]) == (32, 32, 2)
    assert params["dtype"] == "float32" and params["preset"] == "flux.1-dev"
    assert (params["model_revision"], params["model_commit"]) == (None, None)  # not from the Hub
    assert Image.open(path).size == (32, 32)


def test_no_save_output_writes_nothing_but_the_perf_dump(tiny_flux_dev, tmp_path):
    out, perf = tmp_path / "out", tmp_path / "perf.json"
    result = generate(
        tiny_flux_dev, "--prompt", "p", "--no-save-output", "--output-path", str(out), "--perf-dump-path", str(perf)
    )
    assert result.exit_code == 0, result.output
    assert not out.exists()
    dump = json.loads(perf.read_text())
    assert dump["schema_version"] == 4 and dump["gpu"] is None  # (the CPU)
    assert (dump["model_revision"], dump["model_commit"]) == (None, None)  # a folder of one's own
    assert dump["versions"]["sgdiff"] == __version__ and dump["versions"]["torch"] == torch.__version__
    request = dump["requests"][0]
    assert (request["seed"], request["num_frames"], request["fps"]) == (42, None, None)
    assert list(request["stage_seconds"]) == [
        "input_validation",
        "text_encoding",
        "timesteps",
        "latents",
        "denoising",
        "decoding",
    ]
    assert len(request["step_seconds"]) == 2 and all(s > 0 for s in request["step_seconds"])
    assert dump["peak_rss_bytes"] > 0 and request["peak_gpu_memory_bytes"] is None
    assert dump["device"] == "cpu" and dump["dtype"] == "float32"


def test_prompt_file_loads_the_model_once(tiny_flux_dev, tmp_path, monkeypatch):
    loads = []
    original = ModelRunner.load

    def counting_load(self, **kwargs):
        loads.append(self.pipeline is None)
        original(self, **kwargs)

    monkeypatch.setattr(ModelRunner, "load", counting_load)
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n")
    perf = tmp_path / "perf.json"
    result = generate(
        tiny_flux_dev,
        "--prompt-file",
        str(prompts),
        "--output-path",
        str(tmp_path / "o"),
        "--perf-dump-path",
        str(perf),
        "-q",
    )
    assert result.exit_code == 0, result.output
    assert loads.count(True) == 1  # weights loaded once
    assert [r["prompt"] for r in json.loads(perf.read_text())["requests"]] == ["one", "two", "three"]


def test_progress_and_summary_on_stderr_paths_on_stdout(tiny_flux_dev, tmp_path):
    result = generate(tiny_flux_dev, "--prompt", "p", "--output-path", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "loaded transformer" in result.stderr and "denoised" in result.stderr and "decoded" in result.stderr
    assert "generated 1 image(s)" in result.stderr
    assert result.stdout.split() == [str(p) for p in tmp_path.glob("*.png")]


def test_truncated_prompt_warns_once_unless_quiet(tiny_flux_dev, tmp_path):
    long_prompt = " ".join(["cube"] * 80)  # over CLIP's 77 tokens
    result = generate(tiny_flux_dev, "--prompt", long_prompt, "--no-save-output")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "CLIPTokenizer keeps the first 77" in warnings[0]
    assert "Token indices" not in result.stderr  # transformers' own advice stays quiet
    quiet = generate(tiny_flux_dev, "--prompt", long_prompt, "--no-save-output", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    image = np.zeros((8, 8, 3), dtype=np.uint8)

    def broken_save(self, handle, **kwargs):
        handle.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_png(image, tmp_path / "x.png", {})
    assert list(tmp_path.iterdir()) == []


def test_engine_api_without_the_cli(tiny_flux_schnell):
    engine = ModelRunner(str(tiny_flux_schnell))
    assert engine.preset.name == "flux.1-schnell"
    params = engine.sampling_params("a cube", height=48, width=32, num_outputs_per_prompt=2)
    assert params.num_inference_steps == 4  # from the schnell preset
    result = engine.generate(params)
    assert result.images.shape == (2, 48, 32, 3) and result.images.dtype == np.uint8
    assert not np.array_equal(result.images[0], result.images[1])


def test_max_sequence_length_sets_the_t5_tokens(tiny_flux_schnell):
    engine = ModelRunner(str(tiny_flux_schnell))
    engine.load()
    encode = engine.pipeline.stages[1].encode
    requests = {256: {}, 512: {"max_sequence_length": 512}, 77: {"max_sequence_length": 77}}  # preset, flag, flag
    for length, flags in requests.items():
        params = engine.sampling_params("a cube", **flags)
        assert encode(["a cube"], params)["encoder_hidden_states"].shape[1] == length


def test_overflowing_latents_are_refused_and_nothing_is_saved(tiny_flux_dev, tmp_path):
    """A finite but enormous guidance overflows the sampled latents to NaN or infinity: no garbage picture."""
    result = generate(tiny_flux_dev, "--prompt", "p", "--guidance-scale", "1e38", "--output-path", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert "error: the denoised latents hold NaN or infinity" in result.stderr and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_a_video_perf_dump_says_its_frames_and_fps(tmp_path):
    perf = tmp_path / "perf.json"
    args = ["generate", "--prompt", "a red circle moving up", "--num-frames", "9", "--steps", "1", "--fps", "8"]
    result = CliRunner().invoke(app, [*args, "--no-save-output", "--perf-dump-path", str(perf)])
    assert result.exit_code == 0, result.output
    request = json.loads(perf.read_text())["requests"][0]
    assert (request["num_frames"], request["fps"], request["seed"]) == (9, 8, 42)


def test_the_progress_of_several_prompts_says_whose_lines_they_are(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    args = ["generate", "--prompt-file", str(prompts), "--steps", "2", "--output-path", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args, terminal_width=120)
    assert result.exit_code == 0, result.output
    labels = re.findall(r"\[(\d)/2\] (denoised|decoded)", result.output)
    assert labels == [("1", "denoised"), ("1", "decoded"), ("2", "denoised"), ("2", "decoded")]

"""What `sgdiff generate` writes: names, PNG metadata, perf dumps, several prompts on one load."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.engine.engine import Engine
from sgdiff.io.image import OutputNamer, read_png_parameters, save_png

runner = CliRunner()
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
    namer = OutputNamer(tmp_path, None, total_outputs=3)
    assert namer.next_path("A red cube!", 7, 0, 1).name == "a-red-cube_7.png"
    assert namer.next_path("x", 1, 1, 2).name == "x_1_1.png"
    assert namer.next_path("   ", 1, 0, 1).name == "image_1.png"


def test_png_holds_the_generation_parameters(tiny_flux_dev, tmp_path):
    result = generate(tiny_flux_dev, "--prompt", "a cube", "--seed", "5", "--output-path", str(tmp_path), "-q")
    assert result.exit_code == 0, result.output
    params = read_png_parameters(tmp_path / "a-cube_5.png")
    assert params["prompt"] == "a cube" and params["seed"] == 5 and params["model"] == str(tiny_flux_dev)
    assert (params["height"], params["width"], params["num_inference_steps"]) == (32, 32, 2)
    assert params["dtype"] == "float32" and params["preset"] == "flux.1-dev"
    assert Image.open(tmp_path / "a-cube_5.png").size == (32, 32)


def test_no_save_output_writes_nothing_but_the_perf_dump(tiny_flux_dev, tmp_path):
    out, perf = tmp_path / "out", tmp_path / "perf.json"
    result = generate(
        tiny_flux_dev, "--prompt", "p", "--no-save-output", "--output-path", str(out), "--perf-dump-path", str(perf)
    )
    assert result.exit_code == 0, result.output
    assert not out.exists()
    dump = json.loads(perf.read_text())
    request = dump["requests"][0]
    assert list(request["stage_seconds"]) == [
        "input_validation",
        "text_encoding",
        "timesteps",
        "latents",
        "denoising",
        "decoding",
    ]
    assert len(request["step_seconds"]) == 2 and all(s > 0 for s in request["step_seconds"])
    assert dump["peak_rss_bytes"] > 0 and dump["peak_gpu_memory_bytes"] is None
    assert dump["device"] == "cpu" and dump["dtype"] == "float32"


def test_prompt_file_loads_the_model_once(tiny_flux_dev, tmp_path, monkeypatch):
    loads = []
    original = Engine.load

    def counting_load(self):
        loads.append(self.pipeline is None)
        original(self)

    monkeypatch.setattr(Engine, "load", counting_load)
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


def test_progress_and_summary_on_stderr(tiny_flux_dev, tmp_path):
    result = generate(tiny_flux_dev, "--prompt", "p", "--output-path", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "loaded transformer" in result.output and "denoised" in result.output and "decoded" in result.output
    assert "generated 1 image(s)" in result.output


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
    engine = Engine(str(tiny_flux_schnell))
    assert engine.preset.name == "flux.1-schnell"
    params = engine.sampling_params("a cube", height=48, width=32, num_outputs_per_prompt=2)
    assert params.num_inference_steps == 4  # from the schnell preset
    result = engine.generate(params)
    assert result.images.shape == (2, 48, 32, 3) and result.images.dtype == np.uint8
    assert not np.array_equal(result.images[0], result.images[1])

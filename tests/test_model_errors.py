"""Checkpoints and runtime flags a user can get wrong: one line, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from sgdiff.cli.main import app

runner = CliRunner()


def generate(model, *args: str):
    return runner.invoke(
        app,
        [
            "generate",
            "--model-path",
            str(model),
            "--height",
            "32",
            "--width",
            "32",
            "--steps",
            "1",
            "--no-save-output",
            *args,
        ],
    )


def assert_one_line_error(result, message: str, after_progress: bool = False) -> None:
    """Exit code 2, no traceback, one error line; only progress lines (if any) come before it."""
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert message in lines[-1] and lines[-1].startswith("error: ")
    assert "Traceback" not in result.output
    assert len(lines) == 1 or (after_progress and all("load" in line for line in lines[:-1]))


@pytest.fixture
def model_copy(tiny_flux_dev, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_flux_dev, copy)
    return copy


def test_pickle_only_component_is_refused(model_copy):
    vae = model_copy / "vae"
    (vae / "diffusion_pytorch_model.safetensors").rename(vae / "diffusion_pytorch_model.bin")
    assert_one_line_error(generate(model_copy, "--prompt", "p"), "holds only pickle weights (.bin/.pt)")


def test_missing_shard_is_named(model_copy):
    first_shard = sorted((model_copy / "transformer").glob("*-00001-of-*.safetensors"))[0]
    first_shard.unlink()
    assert_one_line_error(generate(model_copy, "--prompt", "p"), f"shard {first_shard.name}")


def test_weights_that_do_not_fit_the_model_are_refused(model_copy):
    config_path = model_copy / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_layers"] = 3  # the checkpoint has 2
    config_path.write_text(json.dumps(config))
    # only found while loading, so the parts loaded before it have shown their progress lines
    assert_one_line_error(
        generate(model_copy, "--prompt", "p"), "weights do not match FluxTransformer", after_progress=True
    )


def test_missing_component_folder_is_named(model_copy):
    shutil.rmtree(model_copy / "text_encoder_2")
    assert_one_line_error(generate(model_copy, "--prompt", "p"), "model_index.json names a text_encoder_2/ folder")


def test_guidance_scale_on_schnell_is_refused(tiny_flux_schnell):
    assert_one_line_error(
        generate(tiny_flux_schnell, "--prompt", "p", "--guidance-scale", "3.5"),
        "has no guidance embedding, so --guidance-scale does nothing",
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--negative-prompt", "blurry"], "--negative-prompt is used only with true CFG"),
        (["--true-cfg-scale", "4"], "--true-cfg-scale needs a --negative-prompt"),
        (["--dtype", "int8"], "--dtype int8 is not supported"),
        (["--device", "banana"], "--device banana is not a device"),
    ],
)
def test_flags_flux_would_ignore_or_cannot_use(tiny_flux_dev, args, message):
    assert_one_line_error(generate(tiny_flux_dev, "--prompt", "p", *args), message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without CUDA")
def test_cuda_flags_without_a_gpu(tiny_flux_dev):
    assert_one_line_error(generate(tiny_flux_dev, "--prompt", "p", "--device", "cuda"), "no CUDA GPU is visible")
    assert_one_line_error(
        generate(tiny_flux_dev, "--prompt", "p", "--generator-device", "cuda"),
        "--generator-device cuda needs the model on a CUDA device",
    )


def run_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    """The installed entry point in a fresh process, as a shell script would call it."""
    return subprocess.run([sys.executable, "-m", "sgdiff", *args], capture_output=True, text=True, env=env, timeout=300)


def fake_hub_cache(hf_home, repo_id: str, model_dir) -> None:
    """Lay out a model as huggingface_hub caches a downloaded snapshot."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, repo / "snapshots" / commit)


def test_repo_id_resolves_through_the_hf_cache_offline(tiny_flux_dev, tmp_path):
    hf_home = tmp_path / "hf"
    # a dev-like checkpoint published under schnell's id: the preset follows the id
    fake_hub_cache(hf_home, "black-forest-labs/FLUX.1-schnell", tiny_flux_dev)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "out"
    result = run_cli(
        "generate",
        "--model-path",
        "black-forest-labs/FLUX.1-schnell",
        "--prompt",
        "p",
        "--height",
        "32",
        "--width",
        "32",
        "--output-path",
        str(out),
        "--output-file-name",
        "x",
        "-q",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out / "x.png")
    from sgdiff.io.image import read_png_parameters

    params = read_png_parameters(out / "x.png")
    assert params["preset"] == "flux.1-schnell" and params["num_inference_steps"] == 4


def test_uncached_repo_id_offline_is_one_line(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    result = run_cli("generate", "--model-path", "someone/not-cached", "--prompt", "p", env=env)
    assert result.returncode == 2
    assert "someone/not-cached is not in the local HF cache" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_local_looking_path_is_not_sent_to_the_hub(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    result = run_cli("generate", "--model-path", "./models/flux", "--prompt", "p", env=env)
    assert result.returncode == 2
    assert "--model-path ./models/flux does not exist" in result.stderr

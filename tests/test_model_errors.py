"""Checkpoints and runtime flags a user can get wrong: one line, exit code 2, no traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

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
        "guidance_scale is 3.5, but this FLUX model (schnell-like) has no guidance embedding",
    )


def test_dev_preset_forced_onto_schnell_names_the_value_not_a_flag(tiny_flux_schnell):
    result = generate(tiny_flux_schnell, "--prompt", "p", "--preset", "flux.1-dev")
    assert_one_line_error(result, "pass --guidance-scale 0 or --preset flux.1-schnell")
    assert (
        generate(tiny_flux_schnell, "--prompt", "p", "--preset", "flux.1-dev", "--guidance-scale", "0").exit_code == 0
    )


@pytest.mark.parametrize(
    ("index", "message"),
    [
        ("[1, 2]", "must hold a JSON object"),
        ('{"_class_name": "FluxPipeline", "vae": ["diffusers"]}', "entry 'vae' should be [library, class]"),
        ("{not json", "is not valid JSON"),
    ],
)
def test_broken_model_index_is_one_line(tmp_path, index, message):
    (tmp_path / "model_index.json").write_text(index)
    assert_one_line_error(generate(tmp_path, "--prompt", "p"), message)


def test_non_utf8_config_is_one_line(model_copy):
    (model_copy / "transformer" / "config.json").write_bytes(b'{"x": "\xff"}')
    assert_one_line_error(generate(model_copy, "--prompt", "p"), "config.json is not UTF-8 text")


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"use_karras_sigmas": True}, "scheduler option use_karras_sigmas=True is not supported"),
        ({"shift": "big"}, "scheduler option shift must be float, got 'big'"),
    ],
)
def test_scheduler_options_sgdiff_cannot_honour_are_refused(model_copy, option, message):
    config_path = model_copy / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **option}))
    assert_one_line_error(generate(model_copy, "--prompt", "p"), message)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--negative-prompt", "blurry"], "--negative-prompt is used only with true CFG"),
        (["--true-cfg-scale", "4"], "--true-cfg-scale needs a --negative-prompt"),
        (["--dtype", "int8"], "--dtype int8 is not supported"),
        (["--device", "banana"], "--device banana is not a device"),
        (["--device", "meta"], "--device meta: sgdiff runs on cpu, cuda or cuda:N"),
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


UNREACHABLE_HUB = "http://127.0.0.1:9"  # nothing listens on the discard port: connections are refused


def test_an_unreachable_hub_fails_at_once_and_names_the_demo_model_meant(tmp_path):
    """Not told it is offline, huggingface_hub retries for ~25 s before giving up: sgdiff sees that the
    Hub cannot be reached and asks the cache alone."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty"), "HF_ENDPOINT": UNREACHABLE_HUB}
    env = {k: v for k, v in env.items() if k not in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy")}
    start = time.perf_counter()
    result = run_cli("generate", "--model-path", "sgdiff/demo-imag", "--prompt", "p", env=env)
    assert time.perf_counter() - start < 15
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.strip().endswith(
        "is not in the local HF cache and the Hub cannot be reached (offline?): "
        "download it first or pass a local folder; did you mean sgdiff/demo-image?"
    )


def test_a_cached_repo_resolves_when_the_hub_cannot_be_reached(tiny_flux_dev, tmp_path):
    code = "import sys; from sgdiff.models.resolve import resolve_model_path; print(resolve_model_path(sys.argv[1]))"
    fake_hub_cache(tmp_path / "hf", "someone/cached", tiny_flux_dev)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": UNREACHABLE_HUB}
    env = {k: v for k, v in env.items() if k not in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy")}
    done = subprocess.run([sys.executable, "-c", code, "someone/cached"], env=env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (Path(done.stdout.strip()) / "model_index.json").is_file()


# the files of black-forest-labs/FLUX.1-dev, abridged: the two root checkpoints are 24 GB sgdiff never reads
FLUX_DEV_FILES = [
    "model_index.json", "flux1-dev.safetensors", "ae.safetensors", "README.md", "dev_grid.jpg",
    "scheduler/scheduler_config.json", "text_encoder/config.json", "text_encoder/model.safetensors",
    "text_encoder_2/config.json", "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.json", "tokenizer/merges.txt", "tokenizer/vocab.json",
    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer_2/spiece.model",
    "tokenizer_2/tokenizer.json", "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin",
]  # fmt: skip


def test_hub_download_fetches_only_the_named_components():
    from huggingface_hub.utils import filter_repo_objects

    from sgdiff.models.resolve import hub_patterns
    from sgdiff.testing.tiny_flux import make_pipeline

    index = {
        "_class_name": "FluxPipeline",
        **{k: list(v) for k, v in make_pipeline().config.items() if not k.startswith("_")},
    }
    fetched = set(filter_repo_objects(FLUX_DEV_FILES, allow_patterns=hub_patterns(index)))
    skipped = set(FLUX_DEV_FILES) - fetched
    assert skipped == {"flux1-dev.safetensors", "ae.safetensors", "README.md", "dev_grid.jpg",
                       "vae/diffusion_pytorch_model.bin"}  # fmt: skip


def test_local_looking_path_is_not_sent_to_the_hub(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"}
    result = run_cli("generate", "--model-path", "./models/flux", "--prompt", "p", env=env)
    assert result.returncode == 2
    assert "--model-path ./models/flux does not exist" in result.stderr


def test_a_tensor_of_the_wrong_shape_is_named_before_loading(model_copy):
    """Headers carry shapes: a tensor that does not fit the model built from config.json is refused with
    its file and name (exit 2), not as a raw size-mismatch RuntimeError."""
    from safetensors.torch import load_file, save_file

    shard = sorted((model_copy / "transformer").glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].flatten()[:-1].clone()  # one value short, and flat
    save_file(tensors, shard)
    result = generate(model_copy, "--prompt", "p")
    assert_one_line_error(result, f"{shard}: tensor {name} has shape [", after_progress=True)
    assert "FluxTransformer built from config.json needs" in result.output


@pytest.mark.parametrize("damage", ["truncated", "not a safetensors file"])
def test_a_broken_weight_file_is_named(model_copy, damage):
    vae = model_copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = vae.read_bytes()
    vae.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x07" * 64)
    assert_one_line_error(generate(model_copy, "--prompt", "p"), f"{vae}", after_progress=True)

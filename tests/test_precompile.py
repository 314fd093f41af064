"""--enable-torch-compile's default, blocks compiled ahead (sgdiff/speed/precompile.py): each block kind's
program gives the eager block's output, reads whichever weights its block holds, and a later process loads
it from the disk cache without importing the compiler; a kind that cannot be compiled ahead runs
torch.compile's graphs instead, and later processes go there without trying again."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sgdiff.config import RuntimeConfig, SpeedConfig
from sgdiff.engine.runner import ModelRunner
from sgdiff.models.attention import sdpa_attention
from sgdiff.speed import precompile
from sgdiff.speed.auto_attention import MeasuredAttention
from sgdiff.speed.compile import compile_blocks
from sgdiff.speed.precompile import (
    STATS,
    PrecompiledForward,
    Unexportable,
    input_key,
    not_precompilable,
    settings,
)
from sgdiff.testing.tiny_hunyuan_video import build_tiny_hunyuan_video
from sgdiff.testing.tiny_hunyuan_video15 import build_tiny_hunyuan_video15
from sgdiff.testing.tiny_qwen_image import build_tiny_qwen_image
from sgdiff.testing.tiny_wan import build_tiny_wan

REQUEST = dict(height=32, width=32, num_inference_steps=2)
CODE = "import sys, sgdiff; sgdiff.__version__ = sys.argv.pop(1); from sgdiff.cli.main import main; main()"


def loaded_runner(model: Path) -> ModelRunner:
    engine = ModelRunner(str(model), runtime=RuntimeConfig(device="cpu", dtype="fp32"))
    engine.load()
    return engine


def latents(engine: ModelRunner, prompt: str = "a red cube") -> torch.Tensor:
    return engine.generate(engine.sampling_params(prompt, **REQUEST)).latents


def kinds(model: torch.nn.Module) -> set:
    return {block.forward.kind for blocks in (model.transformer_blocks, model.single_transformer_blocks)
            for block in blocks}  # fmt: skip


@pytest.mark.slow
def test_programs_give_the_eager_output_and_read_the_weights_each_block_holds(tiny_flux_dev, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    engine = loaded_runner(tiny_flux_dev)
    model = engine.pipeline.transformers[0]
    reference, other_prompt = latents(engine), latents(engine, "a blue sphere")
    assert (other_prompt - reference).abs().max() > 1e-2  # (the model reacts to its prompt)
    built = STATS.built
    assert compile_blocks(model) == len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert all(isinstance(block.forward, PrecompiledForward) for block in model.single_transformer_blocks)
    assert (latents(engine) - reference).abs().max() < 1e-5
    assert STATS.built - built == 2  # one program per block kind, shared by every block of it
    assert len(list((tmp_path / "sgdiff" / "torch-compile").glob("*/ahead/*.pt2"))) == 2
    # weights changed in place (as a LoRA switch or offloading does): the program reads what the block holds
    with torch.no_grad():
        model.single_transformer_blocks[1].proj_out.weight.mul_(1.5)
    changed = latents(engine)
    assert (changed - reference).abs().max() > 1e-3
    for kind in kinds(model):
        kind.unexportable = "eager, for the reference"  # (a kind's way back: now the eager blocks)
        kind.just_in_time = lambda forward: forward
    assert (latents(engine) - changed).abs().max() < 1e-5
    assert STATS.built - built == 2  # nothing compiled again


def test_a_kind_that_cannot_be_compiled_ahead_runs_just_in_time_and_is_not_tried_again(
    tiny_flux_dev, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    engine = loaded_runner(tiny_flux_dev)
    model = engine.pipeline.transformers[0]
    reference = latents(engine)

    def fails(*args, **kwargs):
        raise RuntimeError("no C++ compiler here\nsecond line")

    monkeypatch.setattr(precompile, "build", fails)
    compile_blocks(model)
    for kind in kinds(model):
        kind.just_in_time = lambda forward: torch.compile(forward, backend="eager", dynamic=False)
    with caplog.at_level(logging.INFO, logger=precompile.__name__):
        assert (latents(engine) - reference).abs().max() < 1e-5
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and all("(RuntimeError: no C++ compiler here)" in m for m in warned), warned
    assert all("torch.compile compiles it at its first call instead" in m for m in warned)
    failed = list((tmp_path / "sgdiff" / "torch-compile").glob("*/ahead/*.failed"))
    assert len(failed) == 2 and failed[0].read_text() == "RuntimeError: no C++ compiler here\n"

    def must_not_run(*args, **kwargs):
        raise AssertionError("a kind that failed before was tried again")

    monkeypatch.setattr(precompile, "build", must_not_run)  # a later model (process): the kept failure decides
    engine = loaded_runner(tiny_flux_dev)
    compile_blocks(engine.pipeline.transformers[0])
    for kind in kinds(engine.pipeline.transformers[0]):
        kind.just_in_time = lambda forward: torch.compile(forward, backend="eager", dynamic=False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=precompile.__name__):
        assert (latents(engine) - reference).abs().max() < 1e-5
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # said once, by the first


def test_what_keeps_a_kind_from_being_compiled_ahead(tmp_path):
    assert not_precompilable(sdpa_attention) is None

    def ulysses(q, k, v):
        return q

    ulysses.alongside = lambda q, k, v, work: (q, work())  # type: ignore[attr-defined]
    assert "sequence parallelism" in not_precompilable(ulysses)
    assert "picked by timing" in not_precompilable(MeasuredAttention({"cudnn": sdpa_attention}, timer=lambda f: 1.0))
    assert input_key(None) is None and input_key(3) == 3
    assert input_key(torch.zeros(2, 3)) != input_key(torch.zeros(3, 2))  # another shape: another program
    assert input_key(torch.zeros(2, 3)) != input_key(torch.zeros(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="a list input"):
        input_key([torch.zeros(1)])
    # blocks of one class with another plain setting (a program takes it as a constant): another program
    assert settings(torch.nn.LayerNorm(4)) == settings(torch.nn.LayerNorm(4))
    assert settings(torch.nn.LayerNorm(4)) != settings(torch.nn.LayerNorm(4, eps=1e-3))
    block = torch.nn.Sequential(torch.nn.Linear(2, 2))
    block[0].cached = torch.zeros(2)  # a tensor outside the parameters and buffers: it would be baked in
    with pytest.raises(Unexportable, match=r"outside its parameters and buffers \(0\.cached\)"):
        precompile.build(tmp_path / "x.pt2", block, block.forward, (torch.zeros(1, 2),), {})
    assert not list(tmp_path.iterdir())


def generate(model: Path, tmp_path: Path, name: str, *flags: str, version: str = "test") -> dict:
    """A whole `sgdiff generate` process on the CPU; its perf dump."""
    perf = tmp_path / f"{name}.json"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    command = [sys.executable, "-c", CODE, version, "generate", "--model-path", str(model), "--prompt", "a red cube",
               "--device", "cpu", "--steps", "2", "--height", "64", "--width", "64", "--output-path",
               str(tmp_path / name), "--perf-dump-path", str(perf), "--quiet", *flags]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return json.loads(perf.read_text())


def image(tmp_path: Path, name: str) -> np.ndarray:
    (png,) = (tmp_path / name).glob("*.png")
    return np.asarray(Image.open(png)).astype(int)


@pytest.mark.slow
def test_a_second_process_loads_the_programs_without_the_compiler(tiny_flux_dev, tmp_path):
    eager = generate(tiny_flux_dev, tmp_path, "eager")
    assert "torch_compile_cache" not in eager["speed"]
    first = generate(tiny_flux_dev, tmp_path, "first", "--enable-torch-compile")["speed"]
    assert first["torch_compile_mode"] == "ahead"
    ahead = first["torch_compile_cache"]["ahead"]
    assert (ahead["built"], ahead["loaded"], ahead["just_in_time"]) == (2, 2, 0), ahead
    assert Path(ahead["folder"]).is_relative_to(tmp_path / "cache" / "sgdiff" / "torch-compile")
    second = generate(tiny_flux_dev, tmp_path, "second", "--enable-torch-compile")["speed"]["torch_compile_cache"]
    assert (second["ahead"]["built"], second["ahead"]["loaded"]) == (0, 2), second
    assert second["compiler_imported"] is False  # neither Dynamo nor inductor: nothing traced or compiled
    assert np.abs(image(tmp_path, "second") - image(tmp_path, "eager")).max() <= 1
    other = generate(tiny_flux_dev, tmp_path, "other", "--enable-torch-compile", version="other")["speed"]
    assert other["torch_compile_cache"]["ahead"]["built"] == 2  # another sgdiff: its own folder, compiled anew
    assert "other" in Path(other["torch_compile_cache"]["ahead"]["folder"]).parent.name


VIDEO = dict(height=32, width=32, num_frames=5)
FAMILIES = {  # a tiny checkpoint's builder; a small request of the family
    "wan": (build_tiny_wan, VIDEO),
    "qwen-image": (build_tiny_qwen_image, dict(height=32, width=32)),
    "hunyuanvideo": (build_tiny_hunyuan_video, VIDEO),
    "hunyuanvideo-1.5": (build_tiny_hunyuan_video15, VIDEO),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_blocks_of_every_family_compile_ahead(family, tmp_path, monkeypatch):
    """Each family's block kinds export and compile ahead (none falls back), with the eager latents."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    build, request = FAMILIES[family]
    folder = build(tmp_path / family)

    def run(speed: SpeedConfig) -> torch.Tensor:
        engine = ModelRunner(str(folder), runtime=RuntimeConfig(device="cpu", dtype="fp32", speed=speed))
        engine.load()
        return engine.generate(engine.sampling_params("a red cube", num_inference_steps=2, **request)).latents

    reference = run(SpeedConfig())
    built, fell_back = STATS.built, STATS.just_in_time
    compiled = run(SpeedConfig(torch_compile=True))
    assert STATS.built > built and STATS.just_in_time == fell_back
    assert (compiled - reference).abs().max() <= 1e-5 * max(1.0, reference.abs().max().item())

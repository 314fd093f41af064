"""Adding a model family touches no generic file: a toy family, written and registered in this test,
loads its own diffusers-format folder and runs through the real CLI (a sampling field of its own set
by a preset, its rules, progress, the PNG written) and the engine (cancel). Generic code names no
family's field; library errors name fields, which the CLI spells as flags."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.config import RuntimeConfig
from sgdiff.engine.handle import RequestStatus
from sgdiff.engine.service import Engine
from sgdiff.errors import UserError
from sgdiff.pipeline.base import ComposedPipeline, ParallelMode, Stage, State
from sgdiff.pipeline.family import ModelFamily
from sgdiff.pipeline.registry import register_family, unregister_family
from sgdiff.pipeline.schedule import FlowMatchSchedule
from sgdiff.pipeline.stages.denoising import DenoisingStage
from sgdiff.pipeline.stages.latents import LatentsStage
from sgdiff.pipeline.stages.timesteps import FlowMatchTimestepsStage
from sgdiff.pipeline.stages.validation import InputValidationStage
from sgdiff.sampling import SamplingParams, checked

ROOT = Path(__file__).resolve().parents[1]
CHANNELS, PATCH = 4, 8  # toy latents: 4 channels, one per 8x8 pixels


@dataclass(frozen=True)
class ToySampling(SamplingParams):
    brightness: float = checked(1.0, lambda v: 0 < v <= 1, "must be in (0, 1]")


class ToyPromptStage(Stage):
    """The prompt's characters as a [1, C] vector (a stand-in for a text encoder)."""

    name = "text_encoding"
    parallel = ParallelMode.ALL_RANKS

    def run(self, state: State) -> None:
        codes = torch.tensor([float(ord(c)) for c in state.params.prompt])
        text = torch.stack([torch.cos(codes * (k + 1) / 7).mean() for k in range(CHANNELS)])[None]  # [1, C]
        state.cond = {"text": text.repeat(state.params.num_outputs_per_prompt, 1)}  # [N, C]


class ToyDecodeStage(Stage):
    name = "decoding"
    parallel = ParallelMode.RANK0_ONLY

    def run(self, state: State) -> None:
        rgb = torch.sigmoid(state.latents[:, :3]) * state.params.brightness  # [N, 3, h, w]
        pixels = rgb.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3).permute(0, 2, 3, 1)  # [N, H, W, 3]
        state.images = (pixels * 255).round().to(torch.uint8).numpy()


class ToyFamily(ModelFamily):
    name = "toy"
    pipeline_classes = ("ToyPipeline",)
    sampling = ToySampling

    def schedule(self, options):
        return FlowMatchSchedule.from_dict(options)

    def rules(self, info):
        def small_enough(params: ToySampling) -> None:
            if params.height > 64:
                raise UserError("`height` must be at most 64 for a toy", field="height")

        return [small_enough]

    def __init__(self):
        self.before_velocity = lambda: None  # a test's hook

    def load(self, model_dir, device, dtype, schedule, events, skip, ahead=()) -> ComposedPipeline:
        # (`ahead`: its prompt stage is a lookup, nothing worth encoding while loading)
        weight = load_file(model_dir / "transformer" / "diffusion_pytorch_model.safetensors")["weight"]  # [C, C]

        def velocity(latents, t, inputs, state):  # latents [N, C, h, w]
            self.before_velocity()
            return torch.einsum("dc,nchw->ndhw", weight, latents) + inputs["text"][:, :, None, None]

        def noise_shape(params):
            return (params.num_outputs_per_prompt, CHANNELS, params.height // PATCH, params.width // PATCH)

        stages = [
            InputValidationStage(self.rules(None)),
            ToyPromptStage(),
            FlowMatchTimestepsStage(schedule, lambda params: 256),
            LatentsStage(noise_shape, lambda noise, params: (noise, {})),
            DenoisingStage(velocity),
            ToyDecodeStage(),
        ]
        return ComposedPipeline("toy", stages)


@pytest.fixture
def toy_model(tmp_path):
    """A toy checkpoint in diffusers' layout, and the toy family registered while the test runs."""
    folder = tmp_path / "toy"
    (folder / "transformer").mkdir(parents=True)
    index = {"_class_name": "ToyPipeline", "transformer": ["sgdiff_toy", "ToyTransformer"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "transformer" / "config.json").write_text("{}")
    weight = torch.eye(CHANNELS) * -0.8 + 0.3 * torch.randn(
        CHANNELS, CHANNELS, generator=torch.Generator().manual_seed(0)
    )
    save_file({"weight": weight}, folder / "transformer" / "diffusion_pytorch_model.safetensors")
    family = register_family(ToyFamily())
    yield folder, family
    unregister_family(family)


def generate(toy_model: Path, out: Path, *args: str):
    flags = ["--model-path", str(toy_model), "--device", "cpu", "--height", "32", "--width", "48", "--steps", "4"]
    return CliRunner().invoke(app, ["generate", *flags, "--output-path", str(out), *args])


def test_a_family_registered_from_here_runs_through_the_cli(toy_model, tmp_path):
    toy_model, _ = toy_model
    preset = tmp_path / "dim.toml"
    preset.write_text("[sampling]\nbrightness = 0.5\n")
    bright = generate(toy_model, tmp_path / "out", "--prompt", "a red cube", "--output-file-name", "bright")
    assert bright.exit_code == 0, bright.output
    dim = generate(
        toy_model, tmp_path / "out", "--prompt", "a red cube", "--output-file-name", "dim", "--preset", str(preset)
    )
    assert dim.exit_code == 0, dim.output
    other = generate(toy_model, tmp_path / "out", "--prompt", "a blue sphere", "--output-file-name", "other")
    assert other.exit_code == 0, other.output
    bright_image, dim_image = (iio.imread(tmp_path / "out" / f"{name}.png") for name in ("bright", "dim"))
    assert bright_image.shape == (32, 48, 3) and bright_image.std() > 5
    assert np.abs(dim_image.astype(int) - np.round(bright_image / 2).astype(int)).max() <= 1  # the preset's field
    other_image = iio.imread(tmp_path / "out" / "other.png")
    assert np.abs(other_image.astype(int) - bright_image.astype(int)).max() > 20  # the prompt matters
    with Engine(str(toy_model), runtime=RuntimeConfig(device="cpu")) as engine:  # the CLI wrote what it computes
        result = engine.submit("a red cube", height=32, width=48, num_inference_steps=4).result()
    assert np.array_equal(result.images[0], bright_image)


def test_a_family_has_its_own_fields_and_rules(toy_model, tmp_path):
    toy_model, _ = toy_model
    preset = tmp_path / "bad.toml"
    preset.write_text("[sampling]\nbrightness = 2.0\n")
    cases = [
        (["--preset", str(preset)], "error: --brightness must be in (0, 1], got 2.0"),
        (["--true-cfg-scale", "2"], "error: --true-cfg-scale does not apply to ToyPipeline (an image model)"),
        (["--height", "80"], "error: --height must be at most 64 for a toy"),
    ]
    for args, message in cases:
        result = generate(toy_model, tmp_path / "out", "--prompt", "p", *args)
        assert result.exit_code == 2 and result.output.strip() == message, result.output


def test_a_family_from_here_is_served_by_the_engine_and_cancels(toy_model, step_gate):
    toy_model, family = toy_model
    family.before_velocity = gate = step_gate(at=4)
    with Engine(str(toy_model), runtime=RuntimeConfig(device="cpu")) as engine:
        handle = engine.submit("a red cube", height=16, width=16, num_inference_steps=50)
        assert gate.reached.wait(30)
        handle.cancel()  # during step 4: it ends after it
        gate.released.set()
        assert handle.wait(30) and handle.status is RequestStatus.CANCELLED and handle.progress == (4, 50)
        with pytest.raises(UserError) as caught:
            engine.submit("a red cube", brightness=0.0)
    assert caught.value.field == "brightness" and str(caught.value) == "brightness must be in (0, 1], got 0.0"


# the CLI, an edge, spells flags: it is not among them
GENERIC = ["engine", "pipeline", "parallel", "speed", "sampling.py", "config.py", "io/outputs.py"]
FAMILY_FIELDS = ["true_cfg_scale", "guidance_scale_2", "num_frames", "image_path", "flow_shift", "dmd_timesteps"]


def test_generic_code_names_no_familys_field():
    for place in GENERIC:
        path = ROOT / "sgdiff" / place
        for source in [path] if path.is_file() else sorted(path.rglob("*.py")):
            text = source.read_text()
            named = [name for name in FAMILY_FIELDS if re.search(rf"\b{name}\b", text)]
            assert not named, f"{source.relative_to(ROOT)} names {named}"

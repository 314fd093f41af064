"""`POST /v1/images/edits` for a model that takes an image, before a real edit model lands: a toy
edit family registered here (its output tinted by the uploaded image), served by the real app in
this process and called with the real `openai` client's images.edit."""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass

import numpy as np
import openai
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sgdiff.config import RuntimeConfig
from sgdiff.engine.service import Engine
from sgdiff.io.input_image import load_image
from sgdiff.pipeline.base import ComposedPipeline, Stage, State
from sgdiff.pipeline.family import ModelFamily
from sgdiff.pipeline.registry import register_family, unregister_family
from sgdiff.pipeline.schedule import FlowMatchSchedule
from sgdiff.pipeline.stages.denoising import DenoisingStage
from sgdiff.pipeline.stages.latents import LatentsStage
from sgdiff.pipeline.stages.timesteps import FlowMatchTimestepsStage
from sgdiff.sampling import SamplingParams
from sgdiff.testing.server import served_in_thread

PATCH = 8


@dataclass(frozen=True)
class EditSampling(SamplingParams):
    image_path: str | None = None  # the image to edit


class EditInputsStage(Stage):
    """The prompt's characters and the image's mean colour as [N, 3] (stand-ins for the encoders)."""

    name = "text_encoding"

    def run(self, state: State) -> None:
        params = state.params
        codes = torch.tensor([float(ord(c)) for c in params.prompt])
        text = torch.stack([torch.cos(codes * (k + 1) / 7).mean() for k in range(3)])  # [3]
        colour = torch.tensor(np.asarray(load_image(params.image_path, state.inputs)), dtype=torch.float32)
        colour = colour.mean(dim=(0, 1)) / 127.5 - 1  # [3]
        state.cond = {"condition": (text + 2 * colour)[None].repeat(params.num_outputs_per_prompt, 1)}  # [N, 3]


class EditDecodeStage(Stage):
    name = "decoding"

    def run(self, state: State) -> None:
        rgb = torch.sigmoid(state.latents)  # [N, 3, h, w]
        pixels = rgb.repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3).permute(0, 2, 3, 1)  # [N, H, W, 3]
        state.images = (pixels * 255).round().to(torch.uint8).numpy()


class EditFamily(ModelFamily):
    name = "toy-edit"
    pipeline_classes = ("ToyEditPipeline",)
    sampling = EditSampling

    def schedule(self, options):
        return FlowMatchSchedule.from_dict(options)

    def input_images(self, params):
        return [params.image_path] if params.image_path is not None else []

    def rules(self, info):
        def needs_an_image(params) -> None:
            if params.image_path is None:
                from sgdiff.errors import UserError

                raise UserError("this edit model needs `image_path`", field="image_path")

        return [needs_an_image]

    def load(self, model_dir, device, dtype, schedule, events, skip, ahead=()) -> ComposedPipeline:
        def velocity(latents, t, inputs, state):  # latents [N, 3, h, w]
            return -latents + inputs["condition"][:, :, None, None]

        def noise_shape(params):
            return (params.num_outputs_per_prompt, 3, params.height // PATCH, params.width // PATCH)

        stages = [
            EditInputsStage(),
            FlowMatchTimestepsStage(schedule, lambda params: 256),
            LatentsStage(noise_shape, lambda noise, params: (noise, {})),
            DenoisingStage(velocity),
            EditDecodeStage(),
        ]
        return ComposedPipeline("toy-edit", stages)


@pytest.fixture
def edit_server(tmp_path):
    """The toy edit model's folder, an engine over it, and the real app on a free port (a thread here)."""
    folder = tmp_path / "toy-edit"
    (folder / "transformer").mkdir(parents=True)
    index = {"_class_name": "ToyEditPipeline", "transformer": ["sgdiff_toy", "ToyTransformer"]}
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "transformer" / "config.json").write_text("{}")
    save_file({"weight": torch.ones(1)}, folder / "transformer" / "diffusion_pytorch_model.safetensors")  # unused
    family = register_family(EditFamily())
    engine = Engine(str(folder), runtime=RuntimeConfig(device="cpu"))
    try:
        with served_in_thread(engine, tmp_path / "state", str(folder)) as url:
            yield folder, engine, openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    finally:
        unregister_family(family)


def png(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 24), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_images_edit_runs_the_uploaded_image_through_the_model(edit_server, tmp_path):
    folder, engine, client = edit_server
    fields = {"seed": 3, "num_inference_steps": 4}
    answers = {
        colour: client.images.edit(
            image=(f"{colour}.png", png(colour), "image/png"), prompt="make it glow", size="32x32", extra_body=fields
        )  # fmt: skip
        for colour in ("red", "blue")
    }
    red, blue = (np.asarray(Image.open(io.BytesIO(base64.b64decode(answers[c].data[0].b64_json)))) for c in answers)
    assert red.shape == (32, 32, 3) and np.abs(red.astype(int) - blue.astype(int)).max() > 20  # the image matters
    (tmp_path / "red.png").write_bytes(png("red"))
    direct = engine.submit("make it glow", image_path=str(tmp_path / "red.png"), height=32, width=32, **fields)
    assert np.array_equal(red, direct.result().images[0])  # what the engine makes of that very image
    with pytest.raises(openai.BadRequestError) as not_an_image:
        client.images.edit(image=("a.png", b"not an image", "image/png"), prompt="x")
    assert not_an_image.value.body["param"] == "image"
    assert not list((tmp_path / "state" / "images").glob("input_*"))  # uploads are not kept


def test_images_generations_on_an_edit_model_names_the_missing_image(edit_server):
    _, _, client = edit_server
    with pytest.raises(openai.BadRequestError) as missing:
        client.images.generate(prompt="x", size="32x32")
    assert missing.value.body["param"] == "image_path" and "needs" in missing.value.body["message"]

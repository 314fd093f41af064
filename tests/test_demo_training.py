"""scripts/train_demo.py's code on the CPU: a few steps of each phase, then the saved folder loads and
generates through sgdiff like any checkpoint."""

from __future__ import annotations

import json
import math
import time

import torch

from sgdiff.demo.render import SceneTable, render_table
from sgdiff.demo.scenes import HELD_OUT, evaluation_scenes, sample_training_scene
from sgdiff.demo.train.image import ImageTraining, train_image_model
from sgdiff.demo.train.loop import make_optimizer
from sgdiff.demo.train.video import VideoTraining, train_video_model
from sgdiff.engine.runner import ModelRunner

FEW = {"vae_steps": 2, "vae_batch": 2, "transformer_steps": 2, "batch": 2, "pool": 16}


def test_training_never_sees_held_out_combinations():
    import numpy as np

    rng = np.random.default_rng(0)
    for clip in (False, True):
        scenes = [sample_training_scene(rng, clip) for _ in range(2000)]
        seen = {(o.kind, o.colour, s.background) for s in scenes for o in s.objects}
        assert not seen & HELD_OUT
        assert {(o.kind, o.colour, s.background) for s in evaluation_scenes(clip) for o in s.objects} == HELD_OUT


def test_rendering_a_batch_equals_rendering_each_scene():
    import numpy as np

    rng = np.random.default_rng(1)
    scenes = [sample_training_scene(rng, clip=True) for _ in range(6)]
    batch = render_table(SceneTable.of(scenes), 32, 5)
    for index, scene in enumerate(scenes):
        assert torch.equal(batch[index], render_table(SceneTable.of([scene]), 32, 5)[0])
    assert not torch.equal(batch[0, 0], batch[0, -1])  # the object moved


def test_learning_rate_warms_up_then_anneals_by_steps_or_time():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer, schedule = make_optimizer([param], lr=1.0, steps=1000)
    schedule.set(0)
    assert math.isclose(optimizer.param_groups[0]["lr"], 1 / 300)
    schedule.set(999)
    assert math.isclose(optimizer.param_groups[0]["lr"], 0.1, rel_tol=1e-3)
    optimizer, schedule = make_optimizer([param], lr=1.0, steps=10**6, deadline=time.monotonic() - 1)
    schedule.set(400)  # the deadline has passed: fully annealed although few steps ran
    assert math.isclose(optimizer.param_groups[0]["lr"], 0.1, rel_tol=1e-3)


def test_image_training_saves_a_flux_pipeline_sgdiff_loads(tmp_path):
    record = train_image_model(tmp_path / "image", ImageTraining(**FEW), torch.device("cpu"), math.inf)
    assert record["transformer_steps"] == 2
    vae_config = json.loads((tmp_path / "image" / "vae" / "config.json").read_text())
    assert vae_config["scaling_factor"] != 0.18215  # measured on the training latents, not the default
    engine = ModelRunner(str(tmp_path / "image"))
    assert engine.preset.name == "demo-image"
    image = engine.generate(engine.sampling_params("a red circle", num_inference_steps=2)).images[0]
    assert image.shape == (128, 128, 3)


def test_video_training_saves_a_wan_pipeline_sgdiff_loads(tmp_path):
    train_video_model(tmp_path / "video", VideoTraining(**FEW), torch.device("cpu"), math.inf)
    vae_config = json.loads((tmp_path / "video" / "vae" / "config.json").read_text())
    assert any(value != 0.0 for value in vae_config["latents_mean"])
    engine = ModelRunner(str(tmp_path / "video"))
    assert engine.preset.name == "demo-video"
    video = engine.generate(engine.sampling_params("a red circle moving up", num_inference_steps=2)).videos[0]
    assert video.shape == (9, 64, 64, 3)


def test_a_trained_vae_can_be_reused(tmp_path):
    first = tmp_path / "first"
    train_video_model(first, VideoTraining(**FEW), torch.device("cpu"), math.inf)
    record = train_video_model(tmp_path / "second", VideoTraining(**FEW), torch.device("cpu"), math.inf, first / "vae")
    assert record["vae_steps"] == f"reused from {first / 'vae'}"
    before = (first / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert (tmp_path / "second" / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == before

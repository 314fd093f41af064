"""FastWan's few-step DMD sampling, against a plain reference written here from the published
algorithm (FastVideo's DMD denoising): diffusers has no pipeline for it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.io.video import read_png_frames

runner = CliRunner()
DMD_TIMESTEPS = [1000, 757, 522]
SHIFT = 8.0


def reference_dmd_video(model_dir, prompt: str, seed: int, height: int, width: int, frames: int) -> np.ndarray:
    """x_T ~ N(0, I); at each timestep t: x0 = x_t - sigma(t) * v(x_t, t); then x = (1 - s') x0 + s' eps
    with fresh eps and s' the next timestep's sigma; the last x0 is decoded. sigma(t) is the sigma of
    the nearest timestep of the shifted (shift 8) 1000-step flow-matching grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    pipe = WanPipeline.from_pretrained(model_dir, dtype=torch.float32)
    prompt_embeds, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=512)
    grid = FlowMatchEulerDiscreteScheduler(shift=SHIFT)

    def sigma(t: int) -> float:
        return float(grid.sigmas[torch.argmin((grid.timesteps - t).abs())])

    generator = torch.Generator("cpu").manual_seed(seed)
    shape = (1, pipe.vae.config.z_dim, (frames - 1) // 4 + 1, height // 8, width // 8)
    latents = torch.randn(shape, generator=generator)
    with torch.no_grad():
        for i, t in enumerate(DMD_TIMESTEPS):
            velocity = pipe.transformer(latents, torch.tensor([t]), prompt_embeds, return_dict=False)[0]
            clean = latents - sigma(t) * velocity
            if i == len(DMD_TIMESTEPS) - 1:
                latents = clean
            else:
                s_next = sigma(DMD_TIMESTEPS[i + 1])
                latents = (1 - s_next) * clean + s_next * torch.randn(shape, generator=generator)
        config = pipe.vae.config
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
        video = pipe.vae.decode(latents * std + mean, return_dict=False)[0]  # [1, 3, T, H, W]
    frames_01 = (video[0] / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0).numpy()
    return (frames_01 * 255).round().astype(np.uint8)


def test_fastwan_matches_the_published_dmd_algorithm(tiny_wan, tmp_path):
    model = tiny_wan("t2v")
    flags = "--preset fastwan2.1-t2v-1.3b --height 32 --width 48 --num-frames 9 --seed 6 --output-format png"
    args = ["generate", "--model-path", str(model), "--prompt", "a red cube", *flags.split(), "--output-path",
            str(tmp_path), "--output-file-name", "v", "--perf-dump-path", str(tmp_path / "p.json")]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    actual = read_png_frames(tmp_path / "v")
    expected = reference_dmd_video(model, "a red cube", seed=6, height=32, width=48, frames=9)
    assert actual.shape == expected.shape == (9, 32, 48, 3) and actual.std() > 1
    assert np.abs(actual.astype(int) - expected.astype(int)).max() <= 2
    import json

    assert len(json.loads((tmp_path / "p.json").read_text())["requests"][0]["step_seconds"]) == 3  # 3 steps, no CFG


def test_fastwan_preset_defaults():
    from sgdiff.config import load_preset, select_preset
    from sgdiff.families.wan.sampling import WanSampling
    from sgdiff.sampling import build_sampling_params

    preset = select_preset(None, "FastVideo/FastWan2.1-T2V-1.3B-Diffusers", "WanPipeline", {}, {})
    params = build_sampling_params(WanSampling, "p", preset, {})
    assert (params.height, params.width, params.num_frames) == (448, 832, 61)
    assert (params.sampler, params.dmd_timesteps, params.flow_shift, params.num_inference_steps) == (
        "dmd", (1000, 757, 522), 8.0, 3)  # fmt: skip
    assert load_preset("fastwan2.1-t2v-1.3b").name == preset.name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "4"], "DMD sampling runs exactly 3 steps (timesteps 1000, 757, 522): drop --num-inference-steps"),
        (["--guidance-scale", "3"], "DMD sampling (FastWan) runs without CFG"),
    ],
)
def test_fastwan_refuses_what_dmd_cannot_do(tiny_wan, args, message):
    flags = "--preset fastwan2.1-t2v-1.3b --prompt p --height 32 --width 32 --no-save-output".split()
    result = runner.invoke(app, ["generate", "--model-path", str(tiny_wan("t2v")), *flags, *args])
    assert result.exit_code == 2 and message in result.stderr

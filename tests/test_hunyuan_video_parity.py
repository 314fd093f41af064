"""Whole videos: `sgdiff generate --output-format png` writes the frames diffusers' HunyuanVideoPipeline makes
with the same weights, prompt, size, frames, steps, embedded guidance, true CFG and CPU-generator seed (fp32,
max abs diff <= 2/255), on a tiny random checkpoint (sgdiff/testing/tiny_hunyuan_video.py); and the parts that
decide them (text embeddings, sigmas, preset) checked on their own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.config import RuntimeConfig, load_preset, select_preset
from sgdiff.engine.runner import ModelRunner
from sgdiff.families.hunyuan_video.schedule import hunyuan_video_schedule, hunyuan_video_sigmas
from sgdiff.families.hunyuan_video.text import CROP_START, PROMPT_TEMPLATE
from sgdiff.io.image import read_png_parameters
from sgdiff.io.video import read_png_frames
from sgdiff.testing.compare import relative_error
from sgdiff.testing.tiny_hunyuan_video import HUNYUAN_VIDEO_SCHEDULER_CONFIG, build_tiny_hunyuan_video

runner = CliRunner()
MAX_PIXEL_DIFF = 2  # of 255
CPU = RuntimeConfig(device="cpu")
SMALL = dict(height=32, width=48, num_frames=5)
SMALL_FLAGS = ["--height", "32", "--width", "48", "--num-frames", "5", "--output-format", "png"]


@pytest.fixture(scope="module")
def tiny_hunyuan(tmp_path_factory) -> Path:
    return build_tiny_hunyuan_video(tmp_path_factory.mktemp("hunyuan-video") / "tiny")


@pytest.fixture(scope="module")
def reference(tiny_hunyuan) -> HunyuanVideoPipeline:
    pipe = HunyuanVideoPipeline.from_pretrained(tiny_hunyuan, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(model, out_dir, *args: str) -> list[Path]:
    """The frame folders `sgdiff generate` wrote, in order."""
    result = runner.invoke(app, ["generate", "--model-path", str(model), "--output-path", str(out_dir), "-q", *args])
    assert result.exit_code == 0, result.output
    return [Path(line) for line in result.stdout.splitlines() if line]


def diffusers_frames(pipe: HunyuanVideoPipeline, seed: int, **kwargs) -> np.ndarray:
    frames = pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).frames
    return (frames * 255).round().astype(np.uint8)  # [N, T, H, W, 3], what diffusers' PIL frames hold


def max_frame_diff(folders: list[Path], expected: np.ndarray) -> int:
    assert len(folders) == len(expected)
    worst = 0
    for folder, reference in zip(folders, expected, strict=True):
        actual = read_png_frames(folder)
        assert actual.shape == reference.shape and actual.std() > 1  # a decoded video, not a constant
        worst = max(worst, int(np.abs(actual.astype(int) - reference.astype(int)).max()))
    return worst


def test_default_embedded_guidance_matches_diffusers(tiny_hunyuan, reference, tmp_path):
    """The preset's guidance 6 (diffusers' default), embedded: one forward a step."""
    folders = generate(tiny_hunyuan, tmp_path, "--prompt", "a red cube", *SMALL_FLAGS, "--steps", "3", "--seed", "3")
    expected = diffusers_frames(reference, seed=3, prompt="a red cube", num_inference_steps=3, **SMALL)
    assert max_frame_diff(folders, expected) <= MAX_PIXEL_DIFF  # observed 0
    params = read_png_parameters(folders[0] / "frame_00000.png")
    summary = (params["guidance_scale"], params["fps"], params["num_frames"], params["preset"])
    assert summary == (6.0, 24, 5, "hunyuanvideo")


def test_two_prompts_with_two_outputs_each_match_diffusers(tiny_hunyuan, reference, tmp_path):
    """Prompts of unequal token counts, each its own request (same seed); a guidance scale of its own."""
    prompts = ["a red cube", "a blue sphere on the table"]
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    flags = [*SMALL_FLAGS, "--steps", "2", "--seed", "5", "--num-outputs-per-prompt", "2", "--guidance-scale", "3.5"]
    folders = generate(tiny_hunyuan, tmp_path / "out", "--prompt-file", str(prompt_file), *flags)
    expected = np.concatenate([
        diffusers_frames(reference, seed=5, prompt=prompt, num_inference_steps=2, num_videos_per_prompt=2,
                         guidance_scale=3.5, **SMALL)
        for prompt in prompts
    ])  # fmt: skip
    assert not np.array_equal(expected[0], expected[1])  # two samples from one generator
    assert max_frame_diff(folders, expected) <= MAX_PIXEL_DIFF  # observed 1


def test_true_cfg_with_a_negative_prompt_matches_diffusers(tiny_hunyuan, reference, tmp_path):
    """The negative prompt (1 word) is shorter than the prompt (3): each branch its own forward."""
    flags = [*SMALL_FLAGS, "--steps", "2", "--seed", "7", "--negative-prompt", "blurry", "--true-cfg-scale", "4"]
    folders = generate(tiny_hunyuan, tmp_path, "--prompt", "a red cube", *flags)
    expected = diffusers_frames(
        reference, seed=7, prompt="a red cube", negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=2,
        **SMALL,
    )  # fmt: skip
    plain = diffusers_frames(reference, seed=7, prompt="a red cube", num_inference_steps=2, **SMALL)
    assert np.abs(expected.astype(int) - plain.astype(int)).max() > 20 * MAX_PIXEL_DIFF  # CFG changes the video
    assert max_frame_diff(folders, expected) <= MAX_PIXEL_DIFF  # observed 1


def test_a_one_word_change_moves_the_video_far_beyond_the_tolerance(tiny_hunyuan, tmp_path):
    flags = [*SMALL_FLAGS, "--steps", "2", "--seed", "3"]
    red = read_png_frames(generate(tiny_hunyuan, tmp_path / "red", "--prompt", "a red cube", *flags)[0])
    blue = read_png_frames(generate(tiny_hunyuan, tmp_path / "blue", "--prompt", "a blue cube", *flags)[0])
    assert np.abs(red.astype(int) - blue.astype(int)).max() > 20 * MAX_PIXEL_DIFF  # observed 167 (mean 17)


@pytest.mark.parametrize(("prompt", "max_sequence_length"), [("a red cube", 256), ("a blue sphere on the table", 3)])
def test_text_embeddings_are_diffusers_own(tiny_hunyuan, reference, prompt, max_sequence_length):
    """The template cut at crop_start (its system part, as with Llama 3's tokenizer), the layer two before the
    last, the length cut; diffusers' padded tokens masked = sgdiff's prompt cut to its own tokens."""
    ids = reference.tokenizer([PROMPT_TEMPLATE.format(prompt)]).input_ids[0]
    user_turn = reference.tokenizer.convert_ids_to_tokens(ids[CROP_START - 3 : CROP_START + 2])
    assert user_turn == ["user", "<|end_header_id|>", "ĊĊ", "a", "Ġred" if "red" in prompt else "Ġblue"]
    runner = ModelRunner(str(tiny_hunyuan), runtime=CPU)
    runner.load()
    stage = next(stage for stage in runner.pipeline.stages if stage.name == "text_encoding")
    params = runner.sampling_params(prompt, max_sequence_length=max_sequence_length)
    with torch.no_grad():
        ours = stage.encode([prompt], params)
        embeds, pooled, mask = reference.encode_prompt(prompt, max_sequence_length=max_sequence_length)
    theirs = embeds[:, mask[0].bool()]  # [1, valid tokens, D]
    assert ours["encoder_hidden_states"].shape == theirs.shape
    # padded to 95 + 256 tokens in diffusers, not here: equal up to the attention's float rounding
    assert relative_error(ours["encoder_hidden_states"], theirs) < 1e-6
    assert torch.equal(ours["pooled_projections"], pooled)


@pytest.mark.parametrize("steps", [50, 30, 3, 2, 1])
def test_sigmas_match_diffusers_bit_for_bit(steps):
    scheduler = FlowMatchEulerDiscreteScheduler(**HUNYUAN_VIDEO_SCHEDULER_CONFIG)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])  # as HunyuanVideoPipeline asks
    ours = hunyuan_video_sigmas(steps, hunyuan_video_schedule(HUNYUAN_VIDEO_SCHEDULER_CONFIG))
    assert torch.equal(ours, scheduler.sigmas)
    assert torch.equal(ours[:-1] * 1000, scheduler.timesteps)


def test_the_preset_carries_diffusers_defaults(tiny_hunyuan):
    model = ModelRunner(str(tiny_hunyuan), runtime=CPU)
    assert model.preset is not None and model.preset.name == "hunyuanvideo"  # matched by the pipeline class
    params = model.sampling_params("a cube")
    defaults = (params.height, params.width, params.num_frames, params.num_inference_steps, params.guidance_scale)
    assert defaults == (720, 1280, 129, 50, 6.0)
    assert (params.fps, params.max_sequence_length, params.true_cfg_scale) == (24, 256, 1.0)
    assert model.family.cfg_scale_of(params) is None  # no negative prompt: no true CFG, as diffusers
    assert select_preset(None, "hunyuanvideo-community/HunyuanVideo", "HunyuanVideoPipeline", {}).name == (
        "hunyuanvideo"
    )
    preset = hunyuan_video_schedule(load_preset("hunyuanvideo").schedule)
    assert preset == hunyuan_video_schedule(HUNYUAN_VIDEO_SCHEDULER_CONFIG)


def test_prompts_encoded_while_loading_give_the_same_video(tiny_hunyuan):
    """encode_ahead: the request's prompt and negative prompt come from the load, with the same result."""
    fields = dict(prompt="a red cube", negative_prompt="blurry", true_cfg_scale=3.0, num_inference_steps=2, **SMALL)
    ahead = ModelRunner(str(tiny_hunyuan), runtime=CPU)
    ahead.load(encode_ahead=[ahead.sampling_params(**fields)])
    stage = next(stage for stage in ahead.pipeline.stages if stage.name == "text_encoding")
    assert set(stage.encoded) == {("a red cube", 256), ("blurry", 256)}
    result = ahead.generate(ahead.sampling_params(**fields))
    assert stage.encoded == {}  # each used once
    plain = ModelRunner(str(tiny_hunyuan), runtime=CPU)
    assert torch.equal(result.latents, plain.generate(plain.sampling_params(**fields)).latents)


def test_fused_projections_and_gelu_run_fewer_gemms_for_the_same_video(tiny_hunyuan):
    """The family's fusable groups reach the model: q/k/v as one GEMM each (refiner, both streams, single
    blocks), the MLPs' GELU inside their GEMM; the latents as without them."""
    from torch.profiler import ProfilerActivity, profile

    from sgdiff.config import SpeedConfig

    def run(speed: SpeedConfig) -> tuple[torch.Tensor, dict]:
        model = ModelRunner(str(tiny_hunyuan), runtime=RuntimeConfig(device="cpu", dtype="fp32", speed=speed))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            latents = model.generate(model.sampling_params("a red cube", num_inference_steps=2, **SMALL)).latents
        return latents, {e.key: e.count for e in prof.key_averages()}

    plain, plain_ops = run(SpeedConfig())
    fused, fused_ops = run(SpeedConfig(fused_projections=True, fused_gelu=True))
    # per step: 2 refiner blocks' q/k/v (3 -> 1), 2 dual blocks' 2 streams (6 -> 2), 2 single blocks' (3 -> 1)
    assert plain_ops["aten::linear"] - fused_ops["aten::linear"] >= 2 * (2 * 2 + 2 * 4 + 2 * 2)
    assert fused_ops["aten::gelu_"] == 2 * (2 * 2 + 2)  # per step: the dual blocks' 2 MLPs, the single blocks' 1
    assert (fused - plain).abs().max() < 1e-4

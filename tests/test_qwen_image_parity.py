"""Whole images: `sgdiff generate` writes the PNGs that diffusers' QwenImagePipeline makes with the same
weights, prompt, negative prompt, size, steps, true CFG scale and CPU-generator seed (fp32, max abs diff
<= 2/255), on a tiny random checkpoint (sgdiff/testing/tiny_qwen_image.py); and the parts that decide
them (text embeddings, sigmas, request rules, preset) checked on their own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.config import RuntimeConfig, load_preset, select_preset
from sgdiff.engine.runner import ModelRunner
from sgdiff.errors import UserError
from sgdiff.families.qwen_image.sampling import QwenImageSampling, qwen_image_rules
from sgdiff.families.qwen_image.text import PROMPT_TEMPLATE, TEMPLATE_PREFIX_TOKENS, QwenPromptEncoder
from sgdiff.io.image import read_png_parameters
from sgdiff.pipeline.schedule import FlowMatchSchedule, flow_match_sigmas, flow_match_spaced_sigmas
from sgdiff.testing.compare import max_pixel_diff, read_png
from sgdiff.testing.tiny_qwen_image import QWEN_IMAGE_SCHEDULER_CONFIG, build_tiny_qwen_image

runner = CliRunner()
MAX_PIXEL_DIFF = 2  # of 255
CPU = RuntimeConfig(device="cpu")


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return build_tiny_qwen_image(tmp_path_factory.mktemp("qwen-image") / "tiny")


@pytest.fixture(scope="module")
def reference(tiny_qwen) -> QwenImagePipeline:
    pipe = QwenImagePipeline.from_pretrained(tiny_qwen, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(model, out_dir, *args: str) -> list:
    result = runner.invoke(
        app, ["generate", "--model-path", str(model), "--output-path", str(out_dir), "--quiet", *args]
    )
    assert result.exit_code == 0, result.output
    return [line for line in result.output.splitlines() if line.endswith(".png")]


def diffusers_images(pipe, seed: int, **kwargs) -> np.ndarray:
    images = pipe(output_type="np", generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images
    return (images * 255).round().astype(np.uint8)  # what diffusers' PIL output holds


def test_true_cfg_with_two_outputs_matches_diffusers(tiny_qwen, reference, tmp_path):
    """The negative prompt (1 token) is shorter than the prompt (3): each branch its own forward, unmasked."""
    flags = "--negative-prompt blurry --true-cfg-scale 4.0 --num-outputs-per-prompt 2"
    flags += " --height 48 --width 80 --steps 3 --seed 7"
    paths = generate(tiny_qwen, tmp_path, "--prompt", "a red cube", *flags.split())
    expected = diffusers_images(
        reference, seed=7, prompt="a red cube", negative_prompt="blurry", true_cfg_scale=4.0,
        num_images_per_prompt=2, height=48, width=80, num_inference_steps=3,
    )  # fmt: skip
    assert not np.array_equal(expected[0], expected[1])  # two different samples from one generator
    assert max_pixel_diff(paths, expected) <= MAX_PIXEL_DIFF  # observed 0
    params = read_png_parameters(paths[0])
    summary = (params["prompt"], params["negative_prompt"], params["true_cfg_scale"], params["preset"])
    assert summary == ("a red cube", "blurry", 4.0, "qwen-image")


def test_without_cfg_and_a_short_text_matches_diffusers(tiny_qwen, reference, tmp_path):
    """No negative prompt: one branch (the default true_cfg_scale 4 needs one); 5 text tokens kept."""
    flags = "--height 64 --width 32 --steps 4 --seed 3 --num-outputs-per-prompt 2 --max-sequence-length 5"
    paths = generate(tiny_qwen, tmp_path, "--prompt", "the photo of a green sphere", *flags.split())
    expected = diffusers_images(
        reference, seed=3, prompt="the photo of a green sphere", num_images_per_prompt=2, height=64, width=32,
        num_inference_steps=4, max_sequence_length=5,
    )  # fmt: skip
    assert max_pixel_diff(paths, expected) <= MAX_PIXEL_DIFF  # observed 0


def test_a_one_word_change_moves_the_image_far_beyond_the_tolerance(tiny_qwen, tmp_path):
    flags = "--height 48 --width 80 --steps 3 --seed 7".split()
    red = read_png(generate(tiny_qwen, tmp_path / "red", "--prompt", "a red cube", *flags)[0])
    blue = read_png(generate(tiny_qwen, tmp_path / "blue", "--prompt", "a blue cube", *flags)[0])
    assert np.abs(red.astype(int) - blue.astype(int)).max() > 20 * MAX_PIXEL_DIFF  # observed 80 (mean 3.6)


@pytest.mark.parametrize("max_sequence_length", [512, 4])
def test_text_embeddings_are_diffusers_own(reference, max_sequence_length):
    """The template, its system turn dropped (34 tokens, as with Qwen's tokenizer), the length cut."""
    ids = reference.tokenizer([PROMPT_TEMPLATE.format("a red cube")]).input_ids[0]
    assert reference.tokenizer.convert_ids_to_tokens(ids[TEMPLATE_PREFIX_TOKENS - 2 : TEMPLATE_PREFIX_TOKENS + 3]) == [
        "user", "Ċ", "a", "Ġred", "Ġcube",
    ]  # fmt: skip
    encoder = QwenPromptEncoder(reference.tokenizer, reference.text_encoder, torch.float32)
    params = QwenImageSampling("a red cube", max_sequence_length=max_sequence_length)
    with torch.no_grad():
        ours = encoder(["a red cube"], params)["encoder_hidden_states"]
        theirs, mask = reference.encode_prompt("a red cube", max_sequence_length=max_sequence_length)
    assert mask is None and torch.equal(ours, theirs)


@pytest.mark.parametrize(("steps", "seq_len"), [(50, 4096), (3, 15), (28, 6889), (2, 256)])
def test_sigmas_with_shift_terminal_match_diffusers_bit_for_bit(steps, seq_len):
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)
    config = scheduler.config
    mu = calculate_shift(
        seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = flow_match_sigmas(steps, seq_len, FlowMatchSchedule.from_dict(QWEN_IMAGE_SCHEDULER_CONFIG))
    assert torch.equal(ours, scheduler.sigmas) and ours[-2].item() == pytest.approx(0.02)
    assert torch.equal(ours[:-1] * 1000, scheduler.timesteps)


def test_spaced_sigmas_with_shift_terminal_match_diffusers():
    """The scheduler spacing the sigmas itself (Wan's Euler configs), stretched as diffusers stretches them."""
    config = {"shift": 3.0, "shift_terminal": 0.05}
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    scheduler.set_timesteps(7)
    assert torch.equal(flow_match_spaced_sigmas(7, FlowMatchSchedule.from_dict(config)), scheduler.sigmas)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_sequence_length": 1025}, "`max_sequence_length` must be between 1 and 1024, got 1025"),
        ({"guidance_scale": 5.0}, "`guidance_scale` does not apply to Qwen-Image"),
        ({"true_cfg_scale": 5.0}, "`true_cfg_scale` needs a `negative_prompt`"),
        ({"negative_prompt": "blurry", "true_cfg_scale": 1.0}, "`negative_prompt` is used only with true CFG"),
        ({"num_frames": 5}, "`num_frames` does not apply to QwenImagePipeline"),
        ({"num_inference_steps": 1}, "`num_inference_steps` must be at least 2 for this model (its schedule ends at"),
    ],
)
def test_requests_it_would_not_honour_are_refused(tiny_qwen, fields, message):
    with pytest.raises(UserError) as caught:
        ModelRunner(str(tiny_qwen), runtime=CPU).sampling_params("a cube", **fields)
    assert str(caught.value).startswith(message.replace("`", ""))
    assert caught.value.field in fields


def test_a_size_must_fill_the_packed_latents():
    """A VAE of 16x downsampling packs 32x32 pixels per token (diffusers would round the size down)."""
    rule, _ = qwen_image_rules(16)
    rule(QwenImageSampling("p", height=64, width=96))
    with pytest.raises(UserError, match="width must be a multiple of 32 for this model, got 80"):
        rule(QwenImageSampling("p", height=64, width=80))


def test_the_preset_carries_diffusers_defaults(tiny_qwen):
    model = ModelRunner(str(tiny_qwen), runtime=CPU)
    assert model.preset is not None and model.preset.name == "qwen-image"  # matched by the pipeline class
    params = model.sampling_params("a cube", max_sequence_length=1024)
    defaults = (params.height, params.width, params.num_inference_steps, params.true_cfg_scale)
    assert defaults == (1024, 1024, 50, 4.0) and params.max_sequence_length == 1024
    assert model.family.cfg_scale_of(params) is None  # no negative prompt: no true CFG, as diffusers
    assert select_preset(None, "Qwen/Qwen-Image", "QwenImagePipeline", {}).name == "qwen-image"
    preset = FlowMatchSchedule.from_dict(load_preset("qwen-image").schedule)
    assert preset == FlowMatchSchedule.from_dict(QWEN_IMAGE_SCHEDULER_CONFIG)


def test_prompts_encoded_while_loading_give_the_same_image(tiny_qwen):
    """encode_ahead: the request's prompt and negative prompt come from the load, with the same result."""
    fields = dict(prompt="a red cube", negative_prompt="blurry", height=32, width=32, num_inference_steps=2, seed=3)
    ahead = ModelRunner(str(tiny_qwen), runtime=CPU)
    ahead.load(encode_ahead=[ahead.sampling_params(**fields)])
    stage = next(stage for stage in ahead.pipeline.stages if stage.name == "text_encoding")
    assert set(stage.encoded) == {("a red cube", 512), ("blurry", 512)}
    result = ahead.generate(ahead.sampling_params(**fields))
    assert stage.encoded == {}  # each used once
    plain = ModelRunner(str(tiny_qwen), runtime=CPU)
    assert torch.equal(result.latents, plain.generate(plain.sampling_params(**fields)).latents)

"""Whole videos: `sgdiff generate --output-format png` writes the frames diffusers' HunyuanVideo15Pipeline and
HunyuanVideo15ImageToVideoPipeline make with the same weights, prompt, negative prompt, guidance, size, frames,
steps, input image and CPU-generator seed (fp32, max abs diff <= 2/255), on tiny random checkpoints
(sgdiff/testing/tiny_hunyuan_video15.py); and the parts that decide them (text embeddings, output sizes, preset)
checked on their own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import ClassifierFreeGuidance, HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Pipeline
from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor
from PIL import Image
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.config import ParallelConfig, RuntimeConfig, load_preset, select_preset
from sgdiff.engine.runner import ModelRunner
from sgdiff.families.hunyuan_video.schedule import hunyuan_video_schedule
from sgdiff.families.hunyuan_video15.sizes import bucket_size
from sgdiff.families.hunyuan_video15.text import CROP_START, SYSTEM_MESSAGE, glyph_text
from sgdiff.io.image import read_png_parameters
from sgdiff.io.video import read_png_frames
from sgdiff.testing.compare import relative_error
from sgdiff.testing.distributed import parallel_latents, run_on_ranks
from sgdiff.testing.tiny_hunyuan_video15 import SCHEDULER_CONFIG, TARGET_SIZE, build_tiny_hunyuan_video15

runner = CliRunner()
MAX_PIXEL_DIFF = 2  # of 255
CPU = RuntimeConfig(device="cpu")
SMALL = dict(height=32, width=48, num_frames=5)
SMALL_FLAGS = ["--height", "32", "--width", "48", "--num-frames", "5", "--output-format", "png"]
I2V_FLAGS = ["--num-frames", "5", "--output-format", "png"]  # the size follows the image


@pytest.fixture(scope="module")
def tiny_t2v(tmp_path_factory) -> Path:
    return build_tiny_hunyuan_video15(tmp_path_factory.mktemp("hunyuan-video15") / "t2v")


@pytest.fixture(scope="module")
def tiny_i2v(tmp_path_factory) -> Path:
    return build_tiny_hunyuan_video15(tmp_path_factory.mktemp("hunyuan-video15") / "i2v", image_to_video=True)


@pytest.fixture(scope="module")
def reference(tiny_t2v) -> HunyuanVideo15Pipeline:
    pipe = HunyuanVideo15Pipeline.from_pretrained(tiny_t2v, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    """A 60x40 image with structure (3:2, sized to 48x32 at the tiny target size) and a plain red one."""
    folder = tmp_path_factory.mktemp("images")
    y, x = np.mgrid[0:40, 0:60]
    Image.fromarray(np.stack([x * 4, y * 6, (x + y) * 2], axis=-1).astype(np.uint8)).save(folder / "ramp.png")
    Image.new("RGB", (60, 40), (200, 30, 30)).save(folder / "red.png")
    return {"ramp": folder / "ramp.png", "red": folder / "red.png"}


def generate(model, out_dir, *args: str) -> list[Path]:
    """The frame folders `sgdiff generate` wrote, in order."""
    result = runner.invoke(app, ["generate", "--model-path", str(model), "--output-path", str(out_dir), "-q", *args])
    assert result.exit_code == 0, result.output
    return [Path(line) for line in result.stdout.splitlines() if line]


def diffusers_frames(pipe, seed: int, guidance_scale: float | None = None, **kwargs) -> np.ndarray:
    if guidance_scale is not None:  # diffusers' pipelines take the CFG scale from their guider
        pipe = type(pipe)(**{**pipe.components, "guider": ClassifierFreeGuidance(guidance_scale=guidance_scale)})
        pipe.set_progress_bar_config(disable=True)
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


def pixel_change(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_cfg_with_a_negative_prompt_matches_diffusers(tiny_t2v, reference, tmp_path):
    """The guider's CFG 6 (the checkpoint's default) against a negative prompt of another token count."""
    flags = [*SMALL_FLAGS, "--steps", "3", "--seed", "3", "--negative-prompt", "blurry photo"]
    folders = generate(tiny_t2v, tmp_path, "--prompt", "a red cube on the table", *flags)
    expected = diffusers_frames(
        reference, seed=3, prompt="a red cube on the table", negative_prompt="blurry photo", num_inference_steps=3,
        **SMALL,
    )  # fmt: skip
    assert max_frame_diff(folders, expected) <= MAX_PIXEL_DIFF  # observed 1
    params = read_png_parameters(folders[0] / "frame_00000.png")
    summary = (params["guidance_scale"], params["fps"], params["num_frames"], params["preset"])
    assert summary == (6.0, 24, 5, "hunyuanvideo-1.5-480p")


def test_quoted_text_goes_through_byt5_as_in_diffusers(tiny_t2v, reference, tmp_path):
    """A prompt quoting text: its glyphs' ByT5 tokens join the context (the negative prompt, " ", has none)."""
    prompt = 'a sign that says "hello"'
    folders = generate(tiny_t2v, tmp_path / "a", "--prompt", prompt, *SMALL_FLAGS, "--steps", "2", "--seed", "5")
    expected = diffusers_frames(reference, seed=5, prompt=prompt, num_inference_steps=2, **SMALL)
    assert max_frame_diff(folders, expected) <= MAX_PIXEL_DIFF  # observed 1
    other = generate(tiny_t2v, tmp_path / "b", "--prompt", 'a sign that says "hallo"', *SMALL_FLAGS, "--steps", "2",
                     "--seed", "5")  # fmt: skip
    # one quoted letter (read by both text encoders; test_text_embeddings_are_diffusers_own checks ByT5's tokens)
    assert pixel_change(read_png_frames(folders[0]), read_png_frames(other[0])) > 20 * MAX_PIXEL_DIFF  # observed 172


def test_without_cfg_two_outputs_per_prompt_match_diffusers(tiny_t2v, reference, tmp_path):
    """Guidance 1: one forward a step, no negative prompt encoded; two videos from one generator. (diffusers' text
    to video fails with num_videos_per_prompt 2, its zero image embeddings made for one row: the prompt twice is
    the same request to it.)"""
    flags = [*SMALL_FLAGS, "--steps", "2", "--seed", "7", "--guidance-scale", "1", "--num-outputs-per-prompt", "2"]
    folders = generate(tiny_t2v, tmp_path, "--prompt", "a cat walks on the grass", *flags)
    # diffusers' VAE decodes several videos only one at a time: its attention's causal mask fails over a batch
    reference.vae.enable_slicing()
    expected = diffusers_frames(reference, seed=7, guidance_scale=1.0, prompt=["a cat walks on the grass"] * 2,
                                num_inference_steps=2, **SMALL)  # fmt: skip
    assert pixel_change(expected[0], expected[1]) > 20 * MAX_PIXEL_DIFF  # two samples
    assert max_frame_diff(folders, expected) <= MAX_PIXEL_DIFF  # observed 1


def test_image_to_video_matches_diffusers(tiny_i2v, pictures, tmp_path):
    """The output size from the image's aspect ratio at the checkpoint's target size, as diffusers sizes it (60x40
    -> 48x32), the image cropped to it, its SigLIP tokens and its latents as the first frame."""
    flags = [*I2V_FLAGS, "--steps", "2", "--seed", "4", "--negative-prompt", "blurry"]
    folders = generate(tiny_i2v, tmp_path / "ramp", "--prompt", "a red cube", "--image-path", str(pictures["ramp"]),
                       *flags)  # fmt: skip
    pipe = HunyuanVideo15ImageToVideoPipeline.from_pretrained(tiny_i2v, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(pictures["ramp"]).convert("RGB")
    expected = diffusers_frames(pipe, seed=4, image=image, prompt="a red cube", negative_prompt="blurry",
                                num_frames=5, num_inference_steps=2)  # fmt: skip
    assert expected.shape == (1, 5, 32, 48, 3)
    assert max_frame_diff(folders, expected) <= MAX_PIXEL_DIFF  # observed 1
    red = generate(tiny_i2v, tmp_path / "red", "--prompt", "a red cube", "--image-path", str(pictures["red"]), *flags)
    assert pixel_change(read_png_frames(folders[0]), read_png_frames(red[0])) > 20 * MAX_PIXEL_DIFF  # observed 241


def test_a_step_distilled_meanflow_checkpoint_matches_diffusers(tmp_path, pictures):
    """use_meanflow (the 480p step-distilled image-to-video checkpoint): each step also tells the transformer where
    it ends (timestep_r, 0 after the last)."""
    model = build_tiny_hunyuan_video15(tmp_path / "meanflow", image_to_video=True, use_meanflow=True)
    flags = [*I2V_FLAGS, "--steps", "3", "--seed", "2"]
    folders = generate(model, tmp_path / "out", "--prompt", "a red cube", "--image-path", str(pictures["ramp"]), *flags)
    pipe = HunyuanVideo15ImageToVideoPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(pictures["ramp"]).convert("RGB")
    expected = diffusers_frames(pipe, seed=2, image=image, prompt="a red cube", num_frames=5, num_inference_steps=3)
    assert max_frame_diff(folders, expected) <= MAX_PIXEL_DIFF  # observed 1


@pytest.mark.slow
def test_cfg_parallel_on_two_processes_gives_the_one_process_latents(tiny_t2v, tiny_i2v, pictures):
    """The family's CFG scale splits the branches over two ranks (CPU, gloo); rank 0 alone encodes the texts and
    sends them (a prompt quoting text, a negative prompt quoting none), every rank encodes the input image."""
    requests = [
        (str(tiny_t2v), 'a red "cube"', dict(num_inference_steps=2, negative_prompt="blurry", **SMALL)),
        (str(tiny_i2v), "a red cube", dict(num_inference_steps=2, num_frames=5, image_path=str(pictures["ramp"]))),
    ]
    per_rank = run_on_ranks(ParallelConfig(2, enable_cfg_parallel=True), parallel_latents, requests)
    for i, (model, prompt, flags) in enumerate(requests):
        one = ModelRunner(model, runtime=CPU)
        reference = one.generate(one.sampling_params(prompt, **flags)).latents
        for rank, (latents, loaded) in enumerate(per_rank):
            assert torch.equal(latents[i], reference), (model, rank)  # observed equal
            assert ("text_encoder" in loaded[i]) == (rank == 0) and ("image_encoder" in loaded[i]) == (i == 1)


def test_a_one_word_change_moves_the_video_far_beyond_the_tolerance(tiny_t2v, tmp_path):
    flags = [*SMALL_FLAGS, "--steps", "2", "--seed", "3"]
    red = read_png_frames(generate(tiny_t2v, tmp_path / "red", "--prompt", "a red cube", *flags)[0])
    blue = read_png_frames(generate(tiny_t2v, tmp_path / "blue", "--prompt", "a blue cube", *flags)[0])
    assert pixel_change(red, blue) > 20 * MAX_PIXEL_DIFF  # observed 255 (mean 48)


@pytest.mark.parametrize(
    ("prompt", "max_sequence_length"),
    [("a red cube", 1000), ('a sign that says "hello" and “hello” and "cat"', 1000), ("a blue sphere on the table", 3)],
)
def test_text_embeddings_are_diffusers_own(tiny_t2v, reference, prompt, max_sequence_length):
    """The chat template cut at crop_start (exactly the template up to the prompt, as with Qwen's tokenizer), the
    layer two before the last, the length cut; the quoted texts through ByT5; diffusers' padded tokens masked =
    sgdiff's texts cut to their own tokens."""
    assert reference.system_message == SYSTEM_MESSAGE and reference.prompt_template_encode_start_idx == CROP_START
    conversation = [[{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": prompt}]]
    ids = reference.tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"][0]
    user_turn = reference.tokenizer.convert_ids_to_tokens(ids[CROP_START - 3 : CROP_START + 1])
    assert user_turn == ["<|im_start|>", "user", "Ċ", "a"]
    model = ModelRunner(str(tiny_t2v), runtime=CPU)
    model.load()
    stage = next(stage for stage in model.pipeline.stages if stage.name == "text_encoding")
    params = model.sampling_params(prompt, max_sequence_length=max_sequence_length)
    reference.tokenizer_max_length = max_sequence_length
    try:
        with torch.no_grad():
            ours = stage.encode([prompt], params)
            embeds, mask, glyphs, glyph_mask = reference.encode_prompt(prompt, device=torch.device("cpu"))
    finally:
        reference.tokenizer_max_length = 1000
    assert (glyph_text(prompt) is None) == (not glyph_mask.any()) == ("encoder_hidden_states_2" not in ours)
    for name, theirs in (("encoder_hidden_states", embeds[:, mask[0].bool()]),
                         ("encoder_hidden_states_2", glyphs[:, glyph_mask[0].bool()])):  # fmt: skip
        if theirs.shape[1] or name in ours:  # (no quoted text: no glyph tokens, nor the input)
            assert ours[name].shape == theirs.shape  # [1, valid tokens, D]
            # padded in diffusers, not here: equal up to the attention's float rounding
            assert relative_error(ours[name], theirs) < 1e-6


def test_quoted_texts_are_joined_as_diffusers_joins_them():
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import extract_glyph_texts

    for prompt in ["no quotes", 'say "hi"', 'say "hi" and “bye” and "hi"', 'empty "" quotes', '"a" "a"', "“x”"]:
        assert glyph_text(prompt) == extract_glyph_texts(prompt)


def test_output_sizes_are_diffusers_buckets():
    """The size a request without one gets: diffusers' calculate_default_height_width for any aspect ratio and
    target size (16:9 for text to video; an input image's for image to video)."""
    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=16)
    for target in (TARGET_SIZE, 640, 960):
        for height, width in [(9, 16), (16, 9), (1, 1), (40, 60), (1080, 1920), (1000, 999), (1, 7), (7, 1), (3, 4)]:
            expected = tuple(processor.calculate_default_height_width(height, width, target))
            assert bucket_size(height, width, target, 16) == expected, (height, width, target)
    assert bucket_size(9, 16, 640, 16) == (480, 848) and bucket_size(9, 16, 960, 16) == (720, 1280)


def test_the_preset_carries_diffusers_defaults(tiny_t2v, tiny_i2v, pictures):
    model = ModelRunner(str(tiny_t2v), runtime=CPU)
    assert model.preset is not None and model.preset.name == "hunyuanvideo-1.5-480p"  # matched by the pipeline class
    params = model.sampling_params("a cube")
    defaults = (params.height, params.width, params.num_frames, params.num_inference_steps, params.guidance_scale)
    assert defaults == (*bucket_size(9, 16, TARGET_SIZE, 16), 121, 50, 6.0)  # 16:9 at target_size; the guider's
    assert (params.fps, params.max_sequence_length) == (24, 1000)
    assert model.family.cfg_scale_of(params) == 6.0
    assert model.family.cfg_scale_of(model.sampling_params("a cube", guidance_scale=1.0)) is None
    image_model = ModelRunner(str(tiny_i2v), runtime=CPU)
    assert image_model.preset is not None and image_model.preset.name == "hunyuanvideo-1.5-480p-i2v"
    params = image_model.sampling_params("a cube", image_path=str(pictures["ramp"]))
    assert (params.height, params.width) == (32, 48)  # the image's 3:2
    params = image_model.sampling_params("a cube", image_path=str(pictures["ramp"]), height=64, width=64)
    assert (params.height, params.width) == (64, 64)  # given: kept
    for name, variant, pipeline, target, shift in [
        ("hunyuanvideo-1.5-480p", "480p_t2v", "HunyuanVideo15Pipeline", 640, 5.0),
        ("hunyuanvideo-1.5-720p", "720p_t2v", "HunyuanVideo15Pipeline", 960, 9.0),
        ("hunyuanvideo-1.5-480p-i2v", "480p_i2v", "HunyuanVideo15ImageToVideoPipeline", 640, 5.0),
        ("hunyuanvideo-1.5-720p-i2v", "720p_i2v", "HunyuanVideo15ImageToVideoPipeline", 960, 7.0),
    ]:
        repo = f"hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-{variant}"
        assert select_preset(None, repo, pipeline, {}).name == name
        assert select_preset(None, "/local", pipeline, {"target_size": target}).name == name
        assert hunyuan_video_schedule(load_preset(name).schedule).shift == shift
    assert hunyuan_video_schedule(load_preset("hunyuanvideo-1.5-480p").schedule) == hunyuan_video_schedule(
        SCHEDULER_CONFIG
    )


def test_prompts_encoded_while_loading_give_the_same_video(tiny_t2v):
    """encode_ahead: the request's prompt and negative prompt come from the load, with the same result."""
    fields = dict(prompt='a red "cube"', negative_prompt="blurry", num_inference_steps=2, **SMALL)
    ahead = ModelRunner(str(tiny_t2v), runtime=CPU)
    ahead.load(encode_ahead=[ahead.sampling_params(**fields)])
    stage = next(stage for stage in ahead.pipeline.stages if stage.name == "text_encoding")
    assert set(stage.encoded) == {('a red "cube"', 1000), ("blurry", 1000)}
    result = ahead.generate(ahead.sampling_params(**fields))
    assert stage.encoded == {}  # each used once
    plain = ModelRunner(str(tiny_t2v), runtime=CPU)
    assert torch.equal(result.latents, plain.generate(plain.sampling_params(**fields)).latents)


def test_fused_projections_and_gelu_run_fewer_gemms_for_the_same_video(tiny_t2v):
    """The family's fusable groups reach the model: q/k/v as one GEMM each (refiner, both streams), the MLPs'
    GELU inside their GEMM; the latents as without them."""
    from torch.profiler import ProfilerActivity, profile

    from sgdiff.config import SpeedConfig

    def run(speed: SpeedConfig) -> tuple[torch.Tensor, dict]:
        model = ModelRunner(str(tiny_t2v), runtime=RuntimeConfig(device="cpu", dtype="fp32", speed=speed))
        params = model.sampling_params("a red cube", num_inference_steps=1, guidance_scale=1.0, **SMALL)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            latents = model.generate(params).latents
        return latents, {e.key: e.count for e in prof.key_averages()}

    plain, plain_ops = run(SpeedConfig())
    fused, fused_ops = run(SpeedConfig(fused_projections=True, fused_gelu=True))
    # one step: 2 refiner blocks' q/k/v (3 -> 1), 2 blocks' 2 streams (6 -> 2)
    assert plain_ops["aten::linear"] - fused_ops["aten::linear"] >= 2 * 2 + 2 * 4
    assert fused_ops["aten::gelu_"] == 2 * 2  # the blocks' 2 MLPs
    assert (fused - plain).abs().max() < 1e-4

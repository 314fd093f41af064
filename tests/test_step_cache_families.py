"""--cache on the Qwen-Image, HunyuanVideo and HunyuanVideo-1.5 families (each family's CachePlan: its blocks,
their streams, TeaCache's signal). Through the library's generate on their tiny random checkpoints: threshold 0
is the uncached output exactly, a threshold skips steps and stays close. On the transformers alone (and on a
Qwen-Image-Edit-2511 one): TeaCache's signal is the first block's modulated image stream, and a skip over an
unchanged input gives the computed output again (the plan's streams are the ones its blocks take and return).
2 processes under Ulysses skip what one process skips (HunyuanVideo: FLUX's two segments). The rules themselves,
CFG branches deciding on their own and the flags: tests/test_step_cache.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._pytree import tree_map

from sgdiff.config import ParallelConfig, RuntimeConfig, SpeedConfig
from sgdiff.engine.runner import ModelRunner
from sgdiff.families.qwen_image.family import QwenImageFamily
from sgdiff.models.qwen_image import QwenImageTransformer, QwenImageTransformerConfig
from sgdiff.pipeline.denoise_step import DenoiseStep, denoise_step
from sgdiff.pipeline.family import ModelFamily
from sgdiff.speed.apply import resolve_speed
from sgdiff.speed.step_cache import apply_step_cache
from sgdiff.testing.compare import randomize_weights
from sgdiff.testing.distributed import run_on_ranks
from sgdiff.testing.step_cache import cached_latents_each
from sgdiff.testing.tiny_hunyuan_video import build_tiny_hunyuan_video
from sgdiff.testing.tiny_hunyuan_video15 import build_tiny_hunyuan_video15
from sgdiff.testing.tiny_qwen_image import build_tiny_qwen_image

FAMILIES = ("qwen_image", "hunyuan_video", "hunyuan_video15")
METHODS = ("fbcache", "teacache")  # the ones these plans are written for (the others' offers: test_step_cache.py)
BUILDERS: dict[str, Callable[[Path], Path]] = {
    "qwen_image": build_tiny_qwen_image,
    "hunyuan_video": build_tiny_hunyuan_video,
    "hunyuan_video15": build_tiny_hunyuan_video15,
}
PROMPT = "a red cube"
CPU = torch.device("cpu")
# 8 steps, small sizes; Qwen-Image with true CFG and HunyuanVideo-1.5 with CFG (two branches, two caches), at
# low scales: the scale multiplies the branches' difference, and with it what a skip changes in either branch
REQUESTS: dict[str, dict[str, Any]] = {
    "qwen_image": dict(height=32, width=32, num_inference_steps=8, negative_prompt="blurry", true_cfg_scale=2.0),
    "hunyuan_video": dict(height=32, width=32, num_frames=5, num_inference_steps=8),  # embedded guidance
    "hunyuan_video15": dict(height=32, width=32, num_frames=5, num_inference_steps=8, guidance_scale=2.0),
}
# thresholds that skip a few of the 8 steps of each tiny random model: their steps change far more than a real
# model's, hence several times the defaults (HunyuanVideo's teacache: the change rescaled by its polynomial)
SKIPPING = {
    "qwen_image": {"fbcache": 0.6, "teacache": 0.4},
    "hunyuan_video": {"fbcache": 0.4, "teacache": 0.2},
    "hunyuan_video15": {"fbcache": 0.3, "teacache": 0.2},
}
# the latents' relative max error a skipping run may have, as FLUX's and Wan's tests allow: a skipped step adds
# the blocks' residual of a step or two before, which these fast-changing models make a few percent off (observed
# 0.018 to 0.077); a plan whose streams were wrong fails the exact test on an unchanged input below instead
CLOSE = 0.1


def runner(checkpoint: Path, speed: SpeedConfig) -> ModelRunner:
    return ModelRunner(str(checkpoint), runtime=RuntimeConfig(device="cpu", dtype="fp32", speed=speed))


def generate(checkpoint: Path, speed: SpeedConfig, request: dict) -> tuple[torch.Tensor, dict]:
    engine = runner(checkpoint, speed)
    result = engine.generate(engine.sampling_params(PROMPT, **request))
    assert result.latents is not None
    return result.latents, result.skipped_steps


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("step-cache-families")
    return {family: build(folder / family) for family, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def uncached(checkpoints) -> dict[str, torch.Tensor]:
    return {family: generate(checkpoints[family], SpeedConfig(), REQUESTS[family])[0] for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_threshold_zero_is_the_uncached_output_exactly(checkpoints, uncached, family, method):
    latents, skipped = generate(checkpoints[family], SpeedConfig(cache=method, cache_threshold=0.0), REQUESTS[family])
    assert skipped == {} and torch.equal(latents, uncached[family])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_a_threshold_skips_steps_and_stays_close(checkpoints, uncached, family, method):
    threshold = SKIPPING[family][method]
    latents, skipped = generate(checkpoints[family], SpeedConfig(cache=method, cache_threshold=threshold),
                                REQUESTS[family])  # fmt: skip
    reference = uncached[family]
    error = ((latents - reference).abs().max() / reference.abs().max()).item()
    print(f"{family} {method} {threshold}: skipped {skipped}, relative max error {error:.4f}")
    steps = [step for branch in skipped.values() for step in branch]
    assert steps and 0 not in steps and 7 not in steps  # the first and the last step are always computed
    assert not torch.equal(latents, reference) and error < CLOSE


# the transformers alone: each family's, loaded from its checkpoint, and Qwen-Image-Edit-2511's (zero_cond_t: the
# edit images' tokens conditioned as at t = 0), built here (an Edit request is slow on the CPU: its pipeline
# resizes the input image to a million pixels, thousands of tokens)
EDIT_2511 = "qwen_image_edit_2511"
TRANSFORMERS = (*FAMILIES, EDIT_2511)
Transformer = tuple[ModelFamily, torch.nn.Module, tuple, dict]  # the family, the model, a call's args and kwargs


def loaded_transformer(checkpoint: Path, request: dict) -> Transformer:
    """The checkpoint's transformer (no cache) and (copies of) the arguments of its first call, step 0's prompt
    branch, in a two-step request (Qwen-Image's schedule needs two)."""
    engine = runner(checkpoint, SpeedConfig())
    engine.load()
    assert engine.pipeline is not None  # (loaded)
    (model,) = engine.pipeline.transformers
    calls: list = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(tree_map(
        lambda x: x.clone() if isinstance(x, torch.Tensor) else x, (args, kwargs))), with_kwargs=True)  # fmt: skip
    try:
        engine.generate(engine.sampling_params(PROMPT, **{**request, "num_inference_steps": 2}))
    finally:
        hook.remove()
    args, kwargs = calls[0]
    return engine.family, model, args, kwargs


def edit_2511_transformer() -> Transformer:
    """A tiny zero_cond_t transformer with random weights, and a call: a 2x3 noise grid, then a 3x2 edit image."""
    config = QwenImageTransformerConfig(in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                        num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6),
                                        zero_cond_t=True)  # fmt: skip
    model = randomize_weights(QwenImageTransformer(config), seed=0).eval()
    g = torch.Generator().manual_seed(0)
    call = dict(hidden_states=torch.randn(1, 12, 16, generator=g), encoder_hidden_states=torch.randn(1, 5, 24,
                generator=g), timestep=torch.tensor([0.6]), img_shapes=[[(1, 2, 3), (1, 3, 2)]])  # fmt: skip
    return QwenImageFamily(), model, (), call


def transformer(name: str, checkpoints: dict[str, Path]) -> Transformer:
    return edit_2511_transformer() if name == EDIT_2511 else loaded_transformer(checkpoints[name], REQUESTS[name])


@pytest.mark.parametrize("name", TRANSFORMERS)
def test_the_teacache_signal_is_what_the_first_blocks_attention_reads(checkpoints, name):
    """TeaCache's signal is the first block's timestep-modulated image stream: the tensor that block hands its
    attention as the image stream's input (per token with zero_cond_t)."""
    family, model, args, kwargs = transformer(name, checkpoints)
    plan = family.cache_plan(model)
    assert plan.modulated_input is not None
    first = plan.segments[0][0]
    seen: dict[str, tuple] = {}

    def keep(key: str):
        return lambda module, inputs: seen.setdefault(key, inputs) and None

    attention = first.get_submodule("attn")
    hooks = [first.register_forward_pre_hook(keep("block")), attention.register_forward_pre_hook(keep("attn"))]
    with torch.no_grad():
        model(*args, **kwargs)
        signal = plan.modulated_input(first, seen["block"])
    for hook in hooks:
        hook.remove()
    assert torch.equal(signal, seen["attn"][0])


@pytest.mark.parametrize("name", TRANSFORMERS)
@pytest.mark.parametrize("method", METHODS)
def test_a_skip_over_an_unchanged_input_gives_the_computed_output(checkpoints, name, method):
    """The same input at steps 0 and 1: step 1's signal has not changed, so it skips, and each cached range hands
    on the streams it starts from plus the residuals step 0 stored: step 0's output again, up to rounding. A plan
    whose streams were not the blocks' own (another order, one missing, a segment's cut wrong) is far off."""
    family, model, args, kwargs = transformer(name, checkpoints)
    speed = resolve_speed(SpeedConfig(cache=method, cache_threshold=0.2), CPU, torch.float32)  # (> HunyuanVideo's p(0))
    apply_step_cache(model, speed, family)
    record: dict[str, list[int]] = {}
    outputs = []
    for step in (0, 1):
        with denoise_step(DenoiseStep(step, 3, "cond", record)), torch.no_grad():
            outputs.append(model(*args, **kwargs))
    assert record == {"cond": [1]}
    torch.testing.assert_close(outputs[1], outputs[0])


@pytest.mark.slow
def test_processes_skip_what_one_process_skips(checkpoints):
    # HunyuanVideo with true CFG under Ulysses-2: 2 x 2 x 2 = 8 video tokens, even over the ranks (the signal is
    # the video stream's: no padding token enters the agreed sums); the text's padding is a token of the joint
    # attention's like any other, which the single-process comparison covers. Both methods in one spawn.
    checkpoint = checkpoints["hunyuan_video"]
    request = {**REQUESTS["hunyuan_video"], "negative_prompt": "blurry photo", "true_cfg_scale": 4.0}
    speeds = [SpeedConfig(cache=method, cache_threshold=SKIPPING["hunyuan_video"][method]) for method in METHODS]
    ranks = run_on_ranks(ParallelConfig(2), cached_latents_each, str(checkpoint), speeds, PROMPT, request)
    for i, speed in enumerate(speeds):
        alone, alone_skipped = generate(checkpoint, speed, request)
        assert alone_skipped.get("cond") and alone_skipped.get("uncond"), speed.cache
        assert ranks[0][i][1] == ranks[1][i][1] == alone_skipped, speed.cache
        assert (ranks[0][i][0] - alone).abs().max() < 1e-4, speed.cache

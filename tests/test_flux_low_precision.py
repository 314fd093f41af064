"""bf16 and fp16 on the CPU: the same numbers as diffusers too (on CUDA the rotary embedding's
complex multiply may fuse differently, so GPU bf16 is close, not identical: docs/benchmarks.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from sgdiff.config import RuntimeConfig
from sgdiff.engine.runner import ModelRunner
from sgdiff.models.flux import FluxTransformer, FluxTransformerConfig
from sgdiff.models.flux.packing import image_position_ids, text_position_ids
from sgdiff.models.loading import build_on_meta, load_own_model, read_json
from sgdiff.testing.compare import relative_error

TRANSFORMER_TOLERANCE = 1e-3  # observed 0 on the CPU (the GPU benchmark allows 1e-2)
MAX_PIXEL_DIFF = 2  # of 255, as for fp32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_transformer_close_to_diffusers(tiny_flux_dev, dtype):
    folder = tiny_flux_dev / "transformer"
    config = FluxTransformerConfig.from_dict(read_json(folder / "config.json"))
    ours = load_own_model(build_on_meta(FluxTransformer, config), folder, dtype, torch.device("cpu"))
    reference = FluxTransformer2DModel.from_pretrained(folder, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    rows, cols, text_len, batch = 12, 20, 16, 2
    inputs = dict(
        hidden_states=torch.randn(batch, rows * cols, config.in_channels, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(batch, text_len, config.joint_attention_dim, generator=g).to(dtype),
        pooled_projections=torch.randn(batch, config.pooled_projection_dim, generator=g).to(dtype),
        timestep=torch.tensor([0.6, 0.3], dtype=dtype),
        img_ids=image_position_ids(rows, cols).to(dtype),
        txt_ids=text_position_ids(text_len).to(dtype),
        guidance=torch.tensor([3.5, 3.5]),
    )
    with torch.no_grad():
        actual, expected = ours(**inputs), reference(**inputs, return_dict=False)[0]
    assert actual.dtype == dtype and torch.isfinite(actual).all()
    assert relative_error(actual, expected) <= TRANSFORMER_TOLERANCE


def test_bf16_images_match_diffusers(tiny_flux_dev):
    """Two outputs with true CFG: batch 2 through every GEMM, both CFG branches."""
    engine = ModelRunner(str(tiny_flux_dev), runtime=RuntimeConfig(dtype="bf16"))
    request = dict(negative_prompt="blurry", true_cfg_scale=3.0, height=48, width=80, num_inference_steps=3)
    params = engine.sampling_params("a red cube", num_outputs_per_prompt=2, seed=3, **request)
    ours = engine.generate(params).images.astype(int)
    pipe = FluxPipeline.from_pretrained(tiny_flux_dev, dtype=torch.bfloat16)
    generator = torch.Generator("cpu").manual_seed(3)
    images = pipe("a red cube", num_images_per_prompt=2, generator=generator, output_type="np", **request).images
    reference = (images * 255).round().astype(int)
    assert ours.shape == reference.shape == (2, 48, 80, 3) and ours.std() > 1
    assert np.abs(ours - reference).max() <= MAX_PIXEL_DIFF


def test_fp16_text_stream_is_clipped_like_diffusers(tiny_flux_dev):
    """A text-stream activation past fp16's range stays finite (+-65504), as diffusers keeps it."""
    folder = tiny_flux_dev / "transformer"
    config = FluxTransformerConfig.from_dict(read_json(folder / "config.json"))
    ours = load_own_model(build_on_meta(FluxTransformer, config), folder, torch.float16, torch.device("cpu"))
    reference = FluxTransformer2DModel.from_pretrained(folder, dtype=torch.float16).eval()
    dim = config.inner_dim
    for model in (ours, reference):
        block = model.transformer_blocks[0]
        block.ff_context.net[2].bias.data.fill_(60000.0)
        block.norm1_context.linear.bias.data[5 * dim :] = 10.0  # the MLP gate: 10 x 60000 overflows fp16
    captured = {}

    def keep_text_stream(module, inputs, outputs) -> None:
        captured["txt"] = outputs[1]

    ours.transformer_blocks[0].register_forward_hook(keep_text_stream)
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 16, config.in_channels, generator=g).half(),
        encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim, generator=g).half(),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g).half(),
        timestep=torch.tensor([0.5], dtype=torch.float16),
        img_ids=image_position_ids(4, 4).half(),
        txt_ids=text_position_ids(8).half(),
        guidance=torch.tensor([3.5]),
    )
    with torch.no_grad():
        actual, expected = ours(**inputs), reference(**inputs, return_dict=False)[0]
    assert captured["txt"].abs().max() == 65504  # clipped, not inf
    assert torch.equal(actual.isfinite(), expected.isfinite())
    assert relative_error(actual[actual.isfinite()], expected[expected.isfinite()]) <= TRANSFORMER_TOLERANCE

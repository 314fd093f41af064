"""sgdiff's FLUX transformer against diffusers' FluxTransformer2DModel on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel

from sgdiff.models.flux import FluxTransformer, FluxTransformerConfig
from sgdiff.models.flux.packing import image_position_ids, text_position_ids
from sgdiff.models.loading import build_on_meta, load_own_model, read_json
from sgdiff.testing.compare import relative_error

TOLERANCE = 1e-5


def load_both(folder):
    ours = build_on_meta(FluxTransformer, FluxTransformerConfig.from_dict(read_json(folder / "config.json")))
    ours = load_own_model(ours, folder, torch.float32, torch.device("cpu"))
    reference = FluxTransformer2DModel.from_pretrained(folder, dtype=torch.float32).eval()
    return ours, reference


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize(("height", "width", "text_len", "batch"), [(48, 80, 16, 1), (32, 32, 7, 2), (80, 48, 33, 1)])
def test_transformer_matches_diffusers(variant, height, width, text_len, batch, request):
    folder = request.getfixturevalue(f"tiny_flux_{variant}") / "transformer"
    ours, reference = load_both(folder)
    config = ours.config
    rows, cols = height // 4, width // 4  # tiny VAE downsamples by 2, then 2x2 packing
    g = torch.Generator().manual_seed(height * width + text_len)
    inputs = dict(
        hidden_states=torch.randn(batch, rows * cols, config.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, config.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, config.pooled_projection_dim, generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=image_position_ids(rows, cols),
        txt_ids=text_position_ids(text_len),
        guidance=torch.full((batch,), 3.5) if config.guidance_embeds else None,
    )
    with torch.no_grad():
        expected = reference(**inputs, return_dict=False)[0]
        actual = ours(**inputs)
    assert actual.shape == expected.shape == (batch, rows * cols, config.in_channels)
    assert torch.isfinite(actual).all()
    assert relative_error(actual, expected) <= TOLERANCE


def test_sharded_checkpoint_loads_every_shard(tiny_flux_dev):
    folder = tiny_flux_dev / "transformer"
    shards = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) >= 2 and (folder / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ours, reference = load_both(folder)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


def test_model_is_built_on_meta_without_allocating():
    config = FluxTransformerConfig()  # full-size FLUX.1: 12B parameters, built instantly
    model = build_on_meta(FluxTransformer, config)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) > 11e9

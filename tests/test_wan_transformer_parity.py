"""sgdiff's Wan transformer against diffusers' WanTransformer3DModel on the same weights."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from sgdiff.models.loading import build_on_meta, load_own_model, read_json
from sgdiff.models.wan import WanTransformer, WanTransformerConfig
from sgdiff.models.wan.transformer import IGNORED_KEYS, KEEP_FP32
from sgdiff.testing.compare import relative_error
from sgdiff.testing.tiny_configs import WAN_TRANSFORMER

# 2 heads: the i2v variant's added_kv_proj_dim below is their inner dim (24)
TINY = dict(WAN_TRANSFORMER, num_attention_heads=2, in_channels=4, out_channels=4)
VARIANTS = {
    "t2v": {},
    "i2v": {"image_dim": 24, "added_kv_proj_dim": 24},
    "no-cross-attn-norm": {"cross_attn_norm": False},
}


@pytest.fixture(params=list(VARIANTS), scope="module")
def saved_wan(request, tmp_path_factory):
    torch.manual_seed(0)
    reference = WanTransformer3DModel(**{**TINY, **VARIANTS[request.param]}).eval()
    with torch.no_grad():  # move every weight off its init, so no zero hides an error
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("wan") / request.param
    reference.save_pretrained(folder)
    return request.param, folder


def load_both(folder, dtype):
    config = WanTransformerConfig.from_dict(read_json(folder / "config.json"))
    ours = load_own_model(
        build_on_meta(WanTransformer, config), folder, dtype, torch.device("cpu"), KEEP_FP32, IGNORED_KEYS
    )
    reference = WanTransformer3DModel.from_pretrained(folder, dtype=dtype).eval()
    return ours, reference


def inputs(variant: str, batch: int, frames: int, height: int, width: int, expand: bool, dtype):
    g = torch.Generator().manual_seed(frames * height + width)
    tokens = frames * (height // 2) * (width // 2)
    timestep = torch.rand(batch, tokens, generator=g) * 1000 if expand else torch.tensor([700.0, 250.0][:batch])
    text_len = 512 if variant == "i2v" else 9  # diffusers splits image from text context at 512 text tokens
    return dict(
        hidden_states=torch.randn(batch, 4, frames, height, width, generator=g).to(dtype),
        timestep=timestep,
        encoder_hidden_states=torch.randn(batch, text_len, 32, generator=g).to(dtype),
        encoder_hidden_states_image=torch.randn(batch, 5, 24, generator=g).to(dtype) if variant == "i2v" else None,
    )


@pytest.mark.parametrize(
    ("batch", "frames", "height", "width", "expand"), [(1, 3, 8, 10, False), (2, 2, 6, 4, False), (2, 3, 4, 8, True)]
)
def test_wan_transformer_matches_diffusers_fp32(saved_wan, batch, frames, height, width, expand):
    variant, folder = saved_wan
    ours, reference = load_both(folder, torch.float32)
    x = inputs(variant, batch, frames, height, width, expand, torch.float32)
    with torch.no_grad():
        expected, actual = reference(**x, return_dict=False)[0], ours(**x)
    assert actual.shape == expected.shape == x["hidden_states"].shape
    assert relative_error(actual, expected) <= 1e-5


def test_wan_transformer_bf16_keeps_the_same_parts_in_fp32(saved_wan):
    variant, folder = saved_wan
    ours, reference = load_both(folder, torch.bfloat16)
    reference_dtypes = {name: p.dtype for name, p in reference.named_parameters()}
    assert {name: p.dtype for name, p in ours.named_parameters()} == reference_dtypes
    assert torch.float32 in reference_dtypes.values() and torch.bfloat16 in reference_dtypes.values()
    x = inputs(variant, 2, 2, 6, 4, False, torch.bfloat16)
    with torch.no_grad():
        expected, actual = reference(**x, return_dict=False)[0], ours(**x)
    assert actual.dtype == torch.bfloat16 and torch.isfinite(actual).all()
    assert relative_error(actual, expected) <= 1e-2

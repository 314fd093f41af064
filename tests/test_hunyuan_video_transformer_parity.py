"""sgdiff's HunyuanVideo transformer against diffusers' HunyuanVideoTransformer3DModel on the same random weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoRotaryPosEmbed

from sgdiff.models.hunyuan_video import HUNYUAN_VIDEO, HunyuanVideoTransformer, HunyuanVideoTransformerConfig
from sgdiff.models.hunyuan_video.rope import video_rope
from sgdiff.models.loading import build_on_meta, load_own_model, read_json
from sgdiff.testing.compare import max_relative_error, randomize_weights, relative_error

TOLERANCE = 1e-5
TINY: dict[str, Any] = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    num_single_layers=2,
    num_refiner_layers=2,
    mlp_ratio=2.0,
    patch_size=2,
    patch_size_t=1,
    text_embed_dim=24,
    pooled_projection_dim=12,
    rope_axes_dim=(4, 6, 6),  # sums to attention_head_dim
)
VARIANTS: dict[str, dict[str, Any]] = {
    "guidance": {"guidance_embeds": True},
    "no-guidance": {"guidance_embeds": False},
    # HunyuanVideo-I2V's layout: the image latents and a mask channel concatenated to the noise latents
    "latent-concat": {"guidance_embeds": True, "image_condition_type": "latent_concat", "in_channels": 9},
}
# (batch, latent frames, height, width, text tokens)
CASES = {
    "odd-frames-non-square": (1, 3, 6, 10, 7),
    "one-frame-batch-2": (2, 1, 8, 4, 5),
    "batch-2": (2, 3, 4, 6, 9),
}


@pytest.fixture(params=list(VARIANTS), scope="module")
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    reference = HunyuanVideoTransformer3DModel(**{**TINY, **VARIANTS[request.param]})
    randomize_weights(reference, seed=1)  # no zero-initialised weight hides an error
    folder = tmp_path_factory.mktemp("hunyuan_video") / request.param
    reference.save_pretrained(folder)  # safetensors
    return folder


def load_ours(folder, dtype: torch.dtype) -> HunyuanVideoTransformer:
    config = HunyuanVideoTransformerConfig.from_dict(read_json(folder / "config.json"))
    return load_own_model(build_on_meta(HunyuanVideoTransformer, config), folder, dtype, torch.device("cpu"))


@pytest.fixture(scope="module")
def both(saved):
    reference = HunyuanVideoTransformer3DModel.from_pretrained(saved, dtype=torch.float32).eval()
    return load_ours(saved, torch.float32), reference


def inputs(model, batch: int, frames: int, height: int, width: int, text_len: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = model.config
    return dict(
        hidden_states=torch.randn(batch, c.in_channels, frames, height, width, generator=g),
        timestep=torch.tensor([700.0, 250.0][:batch]),  # the pipeline's t, 0..1000
        encoder_hidden_states=torch.randn(batch, text_len, c.text_embed_dim, generator=g),
        pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g),
        guidance=torch.tensor([6000.0, 3500.0][:batch]),  # guidance scale * 1000
    )


def run_both(ours, reference, x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Ours with the prompt as it is; diffusers with it and an all-ones mask (its forward needs a mask)."""
    mask = torch.ones(x["encoder_hidden_states"].shape[:2], dtype=torch.long)
    with torch.no_grad():
        return ours(**x), reference(**x, encoder_attention_mask=mask, return_dict=False)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_transformer_matches_diffusers(both, case):
    ours, reference = both
    batch, frames, height, width, text_len = CASES[case]
    actual, expected = run_both(ours, reference, inputs(ours, *CASES[case]))
    assert actual.shape == expected.shape == (batch, TINY["out_channels"], frames, height, width)
    assert torch.isfinite(actual).all()
    assert max_relative_error(actual, expected) <= TOLERANCE
    assert relative_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_diffusers(saved, dtype):
    """diffusers' rounding in bf16/fp16 (RMSNorm's two roundings, the rotary table's cos and sin, the output
    projections of the joint attention's non-contiguous halves): the same numbers."""
    ours = load_ours(saved, dtype)
    reference = HunyuanVideoTransformer3DModel.from_pretrained(saved, dtype=dtype).eval()
    x = {k: v.to(dtype) for k, v in inputs(ours, *CASES["batch-2"]).items()}
    actual, expected = run_both(ours, reference, x)
    assert actual.dtype == dtype and torch.isfinite(actual).all()
    assert relative_error(actual, expected) <= 1e-3  # observed 0 on the CPU


def test_the_output_follows_every_input(both):
    """Parity means something only if the inputs move the output far beyond the tolerance."""
    ours, _ = both
    x = inputs(ours, *CASES["batch-2"])
    other = inputs(ours, *CASES["batch-2"], seed=1)
    changes = {
        "encoder_hidden_states": other["encoder_hidden_states"],
        "pooled_projections": other["pooled_projections"],
        "timestep": x["timestep"].flip(0),
    }
    if ours.config.guidance_embeds:
        changes["guidance"] = x["guidance"].flip(0)
    with torch.no_grad():
        out = ours(**x)
        for name, value in changes.items():
            assert relative_error(ours(**{**x, name: value}), out) > 1000 * TOLERANCE, name


def test_a_padded_masked_prompt_equals_the_prompt_cut_to_its_tokens(both):
    """diffusers pads each Llama prompt and masks the padding (refiner, blocks, pooled mean); ours gets each
    prompt cut to its own tokens (one per forward) and refuses a mask that masks anything."""
    ours, reference = both
    lengths, padded = (9, 4), 12
    x = inputs(ours, 2, 3, 4, 6, padded)  # the padded rows hold random values: only the mask hides them
    mask = torch.tensor([[1] * n + [0] * (padded - n) for n in lengths])
    with torch.no_grad():
        expected = reference(**x, encoder_attention_mask=mask, return_dict=False)[0]
        ignoring_the_mask = reference(**x, encoder_attention_mask=torch.ones_like(mask), return_dict=False)[0]
        alone = [  # each prompt alone, cut to its n tokens
            ours(**{k: v[i : i + 1, :n] if k == "encoder_hidden_states" else v[i : i + 1] for k, v in x.items()})
            for i, n in enumerate(lengths)
        ]
    assert max_relative_error(torch.cat(alone), expected) <= TOLERANCE
    assert relative_error(torch.cat(alone), expected) <= TOLERANCE
    assert relative_error(ignoring_the_mask, expected) > 1000 * TOLERANCE  # the mask matters
    with pytest.raises(ValueError, match="text mask with padding is not supported"):
        ours(**x, encoder_attention_mask=mask)
    with torch.no_grad():
        assert torch.equal(ours(**x, encoder_attention_mask=torch.ones_like(mask)), ours(**x))


def test_guidance_is_required_where_embedded_and_ignored_elsewhere(both):
    ours, _ = both
    x = inputs(ours, *CASES["batch-2"])
    if ours.config.guidance_embeds:
        with pytest.raises(ValueError, match="embeds guidance"):
            ours(**{**x, "guidance": None})
    else:  # as diffusers: a guidance the model does not embed changes nothing
        with torch.no_grad():
            assert torch.equal(ours(**x), ours(**{**x, "guidance": None}))


def test_loaded_model_has_every_weight_off_meta(both):
    ours, reference = both
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    assert ours.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


def test_temporal_patches_unpatchify_as_diffusers():
    """patch_size_t 2 (no released checkpoint uses it): the frame axis is patched and put back alike."""
    torch.manual_seed(0)
    config = {**TINY, "patch_size_t": 2}
    reference = randomize_weights(HunyuanVideoTransformer3DModel(**config), seed=2)
    ours = HunyuanVideoTransformer(HunyuanVideoTransformerConfig.from_dict(config)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    actual, expected = run_both(ours, reference, inputs(ours, 2, 4, 6, 4, 5))
    assert actual.shape == expected.shape == (2, 4, 4, 6, 4)
    assert max_relative_error(actual, expected) <= TOLERANCE


def test_rope_table_is_diffusers_own():
    grid = (3, 5, 4)
    cos, sin = HunyuanVideoRotaryPosEmbed(2, 1, list(TINY["rope_axes_dim"]), 256.0)(torch.empty(1, 1, 3, 10, 8))
    ours = video_rope(grid, TINY["rope_axes_dim"], 256.0, torch.device("cpu"))  # [S, D/2, 2]
    # diffusers repeats each pair's cos and sin over the pair's two channels
    assert torch.equal(ours[..., 0].repeat_interleave(2, dim=1), cos)
    assert torch.equal(ours[..., 1].repeat_interleave(2, dim=1), sin)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_condition_type": "token_replace"}, "token_replace"),
        ({"qk_norm": "layer_norm"}, "qk_norm"),
        ({"rope_axes_dim": [4, 4, 4]}, "add up to attention_head_dim"),
    ],
)
def test_unsupported_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        HunyuanVideoTransformerConfig.from_dict({**TINY, **change})


def test_full_size_model_has_diffusers_parameter_names_and_shapes():
    """HUNYUAN_VIDEO is diffusers' default (hunyuanvideo-community/HunyuanVideo's) config, and the model built
    from it has exactly the checkpoint's tensors: both built on meta, nothing allocated."""
    with torch.device("meta"):
        reference = HunyuanVideoTransformer3DModel()
    assert HunyuanVideoTransformerConfig.from_dict(dict(reference.config)) == HUNYUAN_VIDEO
    ours = build_on_meta(HunyuanVideoTransformer, HUNYUAN_VIDEO)
    assert all(p.is_meta for p in ours.parameters())
    shapes = {name: tensor.shape for name, tensor in ours.state_dict().items()}
    assert shapes == {name: tensor.shape for name, tensor in reference.state_dict().items()}
    assert 12.8e9 < sum(p.numel() for p in ours.parameters()) < 12.9e9

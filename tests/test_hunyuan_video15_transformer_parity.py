"""sgdiff's HunyuanVideo-1.5 transformer against diffusers' HunyuanVideo15Transformer3DModel on the same random
weights, with the inputs as diffusers' T2V and I2V pipelines make them (padded, masked context)."""

from __future__ import annotations

import pytest
import torch
from diffusers import HunyuanVideo15Transformer3DModel
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15RotaryPosEmbed

from sgdiff.models.hunyuan_video15 import HunyuanVideo15Transformer, HunyuanVideo15TransformerConfig
from sgdiff.models.hunyuan_video15.config import (
    HUNYUAN_VIDEO15_480P,
    HUNYUAN_VIDEO15_480P_I2V_STEP_DISTILLED,
    HUNYUAN_VIDEO15_720P,
)
from sgdiff.models.hunyuan_video15.rope import video_rope
from sgdiff.models.loading import build_on_meta, load_own_model, read_json
from sgdiff.testing.compare import max_relative_error, randomize_weights, relative_error

TOLERANCE = 1e-5
LATENT = 4  # latent channels: the input is [noise, condition latents, their mask] on channels
TINY = dict(
    in_channels=2 * LATENT + 1,
    out_channels=LATENT,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    num_refiner_layers=2,
    text_embed_dim=12,
    text_embed_2_dim=10,
    image_embed_dim=8,
    rope_axes_dim=(4, 6, 6),  # sums to attention_head_dim
)
VARIANTS = {
    "480p": {},
    "step-distilled": {"use_meanflow": True},  # timestep_r's embedding
    "patch-2": {"patch_size": 2},  # (every released checkpoint has 1x1x1 patches: the output's unpatchify order)
}
CONTEXT = [("encoder_hidden_states", "encoder_attention_mask"), ("encoder_hidden_states_2", "encoder_attention_mask_2")]
TEXT, GLYPHS, IMAGE = 10, 6, 5  # padded lengths: prompt tokens (1000 in the pipelines), ByT5 (256), SigLIP (729)
# (task, frames, height, width) of the latents, and per batch row: valid prompt tokens, valid glyph tokens
CASES = {
    "t2v-f3-unequal": ("t2v", 3, 4, 6, [7, 4], [3, 0]),
    "t2v-f1-equal": ("t2v", 1, 6, 2, [6, 6], [0, 0]),
    "i2v-f3-unequal": ("i2v", 3, 6, 4, [5, 8], [2, 2]),
    "i2v-f1-one": ("i2v", 1, 2, 4, [9], [4]),
}


@pytest.fixture(params=list(VARIANTS), scope="module")
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    reference = HunyuanVideo15Transformer3DModel(**TINY, **VARIANTS[request.param])
    randomize_weights(reference, seed=1, unscaled=("cond_type_embed",))  # no zero-initialised weight hides an error
    folder = tmp_path_factory.mktemp("hunyuan_video15") / request.param
    reference.save_pretrained(folder)  # safetensors
    return folder


def load_ours(folder, dtype: torch.dtype) -> HunyuanVideo15Transformer:
    config = HunyuanVideo15TransformerConfig.from_dict(read_json(folder / "config.json"))
    return load_own_model(build_on_meta(HunyuanVideo15Transformer, config), folder, dtype, torch.device("cpu"))


@pytest.fixture(scope="module")
def both(saved):
    reference = HunyuanVideo15Transformer3DModel.from_pretrained(saved, torch_dtype=torch.float32).eval()
    return load_ours(saved, torch.float32), reference


def padding_mask(counts: list[int], length: int) -> torch.Tensor:
    """[B, length], each row's first `count` ones (the tokenizers pad on the right), in float: the pipelines
    cast the masks to the transformer's dtype."""
    return (torch.arange(length)[None, :] < torch.tensor(counts)[:, None]).float()


def inputs(case: str, meanflow: bool = False, seed: int = 0) -> dict:
    """What the pipelines pass: padded positions hold what the encoders give there (not zeros), a row without
    quoted text all-zero ByT5 features and an all-zero mask, T2V all-zero image embeddings and condition."""
    task, frames, height, width, text_counts, glyph_counts = CASES[case]
    batch = len(text_counts)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch, LATENT, frames, height, width, generator=g)
    condition = torch.zeros_like(noise)
    condition_mask = torch.zeros(batch, 1, frames, height, width)
    image = torch.zeros(batch, IMAGE, TINY["image_embed_dim"])
    if task == "i2v":  # the image's latents as the first frame, marked; its SigLIP features for every row
        condition[:, :, 0] = torch.randn(1, LATENT, height, width, generator=g)
        condition_mask[:, :, 0] = 1
        image = torch.randn(1, IMAGE, TINY["image_embed_dim"], generator=g).repeat(batch, 1, 1)
    glyph_mask = padding_mask(glyph_counts, GLYPHS)
    glyphs = torch.randn(batch, GLYPHS, TINY["text_embed_2_dim"], generator=g) * glyph_mask.any(1)[:, None, None]
    x = dict(
        hidden_states=torch.cat([noise, condition, condition_mask], dim=1),
        timestep=torch.tensor([830.0, 310.0][:batch]),
        encoder_hidden_states=torch.randn(batch, TEXT, TINY["text_embed_dim"], generator=g),
        encoder_attention_mask=padding_mask(text_counts, TEXT),
        encoder_hidden_states_2=glyphs,
        encoder_attention_mask_2=glyph_mask,
        image_embeds=image,
    )
    if meanflow and task == "i2v":  # (only the I2V pipeline passes it)
        x["timestep_r"] = torch.tensor([500.0, 0.0][:batch])
    return x


def run_both(ours, reference, x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return ours(**x), reference(**x, return_dict=False)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_transformer_matches_diffusers(both, case):
    ours, reference = both
    x = inputs(case, ours.config.use_meanflow)
    actual, expected = run_both(ours, reference, x)
    _, frames, height, width, text_counts, _ = CASES[case]
    assert actual.shape == expected.shape == (len(text_counts), LATENT, frames, height, width)
    assert torch.isfinite(actual).all()
    assert max_relative_error(actual, expected) <= TOLERANCE
    assert relative_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("saved", ["480p", "step-distilled"], indirect=True)
@pytest.mark.parametrize("case", ["t2v-f3-unequal", "i2v-f3-unequal"])
def test_each_prompt_cut_to_its_tokens_needs_no_mask(both, case):
    """The mask-free call (each row's valid tokens, masks None, no image embeddings for T2V) gives diffusers'
    masked output; what padded positions hold changes nothing."""
    ours, reference = both
    x = inputs(case, ours.config.use_meanflow)
    garbage = inputs(case, ours.config.use_meanflow, seed=7)  # other values everywhere
    at_padding = {k: torch.where(x[mask].bool()[..., None], x[k], garbage[k]) for k, mask in CONTEXT}
    with torch.no_grad():
        expected = reference(**x, return_dict=False)[0]
        assert torch.equal(ours(**{**x, **at_padding}), ours(**x))
        rows = []
        for i in range(len(x["timestep"])):
            text, glyphs = (x[k][i : i + 1, x[mask][i].bool()] for k, mask in CONTEXT)  # [1, valid, C]
            image = x["image_embeds"][i : i + 1] if case.startswith("i2v") else None
            timestep_r = x["timestep_r"][i : i + 1] if "timestep_r" in x else None
            latents, timestep = x["hidden_states"][i : i + 1], x["timestep"][i : i + 1]
            rows.append(ours(latents, timestep, text, None, timestep_r, glyphs, None, image))
    assert max_relative_error(torch.cat(rows), expected) <= TOLERANCE


@pytest.mark.parametrize("saved", ["480p"], indirect=True)
def test_the_mask_matters_to_diffusers(both):
    """The padded tokens would change diffusers' output if they were not masked: cutting them is no no-op."""
    _, reference = both
    x = inputs("t2v-f3-unequal")
    with torch.no_grad():
        masked = reference(**x, return_dict=False)[0]
        all_valid = {"encoder_attention_mask": torch.ones_like(x["encoder_attention_mask"])}
        unmasked = reference(**{**x, **all_valid}, return_dict=False)[0]
    assert relative_error(unmasked, masked) > 1000 * TOLERANCE


@pytest.mark.parametrize("saved", ["480p", "step-distilled"], indirect=True)
def test_the_output_follows_text_glyphs_image_and_time(both):
    """Parity means something only if the inputs move the output far beyond the tolerance."""
    ours, _ = both
    x = inputs("i2v-f3-unequal", ours.config.use_meanflow)
    other = inputs("i2v-f3-unequal", ours.config.use_meanflow, seed=1)
    changes = {
        "encoder_hidden_states": other["encoder_hidden_states"],
        "encoder_hidden_states_2": other["encoder_hidden_states_2"],
        "image_embeds": other["image_embeds"],
        "timestep": x["timestep"].flip(0),
    }
    with torch.no_grad():
        out = ours(**x)
        for name, value in changes.items():
            assert relative_error(ours(**{**x, name: value}), out) > 1000 * TOLERANCE, name
        t2v = ours(**{**x, "image_embeds": torch.zeros_like(x["image_embeds"])})
        assert relative_error(t2v, out) > 1000 * TOLERANCE  # all-zero image embeddings: no image tokens
        assert torch.equal(ours(**{**x, "image_embeds": None}), t2v)
        if ours.config.use_meanflow:
            assert relative_error(ours(**{**x, "timestep_r": x["timestep_r"].flip(0)}), out) > 1000 * TOLERANCE


@pytest.mark.parametrize("saved", ["480p"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_diffusers(saved, dtype):
    """One row: the same numbers (observed 0 on the CPU). A padded batch: this model's GEMMs and attention
    run over the valid context tokens only, diffusers' over the padded ones too, and round otherwise (observed
    up to 1e-2 in bf16, 1.2e-3 in fp16, where bf16 itself is 0.1 to 1 away from float32 on these weights)."""
    ours = load_ours(saved, dtype)
    reference = HunyuanVideo15Transformer3DModel.from_pretrained(saved, torch_dtype=dtype).eval()
    padded_batch = 2e-2 if dtype == torch.bfloat16 else 3e-3
    for case, tolerance in [("i2v-f1-one", 1e-3), ("t2v-f1-equal", padded_batch), ("i2v-f3-unequal", padded_batch)]:
        x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs(case, ours.config.use_meanflow).items()}
        actual, expected = run_both(ours, reference, x)
        assert actual.dtype == dtype and torch.isfinite(actual).all()
        assert relative_error(actual, expected) <= tolerance, case


def test_rope_table_is_diffusers_own():
    grid, axes = (3, 5, 7), (4, 6, 6)
    cos, sin = HunyuanVideo15RotaryPosEmbed(1, 1, list(axes), theta=256.0)(torch.zeros(1, 1, *grid))  # [S, D] each
    ours = video_rope(grid, axes, 256.0, torch.device("cpu"))  # [S, D/2, 2]
    assert torch.equal(ours[..., 0], cos[:, ::2]) and torch.equal(ours[..., 1], sin[:, ::2])


def test_inconsistent_inputs_are_refused(both):
    ours, _ = both
    x = inputs("t2v-f3-unequal")
    with pytest.raises(ValueError, match="encoder_attention_mask has shape"):
        ours(**{**x, "encoder_attention_mask": x["encoder_attention_mask"][:, :-1]})
    if not ours.config.use_meanflow:
        with pytest.raises(ValueError, match="no meanflow"):
            ours(**x, timestep_r=x["timestep"])
    if ours.config.patch_size == 2:
        with pytest.raises(ValueError, match="do not split"):
            ours(**{**x, "hidden_states": x["hidden_states"][..., :5]})


def test_loaded_model_has_every_weight_off_meta(both):
    ours, reference = both
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    assert ours.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


FULL_SIZE = [HUNYUAN_VIDEO15_480P, HUNYUAN_VIDEO15_720P, HUNYUAN_VIDEO15_480P_I2V_STEP_DISTILLED]


@pytest.mark.parametrize("config", FULL_SIZE)
def test_full_size_model_is_diffusers_on_meta(config):
    """Built on meta without allocating (8.3B parameters), with diffusers' names and shapes for the same config."""
    model = build_on_meta(HunyuanVideo15Transformer, config)
    assert all(p.is_meta for p in model.parameters())
    with torch.device("meta"):
        reference = HunyuanVideo15Transformer3DModel(**{k: getattr(config, k) for k in config.__dataclass_fields__})
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes == {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    assert 8.3e9 < sum(p.numel() for p in model.parameters()) < 8.4e9
    assert HunyuanVideo15TransformerConfig.from_dict(dict(reference.config)) == config

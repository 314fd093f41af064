"""sgdiff's Qwen-Image transformer against diffusers' QwenImageTransformer2DModel on the same random weights."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

from sgdiff.models.loading import build_on_meta, load_own_model, read_json
from sgdiff.models.qwen_image import QwenImageTransformer, QwenImageTransformerConfig
from sgdiff.models.qwen_image.config import QWEN_IMAGE
from sgdiff.models.qwen_image.rope import position_ids, rope_table
from sgdiff.testing.compare import max_relative_error, randomize_weights, relative_error

TOLERANCE = 1e-5
TINY = dict(
    patch_size=2,
    in_channels=16,  # 4 latent channels, 2x2 patches packed
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
)
VARIANTS = {"qwen-image": {}, "zero-cond-t": {"zero_cond_t": True}}
# (batch, img_shapes of each item, text tokens): the noise grid first, then any edit input images' grids
CASES = {
    "non-square": (1, [(1, 3, 5)], 7),
    "batch-2": (2, [(1, 4, 6)], 5),
    "edit": (2, [(1, 4, 6), (1, 5, 3)], 9),
    "edit-plus": (1, [(1, 4, 4), (1, 3, 5), (1, 6, 2)], 6),
}


@pytest.fixture(params=list(VARIANTS), scope="module")
def saved_qwen(request, tmp_path_factory):
    torch.manual_seed(0)
    reference = QwenImageTransformer2DModel(**TINY, **VARIANTS[request.param])
    randomize_weights(reference, seed=1)  # no zero-initialised weight hides an error
    folder = tmp_path_factory.mktemp("qwen") / request.param
    reference.save_pretrained(folder)  # safetensors
    return folder


def load_ours(folder, dtype: torch.dtype) -> QwenImageTransformer:
    config = QwenImageTransformerConfig.from_dict(read_json(folder / "config.json"))
    return load_own_model(build_on_meta(QwenImageTransformer, config), folder, dtype, torch.device("cpu"))


@pytest.fixture(scope="module")
def both(saved_qwen):
    reference = QwenImageTransformer2DModel.from_pretrained(saved_qwen, dtype=torch.float32).eval()
    return load_ours(saved_qwen, torch.float32), reference


def inputs(batch: int, grids: list[tuple[int, int, int]], text_len: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = sum(math.prod(grid) for grid in grids)
    return dict(
        hidden_states=torch.randn(batch, tokens, TINY["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, TINY["joint_attention_dim"], generator=g),
        timestep=torch.tensor([0.83, 0.31][:batch]),  # sigma, as the pipelines pass it
        img_shapes=[grids] * batch,
    )


def run_both(ours, reference, x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return ours(**x), reference(**x, return_dict=False)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_transformer_matches_diffusers(both, case):
    ours, reference = both
    batch, grids, text_len = CASES[case]
    actual, expected = run_both(ours, reference, inputs(batch, grids, text_len))
    tokens = sum(math.prod(grid) for grid in grids)
    assert actual.shape == expected.shape == (batch, tokens, 4 * TINY["out_channels"])
    assert torch.isfinite(actual).all()
    assert max_relative_error(actual, expected) <= TOLERANCE
    assert relative_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_diffusers(saved_qwen, dtype):
    """diffusers' RMSNorm rounds twice in bf16/fp16 (the model's DiffusersRMSNorm too): the same numbers."""
    ours = load_ours(saved_qwen, dtype)
    reference = QwenImageTransformer2DModel.from_pretrained(saved_qwen, dtype=dtype).eval()
    x = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in inputs(*CASES["edit"]).items()}
    actual, expected = run_both(ours, reference, x)
    assert actual.dtype == dtype and torch.isfinite(actual).all()
    assert relative_error(actual, expected) <= 1e-3  # observed 0 on the CPU


def test_the_output_follows_the_text_and_the_timestep(both):
    """Parity means something only if the inputs move the output far beyond the tolerance."""
    ours, _ = both
    x = inputs(2, [(1, 4, 6), (1, 5, 3)], 9)
    other_text = inputs(2, [(1, 4, 6), (1, 5, 3)], 9, seed=1)["encoder_hidden_states"]
    with torch.no_grad():
        out = ours(**x)
        with_other_text = ours(**{**x, "encoder_hidden_states": other_text})
        at_other_time = ours(**{**x, "timestep": x["timestep"].flip(0)})
    assert relative_error(with_other_text, out) > 1000 * TOLERANCE
    assert relative_error(at_other_time, out) > 1000 * TOLERANCE


def test_rope_table_is_diffusers_own():
    grids, text_len = [(1, 5, 3), (1, 4, 7), (2, 2, 2)], 11
    img, txt = QwenEmbedRope(theta=10000, axes_dim=list(TINY["axes_dims_rope"]), scale_rope=True)(
        [grids], max_txt_seq_len=text_len, device=torch.device("cpu")
    )  # complex [S, D/2] each
    ours = torch.view_as_complex(rope_table(position_ids(grids, text_len, torch.device("cpu")), TINY["axes_dims_rope"]))
    assert torch.equal(ours, torch.cat([txt, img]))


def test_a_padded_batch_equals_its_prompts_run_alone(both):
    """diffusers masks a batch of prompts of unequal lengths; each prompt cut to its tokens and run alone
    gives the same, which is how a caller of this model (which refuses such a mask) gets it."""
    ours, reference = both
    grids, lengths = [(1, 4, 6)], (9, 4)
    x = inputs(2, grids, max(lengths))
    mask = torch.tensor([[1] * n + [0] * (max(lengths) - n) for n in lengths])
    x["encoder_hidden_states"] = x["encoder_hidden_states"] * mask[..., None]  # padded with zeros, as the pipelines do
    with torch.no_grad():
        expected = reference(**x, encoder_hidden_states_mask=mask, return_dict=False)[0]
        alone = [
            ours(
                x["hidden_states"][i : i + 1],
                x["encoder_hidden_states"][i : i + 1, :n],
                x["timestep"][i : i + 1],
                [grids],
            )
            for i, n in enumerate(lengths)
        ]
        unmasked = reference(**x, return_dict=False)[0]
    assert max_relative_error(torch.cat(alone), expected) <= TOLERANCE
    assert relative_error(unmasked[1], expected[1]) > 1000 * TOLERANCE  # the mask matters for the padded row
    with pytest.raises(ValueError, match="one per forward"):
        ours(**x, encoder_hidden_states_mask=mask)
    with torch.no_grad():
        assert torch.equal(ours(**x, encoder_hidden_states_mask=torch.ones_like(mask)), ours(**x))


def test_inconsistent_image_shapes_are_refused(both):
    ours, _ = both
    x = inputs(2, [(1, 4, 6)], 5)
    with pytest.raises(ValueError, match="make 20 tokens"):
        ours(**{**x, "img_shapes": [[(1, 4, 5)]] * 2})
    with pytest.raises(ValueError, match="same img_shapes"):
        ours(**{**x, "img_shapes": [[(1, 4, 6)], [(1, 6, 4)]]})


def test_loaded_model_has_every_weight_off_meta(both):
    ours, reference = both
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    assert ours.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name


def test_full_size_model_is_built_on_meta_without_allocating():
    model = build_on_meta(QwenImageTransformer, QWEN_IMAGE)  # Qwen-Image: 20B parameters, built instantly
    assert all(p.is_meta for p in model.parameters())
    assert 20e9 < sum(p.numel() for p in model.parameters()) < 21e9

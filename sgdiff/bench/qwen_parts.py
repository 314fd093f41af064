"""Qwen-Image's parts for `sgdiff bench` (parts.py dispatches here): the 20B MMDiT as diffusers'
QwenImageTransformer2DModel and sgdiff's QwenImageTransformer on the same tensors, Qwen2.5-VL-7B as both
pipelines run it (transformers' model; diffusers reads the whole model's last hidden state, sgdiff its base
model's, without the language-model head), and diffusers' AutoencoderKLQwenImage.

The prompt is 128 tokens of its own (a detailed prompt), inside the chat template: 34 template tokens before
it (dropped after encoding) and 5 after it (kept), so the transformer sees 133 text tokens. The Edit model is
Qwen-Image-Edit-2509-like (QwenImageEditPlusPipeline, one input image): the same transformer; the image goes
into the prompt at 384x384 pixels (392x392 after Qwen2-VL's resize to 28-pixel multiples: 28x28 patches of
14 pixels, 196 tokens after the 2x2 merge) behind "Picture 1: ", after a 64-token template prefix, and into
the transformer as 1024x1024 pixels of VAE latents whose 64x64 tokens follow the noise tokens. Not timed:
the Edit pipelines' VAE encoding of the input image (once per image, about a decode's cost).

GPU memory at full size (bf16), phase by phase as run.run_bench goes, each phase's models freed before the
next is built: the transformer, 40.9 GB (20.4B parameters, one copy for both implementations; 6.8 GB more
where --enable-fused-projections gives sgdiff's side concatenated copies of q/k/v), plus a forward's
activations, 1-2 GB at 4,229 tokens (Edit: 8,528), CUDA graphs' pools too: a peak of about 43 GB, 50 GB with
fused projections; then Qwen2.5-VL-7B, 16.6 GB (8.3B parameters, its vision tower included) plus well
under 1 GB; then the VAE, 0.25 GB plus a few GB of decoder activations at 1024x1024. So about 50 GB at
most, which fits an 80 GB H100 (all three phases at once would still fit: about 60 GB)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sgdiff.bench.parts import BenchModel, diffusers_kwargs, seeded
from sgdiff.families.qwen_image.edit_text import EDIT_TEMPLATE_PREFIX_TOKENS
from sgdiff.families.qwen_image.text import TEMPLATE_PREFIX_TOKENS, last_hidden_state
from sgdiff.models.loading import build_on_meta
from sgdiff.models.qwen_image import QwenImageTransformer, QwenImageTransformerConfig

PROMPT_TOKENS = 128  # the prompt's own tokens
TEMPLATE_SUFFIX_TOKENS = 5  # "<|im_end|>\n<|im_start|>assistant\n": kept with the prompt
PICTURE_TOKENS = 5  # "Picture 1: " before <|vision_start|>
VISION_GRID = (1, 28, 28)  # the Edit's condition image in Qwen2.5-VL's patches: (frames / 2, rows, columns)
SPATIAL_MERGE = 2  # Qwen2.5-VL merges 2x2 patches into one text token

# Qwen2.5-VL-7B-Instruct (Qwen-Image's text_encoder/config.json values)
QWEN25_VL_7B_TEXT: dict[str, Any] = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
    rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6},
    bos_token_id=151643, eos_token_id=151645)  # fmt: skip
QWEN25_VL_7B_VISION: dict[str, Any] = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
    out_hidden_size=3584, patch_size=14, spatial_merge_size=SPATIAL_MERGE, temporal_patch_size=2, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")  # fmt: skip
TINY_VOCAB = 1000
TINY_SPECIAL_IDS: dict[str, Any] = dict(
    vision_start_token_id=990, vision_end_token_id=991, image_token_id=992, video_token_id=993
)


def image_grids(model: BenchModel, size: dict) -> list[tuple[int, int, int]]:
    """(frames, rows, columns) of the noise tokens, then of each input image's (the output's size)."""
    return [(1, size["height"] // 16, size["width"] // 16)] * (1 + model.input_images)


def image_text_tokens(model: BenchModel) -> int:
    """The Edit prompt's tokens for its input images (none for text to image)."""
    frames, rows, cols = VISION_GRID
    return model.input_images * (PICTURE_TOKENS + 2 + frames * rows * cols // SPATIAL_MERGE**2)


def text_tokens(model: BenchModel) -> int:
    """The text tokens a transformer forward sees: 133 (Edit: 336)."""
    return image_text_tokens(model) + PROMPT_TOKENS + TEMPLATE_SUFFIX_TOKENS


def build_transformers(model: BenchModel, tiny: bool, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(diffusers' QwenImageTransformer2DModel, sgdiff's QwenImageTransformer on the same tensors), bf16."""
    import diffusers

    config = model.config
    if tiny:
        from sgdiff.testing.tiny_qwen_image import TRANSFORMER

        config = QwenImageTransformerConfig.from_dict(TRANSFORMER)
    kwargs = diffusers_kwargs(config)
    reference = seeded(0, torch.bfloat16, device, lambda: diffusers.QwenImageTransformer2DModel(**kwargs))
    ours = build_on_meta(QwenImageTransformer, config)
    # the same parameter names; neither model has buffers (diffusers' rotary tables are plain attributes)
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)  # the same tensors, not a copy
    return reference, ours.eval().requires_grad_(False)


def transformer_inputs(model: BenchModel, config, size: dict, g: torch.Generator, device: torch.device) -> dict:
    """One forward's inputs as diffusers' pipelines pass them: packed latents [1, S_img, 64] (the noise
    tokens, then the input image's), the prompt's embeddings [1, S_txt, 3584], sigma, the grids; no text
    mask (a single prompt is never padded: the pipelines pass None)."""
    bf16: dict[str, Any] = dict(device=device, dtype=torch.bfloat16)
    grids = image_grids(model, size)
    image_tokens = sum(rows * cols for _, rows, cols in grids)
    return dict(
        hidden_states=torch.randn(1, image_tokens, config.in_channels, generator=g, **bf16),
        encoder_hidden_states=torch.randn(1, text_tokens(model), config.joint_attention_dim, generator=g, **bf16),
        encoder_hidden_states_mask=None,
        timestep=torch.tensor([0.7], **bf16),  # sigma: the pipelines pass t / 1000
        img_shapes=[grids],
    )


def text_encoder_config(tiny: bool):
    """transformers' Qwen2_5_VLConfig: Qwen2.5-VL-7B, or the tests' tiny one (sgdiff/testing/tiny_qwen_image.py)
    with its vision tower of 4-pixel patches."""
    import transformers

    if not tiny:
        return transformers.Qwen2_5_VLConfig(text_config=QWEN25_VL_7B_TEXT, vision_config=QWEN25_VL_7B_VISION)
    from sgdiff.testing.tiny_qwen_image import EDIT_VISION_CONFIG, TEXT_CONFIG

    text = dict(TEXT_CONFIG, vocab_size=TINY_VOCAB, bos_token_id=0, eos_token_id=1)
    return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=EDIT_VISION_CONFIG, **TINY_SPECIAL_IDS)


def prompt_inputs(model: BenchModel, config, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token ids [1, L] of one templated prompt (random words; the Edit's image placeholders where the
    processor puts them) and, for the Edit, its image's pixel_values [784, 3 * 2 * patch^2] and grid."""
    prefix = EDIT_TEMPLATE_PREFIX_TOKENS if model.input_images else TEMPLATE_PREFIX_TOKENS
    vision: dict[str, torch.Tensor] = {}
    pieces = [("words", prefix)]
    if model.input_images:
        v = config.vision_config
        frames, rows, cols = VISION_GRID
        pixels = torch.randn(frames * rows * cols, 3 * v.temporal_patch_size * v.patch_size**2, device=device)
        vision = dict(pixel_values=pixels, image_grid_thw=torch.tensor([VISION_GRID], device=device))
        image = ("image_token_id", frames * rows * cols // SPATIAL_MERGE**2)
        pieces += [("words", PICTURE_TOKENS), ("vision_start_token_id", 1), image, ("vision_end_token_id", 1)]
    pieces.append(("words", PROMPT_TOKENS + TEMPLATE_SUFFIX_TOKENS))
    ids = [
        torch.randint(0, config.vision_start_token_id, (n,), device=device)  # below the special tokens
        if kind == "words"
        else torch.full((n,), getattr(config, kind), device=device)
        for kind, n in pieces
    ]
    return torch.cat(ids)[None], vision


def build_text_encoding(model: BenchModel, tiny: bool, device: torch.device) -> dict[str, Callable[[], Any]]:
    """One prompt through Qwen2.5-VL (the Edit's with its input image, whose 784 patches go through the vision
    tower): diffusers runs the whole model and reads hidden_states[-1]; sgdiff runs its base model (the same
    tensors) for the last hidden state. Each drops the template's prefix."""
    import transformers

    config = text_encoder_config(tiny)
    encoder = seeded(6, torch.bfloat16, device, lambda: transformers.Qwen2_5_VLForConditionalGeneration(config))
    ids, vision = prompt_inputs(model, config, device)
    mask = torch.ones_like(ids)
    prefix = EDIT_TEMPLATE_PREFIX_TOKENS if model.input_images else TEMPLATE_PREFIX_TOKENS

    def diffusers_encode():
        out = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, **vision)
        return out.hidden_states[-1][:, prefix:]

    return {
        "diffusers": diffusers_encode,
        "sgdiff": lambda: last_hidden_state(encoder, ids, mask, **vision)[:, prefix:],
    }


def build_decode(tiny: bool, size: dict, device: torch.device) -> Callable[[], Any]:
    """One image's latents [1, 16, 1, H/8, W/8] through diffusers' AutoencoderKLQwenImage in bf16, as the
    pipelines decode (they load it in the checkpoint's torch_dtype)."""
    import diffusers

    config: dict[str, Any] = {}
    if tiny:
        from sgdiff.testing.tiny_qwen_image import VAE

        config = VAE
    vae = seeded(7, torch.bfloat16, device, lambda: diffusers.AutoencoderKLQwenImage(**config))
    scale = 2 ** len(vae.config.temperal_downsample)
    z = torch.randn(1, vae.config.z_dim, 1, size["height"] // scale, size["width"] // scale,
                    device=device, dtype=torch.bfloat16)  # fmt: skip
    return lambda: vae.decode(z).sample

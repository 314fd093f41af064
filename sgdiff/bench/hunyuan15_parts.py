"""HunyuanVideo-1.5's parts for `sgdiff bench` (parts.py dispatches here): the 8.3B video DiT as diffusers'
HunyuanVideo15Transformer3DModel and sgdiff's HunyuanVideo15Transformer on the same tensors, Qwen2.5-VL-7B's
text model as both pipelines run it, and diffusers' AutoencoderKLHunyuanVideo15, tiled.

Text to video at 480p (848x480x121: 31x30x53 = 49,290 video tokens), CFG 6: two forwards a step. Each
forward gets what diffusers' pipeline passes it: a 128-token prompt padded to 1000 Qwen tokens, 256 ByT5
tokens all padding (nothing quoted), all-zero image embeddings and the masks; sgdiff's transformer cuts the
context to its valid tokens (models/hunyuan_video15/transformer.py), which its own pipeline passes cut
already. The text encoding: the same prompt after the template's 108 tokens; diffusers pads it to 108 +
1000 tokens and reads hidden_states[-3] of the whole text model, sgdiff encodes its own 236 tokens with a
model that stops at that layer (the same tensors). A prompt without quotes runs no ByT5 on either side.

GPU memory at full size (bf16), phase by phase as run.run_bench goes: the transformer 16.7 GB plus a
forward's activations at ~50k tokens; then Qwen2.5-VL-7B's text model, 15 GB; then the VAE."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sgdiff.bench.parts import BenchModel, diffusers_kwargs, seeded
from sgdiff.models.hunyuan_video15 import HunyuanVideo15Transformer, HunyuanVideo15TransformerConfig
from sgdiff.models.loading import build_on_meta
from sgdiff.pipeline.components import parameters_on_meta

PROMPT_TOKENS = 128  # the prompt's own Qwen tokens
TEXT_TOKENS = 1000  # diffusers pads the prompt to these (its tokenizer_max_length)
GLYPH_TOKENS = 256  # ByT5's padded length
IMAGE_TOKENS = 729  # SigLIP's tokens (all zero for text to video)
SPATIAL = 16  # the VAE's spatial compression (the transformer's patch is 1): the tiny one's too
TINY_VOCAB = 1000


def build_transformers(model: BenchModel, tiny: bool, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(diffusers' HunyuanVideo15Transformer3DModel, sgdiff's HunyuanVideo15Transformer on the same tensors), bf16."""
    import diffusers

    config = model.config
    if tiny:
        from sgdiff.testing.tiny_hunyuan_video15 import TRANSFORMER

        config = HunyuanVideo15TransformerConfig.from_dict(TRANSFORMER)
    kwargs = diffusers_kwargs(config)
    reference = seeded(0, torch.bfloat16, device, lambda: diffusers.HunyuanVideo15Transformer3DModel(**kwargs))
    ours = build_on_meta(HunyuanVideo15Transformer, config)
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)  # the same tensors, not a copy
    return reference, ours.eval().requires_grad_(False)


def latent_grid(size: dict, spatial: int) -> tuple[int, int, int]:
    return (size["frames"] - 1) // 4 + 1, size["height"] // spatial, size["width"] // spatial


def transformer_inputs(model: BenchModel, config, size: dict, g: torch.Generator, device: torch.device) -> dict:
    """One forward's inputs as diffusers' text-to-video pipeline passes them: the noise latents beside zero
    condition latents and mask [1, 65, F', H/16, W/16], the padded Qwen and ByT5 tokens with their masks, zero
    image embeddings, the timestep."""
    bf16: dict[str, Any] = dict(device=device, dtype=torch.bfloat16)
    latents = config.output_channels
    noise = torch.randn(1, latents, *latent_grid(size, SPATIAL), generator=g, **bf16)
    condition = torch.zeros(1, config.in_channels - latents, *noise.shape[2:], **bf16)
    valid = (torch.arange(TEXT_TOKENS, device=device) < PROMPT_TOKENS).long()[None]
    return dict(
        hidden_states=torch.cat([noise, condition], dim=1),
        timestep=torch.tensor([700.0], **bf16),
        encoder_hidden_states=torch.randn(1, TEXT_TOKENS, config.text_embed_dim, generator=g, **bf16),
        encoder_attention_mask=valid,
        encoder_hidden_states_2=torch.zeros(1, GLYPH_TOKENS, config.text_embed_2_dim, **bf16),
        encoder_attention_mask_2=torch.zeros(1, GLYPH_TOKENS, device=device, dtype=torch.int64),
        image_embeds=torch.zeros(1, IMAGE_TOKENS, config.image_embed_dim, **bf16),
    )


def text_config(tiny: bool, layers_dropped: int = 0):
    """transformers' Qwen2_5_VLTextConfig: Qwen2.5-VL-7B's text model, or a tiny one; `layers_dropped` from the end."""
    import transformers

    if tiny:
        from sgdiff.testing.tiny_qwen_image import TEXT_CONFIG

        fields: dict[str, Any] = dict(TEXT_CONFIG, vocab_size=TINY_VOCAB)
    else:
        from sgdiff.bench.qwen_parts import QWEN25_VL_7B_TEXT

        fields = dict(QWEN25_VL_7B_TEXT)
    fields["num_hidden_layers"] -= layers_dropped
    return transformers.Qwen2_5_VLTextConfig(**fields)


def build_text_encoding(model: BenchModel, tiny: bool, device: torch.device) -> dict[str, Callable[[], Any]]:
    """One prompt through Qwen2.5-VL-7B's text model (transformers' on both sides): diffusers pads the
    templated prompt to 108 + 1000 tokens (masked) and runs the whole model for hidden_states[-3]; sgdiff runs
    the prompt's own tokens through the layers up to that one (families/hunyuan_video15/text.py)."""
    import transformers

    from sgdiff.families.hunyuan_video15.text import CROP_START, HIDDEN_LAYERS_TO_SKIP

    qwen = seeded(6, torch.bfloat16, device, lambda: transformers.Qwen2_5_VLTextModel(text_config(tiny)))
    with parameters_on_meta():  # (its rotary buffers made as usual)
        cut: Any = transformers.Qwen2_5_VLTextModel(text_config(tiny, HIDDEN_LAYERS_TO_SKIP))
    kept = {name: t for name, t in qwen.state_dict().items() if name in cut.state_dict() and name != "norm.weight"}
    cut.load_state_dict(kept, strict=False, assign=True)  # the same tensors, not a copy
    cut.norm = torch.nn.Identity()
    cut = cut.to(device).eval().requires_grad_(False)
    prompt = torch.randint(0, TINY_VOCAB, (1, CROP_START + PROMPT_TOKENS), device=device)
    padded = torch.cat([prompt, torch.zeros(1, TEXT_TOKENS - PROMPT_TOKENS, dtype=prompt.dtype, device=device)], 1)
    padded_mask = (torch.arange(padded.shape[1], device=device) < prompt.shape[1])[None].long()

    def diffusers_encode():
        out = qwen(input_ids=padded, attention_mask=padded_mask, output_hidden_states=True)
        return out.hidden_states[-(HIDDEN_LAYERS_TO_SKIP + 1)][:, CROP_START:]

    def sgdiff_encode():
        hidden = cut(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=False).last_hidden_state
        return hidden[:, CROP_START:]

    return {"diffusers": diffusers_encode, "sgdiff": sgdiff_encode}


def build_decode(tiny: bool, size: dict, device: torch.device) -> Callable[[], Any]:
    """One video's latents [1, 32, F', H/16, W/16] through diffusers' AutoencoderKLHunyuanVideo15 in bf16, tiled
    (as both pipelines decode)."""
    import diffusers

    config: dict[str, Any] = {}
    if tiny:
        from sgdiff.testing.tiny_hunyuan_video15 import VAE

        config = VAE
    vae = seeded(9, torch.bfloat16, device, lambda: diffusers.AutoencoderKLHunyuanVideo15(**config))
    vae.enable_tiling()
    grid = latent_grid(size, vae.config.spatial_compression_ratio)
    z = torch.randn(1, vae.config.latent_channels, *grid, device=device, dtype=torch.bfloat16)
    return lambda: vae.decode(z).sample

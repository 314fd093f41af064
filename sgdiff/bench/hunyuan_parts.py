"""HunyuanVideo's parts for `sgdiff bench` (parts.py dispatches here): the 12.8B video DiT as diffusers'
HunyuanVideoTransformer3DModel and sgdiff's HunyuanVideoTransformer on the same tensors, the Llama 3 8B text
encoder as both pipelines run it, and diffusers' AutoencoderKLHunyuanVideo, tiled.

The transformer's inputs are one prompt's as diffusers' pipeline passes them: 256 text tokens (its
max_sequence_length, every one valid: a long prompt; a shorter one is padded there and cut to its tokens by
sgdiff, which only widens the gap) and the embedded guidance 6.0. At 1280x720x129 the video is 33x45x80 =
118,800 tokens: attention decides the forward's time. The text encoding: a 64-token prompt after the
template's 95 tokens; diffusers pads it to 95 + 256 tokens and reads hidden_states[-3] of the whole model,
sgdiff encodes its own 159 tokens with a model that stops at that layer (the same tensors).

GPU memory at full size (bf16), phase by phase as run.run_bench goes: the transformer 25.6 GB (12.8B
parameters, one copy for both implementations) plus a forward's activations, several GB at 118,800 tokens;
then Llama 3 8B, 15 GB, and CLIP-L; then the VAE, 0.5 GB plus its tiles' activations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sgdiff.bench.parts import CLIP_L, BenchModel, diffusers_kwargs, seeded
from sgdiff.models.hunyuan_video import HunyuanVideoTransformer, HunyuanVideoTransformerConfig
from sgdiff.models.loading import build_on_meta
from sgdiff.pipeline.components import parameters_on_meta

TEXT_TOKENS = 256  # the transformer's text tokens (the preset's max_sequence_length)
PROMPT_TOKENS = 64  # the text encoding's prompt
GUIDANCE = 6.0  # the preset's embedded guidance

# llava-llama-3-8b's language model (hunyuanvideo-community/HunyuanVideo text_encoder/config.json values)
LLAMA3_8B: dict[str, Any] = dict(vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "default", "rope_theta": 500000.0})  # fmt: skip
# diffusers' AutoencoderKLHunyuanVideo defaults are the checkpoint's
TINY_VOCAB = 1000


def build_transformers(model: BenchModel, tiny: bool, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(diffusers' HunyuanVideoTransformer3DModel, sgdiff's HunyuanVideoTransformer on the same tensors), bf16."""
    import diffusers

    config = model.config
    if tiny:
        from sgdiff.testing.tiny_hunyuan_video import TRANSFORMER

        config = HunyuanVideoTransformerConfig.from_dict(TRANSFORMER)
    kwargs = diffusers_kwargs(config)
    reference = seeded(0, torch.bfloat16, device, lambda: diffusers.HunyuanVideoTransformer3DModel(**kwargs))
    ours = build_on_meta(HunyuanVideoTransformer, config)
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)  # the same tensors, not a copy
    return reference, ours.eval().requires_grad_(False)


def transformer_inputs(model: BenchModel, config, size: dict, g: torch.Generator, device: torch.device) -> dict:
    """One forward's inputs as diffusers' pipeline passes them: latents [1, 16, F', H/8, W/8], 256 text tokens
    (all valid), the pooled CLIP text, the timestep and the embedded guidance (x 1000)."""
    bf16: dict[str, Any] = dict(device=device, dtype=torch.bfloat16)
    latent = ((size["frames"] - 1) // 4 + 1, size["height"] // 8, size["width"] // 8)
    return dict(
        hidden_states=torch.randn(1, config.in_channels, *latent, generator=g, **bf16),
        timestep=torch.tensor([700.0], **bf16),
        encoder_hidden_states=torch.randn(1, TEXT_TOKENS, config.text_embed_dim, generator=g, **bf16),
        encoder_attention_mask=torch.ones(1, TEXT_TOKENS, device=device, dtype=torch.int64),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g, **bf16),
        guidance=torch.tensor([GUIDANCE * 1000.0], **bf16),
    )


def llama_config(tiny: bool, layers_dropped: int = 0):
    """transformers' LlamaConfig: Llama 3 8B, or the tests' tiny one; `layers_dropped` from the end."""
    import transformers

    if tiny:
        from sgdiff.testing.tiny_hunyuan_video import TEXT_DIM

        fields: dict[str, Any] = dict(vocab_size=TINY_VOCAB, hidden_size=TEXT_DIM, intermediate_size=37,
                                      num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    else:
        fields = dict(LLAMA3_8B)
    fields["num_hidden_layers"] -= layers_dropped
    return transformers.LlamaConfig(**fields)


def build_text_encoding(model: BenchModel, tiny: bool, device: torch.device) -> dict[str, Callable[[], Any]]:
    """One prompt through Llama 3 8B and CLIP-L (transformers' models on both sides): diffusers pads the
    templated prompt to 95 + 256 tokens (masked) and runs the whole model for hidden_states[-3]; sgdiff runs
    the prompt's own tokens through the layers up to that one (families/hunyuan_video/text.py)."""
    import transformers

    from sgdiff.families.hunyuan_video.text import CROP_START, HIDDEN_LAYERS_TO_SKIP

    llama = seeded(8, torch.bfloat16, device, lambda: transformers.LlamaModel(llama_config(tiny)))
    with parameters_on_meta():  # (its rotary buffers made as usual)
        cut: Any = transformers.LlamaModel(llama_config(tiny, HIDDEN_LAYERS_TO_SKIP))
    kept = {name: t for name, t in llama.state_dict().items() if name in cut.state_dict() and name != "norm.weight"}
    cut.load_state_dict(kept, strict=False, assign=True)  # the same tensors, not a copy
    cut.norm = torch.nn.Identity()
    cut = cut.to(device).eval().requires_grad_(False)
    clip_config: dict[str, Any] = dict(CLIP_L)
    if tiny:
        from sgdiff.testing.tiny_configs import FLUX_CLIP

        clip_config = dict(FLUX_CLIP, vocab_size=TINY_VOCAB, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    clip = seeded(1, torch.bfloat16, device, lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(
        **clip_config)))  # fmt: skip
    vocab = llama.config.vocab_size
    prompt = torch.randint(0, vocab, (1, CROP_START + PROMPT_TOKENS), device=device)
    padded = torch.cat([prompt, torch.zeros(1, TEXT_TOKENS - PROMPT_TOKENS, dtype=prompt.dtype, device=device)], 1)
    padded_mask = (torch.arange(padded.shape[1], device=device) < prompt.shape[1])[None].long()
    clip_ids = torch.randint(0, clip.config.vocab_size, (1, 77), device=device)

    def diffusers_encode():
        out = llama(input_ids=padded, attention_mask=padded_mask, output_hidden_states=True)
        return out.hidden_states[-(HIDDEN_LAYERS_TO_SKIP + 1)][:, CROP_START:], clip(clip_ids).pooler_output

    def sgdiff_encode():
        hidden = cut(input_ids=prompt, attention_mask=torch.ones_like(prompt), use_cache=False).last_hidden_state
        return hidden[:, CROP_START:], clip(clip_ids).pooler_output

    return {"diffusers": diffusers_encode, "sgdiff": sgdiff_encode}


def build_decode(tiny: bool, size: dict, device: torch.device) -> Callable[[], Any]:
    """One video's latents [1, 16, F', H/8, W/8] through diffusers' AutoencoderKLHunyuanVideo in bf16, tiled
    (both pipelines decode so: families/hunyuan_video/decoding.py)."""
    import diffusers

    config: dict[str, Any] = {}
    if tiny:
        from sgdiff.testing.tiny_hunyuan_video import VAE

        config = VAE
    vae = seeded(9, torch.bfloat16, device, lambda: diffusers.AutoencoderKLHunyuanVideo(**config))
    vae.enable_tiling()
    latent = ((size["frames"] - 1) // 4 + 1, size["height"] // 8, size["width"] // 8)
    z = torch.randn(1, vae.config.latent_channels, *latent, device=device, dtype=torch.bfloat16)
    return lambda: vae.decode(z).sample

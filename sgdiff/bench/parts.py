"""The models `sgdiff bench` builds: full-size architectures with random weights (speed does not
depend on weight values), or tiny ones (--tiny) to check the benchmark itself on a CPU.

Each transformer is built once as diffusers' model; sgdiff's gets the very same tensors (no copy), and so
do FLUX's text encoders (transformers' for diffusers, sgdiff's own). Wan's text encoder (transformers' UMT5)
and the VAEs (diffusers') are timed once for both pipelines. Qwen-Image's and the HunyuanVideo models' parts are in
qwen_parts.py, hunyuan_parts.py and hunyuan15_parts.py (own_parts)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch

from sgdiff.families.qwen_image.pipeline import norm_kept_guidance
from sgdiff.models.flux import FluxTransformer, FluxTransformerConfig
from sgdiff.models.flux.config import FLUX_DEV, FLUX_SCHNELL
from sgdiff.models.flux.packing import image_position_ids, text_position_ids
from sgdiff.models.hunyuan_video import HUNYUAN_VIDEO
from sgdiff.models.hunyuan_video15.config import HUNYUAN_VIDEO15_480P
from sgdiff.models.loading import build_on_meta
from sgdiff.models.qwen_image.config import QWEN_IMAGE
from sgdiff.models.text import ClipTextConfig, ClipTextEncoder, T5Encoder, T5EncoderConfig
from sgdiff.models.wan import WanTransformer, WanTransformerConfig
from sgdiff.models.wan.config import WAN21_T2V_1_3B, WAN21_T2V_14B
from sgdiff.models.wan.transformer import KEEP_FP32
from sgdiff.testing import tiny_configs

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Full-size shapes of the text encoders and VAEs (the checkpoints' config.json values).
CLIP_L: dict[str, Any] = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)  # fmt: skip
T5_XXL: dict[str, Any] = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, vocab_size=32128,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, is_encoder_decoder=False)  # fmt: skip
UMT5_XXL: dict[str, Any] = dict(T5_XXL, vocab_size=256384)
FLUX_VAE: dict[str, Any] = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=16,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                use_quant_conv=False, use_post_quant_conv=False,
                scaling_factor=0.3611, shift_factor=0.1159)  # fmt: skip

# Qwen-Image: true CFG, its combination rescaled to the prompt branch's norm (as both pipelines guide)
QWEN: dict[str, Any] = dict(guide=norm_kept_guidance)
NO_HUNYUAN_E2E = (
    "the bench writes no HunyuanVideo checkpoint yet; without --e2e it times the forward, text encoding and decode"
)
NO_EDIT_E2E = (
    "the bench writes no Edit checkpoint nor input image yet (qwen-image --e2e runs the same transformer); "
    "without --e2e it times the forward, step, text encoding and decode"
)


@dataclass(frozen=True)
class BenchModel:
    name: str
    family: str  # the model family's registered name: "flux", "wan", "qwen_image" or "hunyuan_video"
    config: Any  # the sgdiff transformer config at full size
    height: int
    width: int
    frames: int | None  # video models
    steps: int  # the preset's
    forwards_per_step: int  # 2 with CFG (Wan, Qwen-Image's true CFG), 1 for embedded guidance (FLUX.1, HunyuanVideo)
    input_images: int = 0  # images whose tokens join the noise tokens (the Edit models), each the output's size
    guide: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] | None = None  # CFG's combination (None:
    # the usual one, run.guided_velocity)
    no_e2e: str | None = None  # why --e2e does not run it


BENCH_MODELS = {
    m.name: m
    for m in (
        BenchModel("flux.1-dev", "flux", FLUX_DEV, 1024, 1024, None, 28, 1),
        BenchModel("flux.1-schnell", "flux", FLUX_SCHNELL, 1024, 1024, None, 4, 1),
        BenchModel("wan2.1-t2v-1.3b", "wan", WAN21_T2V_1_3B, 480, 832, 81, 50, 2),
        BenchModel("wan2.1-t2v-14b", "wan", WAN21_T2V_14B, 480, 832, 81, 50, 2),
        BenchModel("qwen-image", "qwen_image", QWEN_IMAGE, 1024, 1024, None, 50, 2, **QWEN),
        # Qwen-Image-Edit-2509-like: one 1024x1024 input image, its 64x64 tokens after the noise tokens
        BenchModel(
            "qwen-image-edit",
            "qwen_image",
            QWEN_IMAGE,
            1024,
            1024,
            None,
            50,
            2,
            input_images=1,
            no_e2e=NO_EDIT_E2E,
            **QWEN,
        ),
        BenchModel("hunyuanvideo", "hunyuan_video", HUNYUAN_VIDEO, 720, 1280, 129, 50, 1, no_e2e=NO_HUNYUAN_E2E),
        # 480p text to video, CFG 6: two forwards a step
        BenchModel(
            "hunyuanvideo-1.5", "hunyuan_video15", HUNYUAN_VIDEO15_480P, 480, 848, 121, 50, 2, no_e2e=NO_HUNYUAN_E2E
        ),
    )
}
# --tiny: the tests' tiny architectures (sgdiff/testing/tiny_configs.py)
TINY_FLUX = FluxTransformerConfig.from_dict(tiny_configs.FLUX_TRANSFORMER)
TINY_WAN = WanTransformerConfig.from_dict(tiny_configs.WAN_TRANSFORMER)
TINY_SIZE = dict(height=64, width=64, frames=5)


OWN_PARTS = {"qwen_image": "qwen_parts", "hunyuan_video": "hunyuan_parts", "hunyuan_video15": "hunyuan15_parts"}


def own_parts(model: BenchModel) -> ModuleType | None:
    """The module holding a family's parts where they are its own (build_transformers, transformer_inputs,
    build_text_encoding, build_decode); None for FLUX and Wan, built here."""
    module = OWN_PARTS.get(model.family)
    return importlib.import_module(f"sgdiff.bench.{module}") if module else None


def seeded(seed: int, dtype: torch.dtype, device: torch.device, make: Callable[[], torch.nn.Module]):
    """A module built by `make` on `device` in `dtype` from its own seed, in eval mode, no grads."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                module = make()
        finally:
            torch.set_default_dtype(previous)
    return module.eval().requires_grad_(False)


def diffusers_kwargs(config) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in fields(config)}


def build_transformers(model: BenchModel, tiny: bool, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(diffusers' transformer, sgdiff's transformer on the same tensors), bf16."""
    import diffusers

    if (own := own_parts(model)) is not None:
        return own.build_transformers(model, tiny, device)
    config = model.config
    if tiny:
        guidance = dict(guidance_embeds=model.config.guidance_embeds) if model.family == "flux" else {}
        config = replace(TINY_FLUX if model.family == "flux" else TINY_WAN, **guidance)
    kwargs = diffusers_kwargs(config)
    ours: FluxTransformer | WanTransformer
    if model.family == "flux":
        reference = seeded(0, torch.bfloat16, device, lambda: diffusers.FluxTransformer2DModel(**kwargs))
        ours = build_on_meta(FluxTransformer, config)
    else:
        reference = seeded(0, torch.bfloat16, device, lambda: diffusers.WanTransformer3DModel(**kwargs))
        for name, param in reference.named_parameters():  # what from_pretrained(dtype=bf16) keeps in float32
            if set(name.split(".")) & set(KEEP_FP32):
                param.data = param.data.float()
        ours = build_on_meta(WanTransformer, config)
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)  # the same tensors, not a copy
    return reference, ours.eval().requires_grad_(False)


def transformer_inputs(model: BenchModel, transformer, size: dict, device: torch.device, seed: int) -> dict:
    """One forward's inputs, the same for both implementations (keyword names are diffusers')."""
    config = transformer.config
    g = torch.Generator(device).manual_seed(seed)
    bf16: dict[str, Any] = dict(device=device, dtype=torch.bfloat16)
    if (own := own_parts(model)) is not None:
        return own.transformer_inputs(model, config, size, g, device)
    if model.family == "flux":
        rows, cols = size["height"] // 16, size["width"] // 16
        return dict(
            hidden_states=torch.randn(1, rows * cols, config.in_channels, generator=g, **bf16),
            encoder_hidden_states=torch.randn(1, 512, config.joint_attention_dim, generator=g, **bf16),
            pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g, **bf16),
            timestep=torch.tensor([0.7], **bf16),
            img_ids=image_position_ids(rows, cols).to(**bf16),
            txt_ids=text_position_ids(512).to(**bf16),
            guidance=torch.tensor([3.5], device=device) if config.guidance_embeds else None,
        )
    latent = ((size["frames"] - 1) // 4 + 1, size["height"] // 8, size["width"] // 8)
    return dict(
        hidden_states=torch.randn(1, config.in_channels, *latent, generator=g, **bf16),
        timestep=torch.tensor([500.0], device=device),
        encoder_hidden_states=torch.randn(1, 512, config.text_dim, generator=g, **bf16),
    )


def sgdiff_text_encoder(reference: PreTrainedModel) -> torch.nn.Module:
    """sgdiff's text encoder on the very tensors of transformers' `reference` (CLIPTextModel, T5EncoderModel
    or UMT5EncoderModel), no copy."""
    raw = reference.config.to_dict()
    state = reference.state_dict()
    ours: ClipTextEncoder | T5Encoder
    if raw.get("model_type") == "clip_text_model":
        ours = build_on_meta(ClipTextEncoder, ClipTextConfig.from_dict(raw))
        ours.text_model.load_state_dict(state, strict=True, assign=True)  # transformers 5's names: no `text_model.`
    else:
        ours = build_on_meta(T5Encoder, T5EncoderConfig.from_dict(raw))
        tied = {name for name in state if name.startswith("encoder.embed_tokens.")}  # `shared`, again
        ours.load_state_dict({k: v for k, v in state.items() if k not in tied}, strict=True, assign=True)
    return ours.eval().requires_grad_(False)


def build_text_encoding(model: BenchModel, tiny: bool, device: torch.device) -> dict[str, Callable[[], Any]]:
    """Per implementation, a call that encodes one prompt as its pipeline does (FLUX: CLIP-L 77 tokens + T5-XXL
    512, transformers' models for diffusers and sgdiff's own on the same tensors; Wan: UMT5-XXL 512,
    transformers' for both: only "diffusers" is given; Qwen-Image, HunyuanVideo: their own_parts), bf16."""
    import transformers

    if (own := own_parts(model)) is not None:
        return own.build_text_encoding(model, tiny, device)
    bf16 = torch.bfloat16
    if model.family == "flux":
        tiny_ids = dict(vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1)
        clip_config = dict(tiny_configs.FLUX_CLIP, **tiny_ids) if tiny else CLIP_L
        t5_config = dict(tiny_configs.FLUX_T5, vocab_size=1000) if tiny else T5_XXL
        clip = seeded(1, bf16, device, lambda: transformers.CLIPTextModel(transformers.CLIPTextConfig(**clip_config)))
        t5 = seeded(2, bf16, device, lambda: transformers.T5EncoderModel(transformers.T5Config(**t5_config)))
        clip_ids = torch.randint(0, clip_config["vocab_size"], (1, 77), device=device)
        t5_ids = torch.randint(0, t5_config["vocab_size"], (1, 512), device=device)
        own_clip, own_t5 = sgdiff_text_encoder(clip), sgdiff_text_encoder(t5)
        return {
            "diffusers": lambda: (clip(clip_ids).pooler_output, t5(t5_ids).last_hidden_state),
            "sgdiff": lambda: (own_clip(clip_ids).pooler_output, own_t5(t5_ids).last_hidden_state),
        }
    umt5_config = dict(tiny_configs.WAN_UMT5, vocab_size=1000) if tiny else UMT5_XXL
    umt5 = seeded(3, bf16, device, lambda: transformers.UMT5EncoderModel(transformers.UMT5Config(**umt5_config)))
    ids = torch.randint(0, umt5_config["vocab_size"], (1, 512), device=device)
    return {"diffusers": lambda: umt5(ids).last_hidden_state}


def build_decode(model: BenchModel, tiny: bool, size: dict, device: torch.device) -> Callable[[], Any]:
    """A call that decodes one output's latents as the pipelines do (FLUX and Qwen-Image VAEs in bf16; Wan VAE
    in float32)."""
    import diffusers

    if (own := own_parts(model)) is not None:
        return own.build_decode(tiny, size, device)
    if model.family == "flux":
        config = tiny_configs.FLUX_VAE if tiny else FLUX_VAE
        vae = seeded(4, torch.bfloat16, device, lambda: diffusers.AutoencoderKL(**config))
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        z = torch.randn(1, vae.config.latent_channels, size["height"] // scale, size["width"] // scale,
                        device=device, dtype=torch.bfloat16)  # fmt: skip
        return lambda: vae.decode(z).sample
    config = tiny_configs.WAN21_VAE if tiny else {}
    vae = seeded(5, torch.float32, device, lambda: diffusers.AutoencoderKLWan(**config))
    scale = 2 ** (len(vae.config.dim_mult) - 1)
    latent = ((size["frames"] - 1) // 4 + 1, size["height"] // scale, size["width"] // scale)
    z = torch.randn(1, vae.config.z_dim, *latent, device=device)
    return lambda: vae.decode(z).sample

"""HunyuanVideo text-to-video: Llama 3 and CLIP text (through transformers and sgdiff's CLIP), sgdiff's
HunyuanVideo transformer with embedded guidance (and true CFG against a negative prompt), Euler steps at the
checkpoint's fixed shift, diffusers' HunyuanVideo VAE; as diffusers' HunyuanVideoPipeline runs them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sgdiff.families.hunyuan_video.decoding import HunyuanVideoDecodingStage, load_hunyuan_video_vae
from sgdiff.families.hunyuan_video.sampling import (
    HunyuanVideoSampling,
    hunyuan_video_rules,
    spatial_factor,
    true_cfg_scale_of,
)
from sgdiff.families.hunyuan_video.schedule import HunyuanVideoTimestepsStage
from sgdiff.families.hunyuan_video.text import (
    HunyuanPromptEncoder,
    LlamaPromptEncoder,
    load_llama_text_encoder,
    load_llama_tokenizer,
)
from sgdiff.models.hunyuan_video import HunyuanVideoTransformer, HunyuanVideoTransformerConfig
from sgdiff.models.loading import build_on_meta, load_own_model, read_json
from sgdiff.pipeline.base import ComposedPipeline, PipelineEvents, State
from sgdiff.pipeline.components import load_side_by_side, load_tokenizer, loaded_modules
from sgdiff.pipeline.schedule import FlowMatchSchedule
from sgdiff.pipeline.stages.denoising import DenoisingStage
from sgdiff.pipeline.stages.latents import LatentsStage
from sgdiff.pipeline.stages.text_encoding import EncodedTexts, TextEncodingStage, encode_ahead
from sgdiff.pipeline.stages.validation import InputValidationStage
from sgdiff.pipeline.text_encoders import ClipPooledEncoder, load_clip_text_encoder

TEXT_PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")


class HunyuanVideoGeometry:
    """Video size <-> latents, as diffusers' prepare_latents: [N, C, (F - 1) // 4 + 1, H / 8, W / 8]."""

    def __init__(self, vae_config: dict[str, Any], latent_channels: int):
        self.spatial = spatial_factor(vae_config)
        self.temporal = int(vae_config.get("temporal_compression_ratio", 4))
        self.latent_channels = latent_channels

    def noise_shape(self, params: HunyuanVideoSampling) -> tuple[int, ...]:
        frames = (params.num_frames - 1) // self.temporal + 1
        size = (params.height // self.spatial, params.width // self.spatial)
        return (params.num_outputs_per_prompt, self.latent_channels, frames, *size)

    @staticmethod
    def as_latents(noise: torch.Tensor, params: HunyuanVideoSampling) -> tuple[torch.Tensor, dict]:
        return noise, {}  # the transformer patchifies the latents itself


class HunyuanVideoDenoiser:
    def __init__(self, transformer: HunyuanVideoTransformer):
        self.transformer = transformer
        self.dtype = next(transformer.parameters()).dtype

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, inputs: dict, state: State) -> torch.Tensor:
        batch = latents.shape[0]
        # as diffusers: the timestep in the latents' dtype (float32 at the first step, the model's after it: an
        # Euler step returns the velocity's dtype), the guidance scale in the model's, times 1000
        timestep = t.expand(batch).to(latents.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            scale = torch.full((batch,), state.params.guidance_scale, dtype=self.dtype, device=latents.device)
            guidance = scale * 1000.0
        return self.transformer(
            hidden_states=latents.to(self.dtype),
            timestep=timestep,
            encoder_hidden_states=inputs["encoder_hidden_states"],
            pooled_projections=inputs["pooled_projections"],
            guidance=guidance,
        )


@dataclass
class HunyuanVideoComponents:
    """The loaded parts of a HunyuanVideo checkpoint (diffusers' component names)."""

    tokenizer: Any  # Llama 3's
    text_encoder: torch.nn.Module | None  # transformers' LlamaModel, cut after the layer read (None: not loaded)
    tokenizer_2: Any  # CLIP's
    text_encoder_2: torch.nn.Module | None  # sgdiff's ClipTextEncoder
    transformer: HunyuanVideoTransformer
    vae: Any  # diffusers' AutoencoderKLHunyuanVideo (its decoder), tiling on
    encoded_prompts: EncodedTexts = field(default_factory=dict)  # the texts encoded while the rest loaded


def hunyuan_prompt_encoder(
    dtype: torch.dtype, tokenizer: Any, text_encoder: Any, tokenizer_2: Any, text_encoder_2: Any
) -> HunyuanPromptEncoder:
    llama = LlamaPromptEncoder(tokenizer, text_encoder)
    return HunyuanPromptEncoder(llama, ClipPooledEncoder(tokenizer_2, text_encoder_2), dtype)


def load_hunyuan_video_components(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    events: PipelineEvents,
    skip: frozenset[str] = frozenset(),
    ahead: Sequence[HunyuanVideoSampling] = (),
) -> HunyuanVideoComponents:
    """`skip`: component names not to load (None in their place), e.g. the text encoders on ranks that receive
    the prompt embeddings from rank 0. `ahead`: requests to come, whose prompts are encoded as soon as the text
    encoders are loaded, while the transformer still loads."""
    index = read_json(model_dir / "model_index.json")
    config = HunyuanVideoTransformerConfig.from_dict(read_json(model_dir / "transformer" / "config.json"))
    unless_skipped = lambda name, load: None if name in skip else load  # noqa: E731  (None: not loaded)
    parts = load_side_by_side(events, device, {
        "tokenizer": lambda: load_llama_tokenizer(model_dir / "tokenizer"),
        "text_encoder": unless_skipped(
            "text_encoder", lambda: load_llama_text_encoder(index, model_dir / "text_encoder", dtype, device)
        ),
        "tokenizer_2": lambda: load_tokenizer(model_dir / "tokenizer_2"),
        "text_encoder_2": unless_skipped(
            "text_encoder_2", lambda: load_clip_text_encoder(model_dir / "text_encoder_2", dtype, device)
        ),
        "transformer": lambda: load_own_model(
            build_on_meta(HunyuanVideoTransformer, config), model_dir / "transformer", dtype, device
        ),
        "vae": lambda: load_hunyuan_video_vae(model_dir / "vae", dtype, device),
    }, followers={
        "prompt embeddings": (TEXT_PARTS, lambda text: encode_ahead(
            hunyuan_prompt_encoder(dtype, **text), true_cfg_scale_of, ahead
        )),
    } if ahead and not skip & set(TEXT_PARTS) else None)  # fmt: skip
    encoded = parts.pop("prompt embeddings", None) or {}
    return HunyuanVideoComponents(**parts, encoded_prompts=encoded)


def compose_hunyuan_video_pipeline(parts: HunyuanVideoComponents, schedule: FlowMatchSchedule) -> ComposedPipeline:
    """The stages of HunyuanVideo text-to-video over already-loaded parts."""
    config = parts.transformer.config
    vae_config = dict(parts.vae.config)
    dtype = next(parts.transformer.parameters()).dtype
    geometry = HunyuanVideoGeometry(vae_config, config.in_channels)
    text = hunyuan_prompt_encoder(dtype, *(getattr(parts, name) for name in TEXT_PARTS))
    stages = [
        InputValidationStage(hunyuan_video_rules({"patch_size": config.patch_size}, vae_config)),
        TextEncodingStage(text, true_cfg_scale_of, parts.encoded_prompts),
        HunyuanVideoTimestepsStage(schedule),
        # float32 noise, as diffusers' prepare_latents draws it whatever the model's dtype
        LatentsStage(geometry.noise_shape, geometry.as_latents, noise_dtype=torch.float32),
        DenoisingStage(HunyuanVideoDenoiser(parts.transformer)),
        HunyuanVideoDecodingStage(parts.vae),
    ]
    return ComposedPipeline("hunyuan_video", stages, [parts.transformer], loaded_modules(parts))


def load_hunyuan_video_pipeline(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    schedule: FlowMatchSchedule,
    events: PipelineEvents,
    skip: frozenset[str] = frozenset(),
    ahead: Sequence[HunyuanVideoSampling] = (),
) -> ComposedPipeline:
    parts = load_hunyuan_video_components(model_dir, device, dtype, events, skip, ahead)
    return compose_hunyuan_video_pipeline(parts, schedule)

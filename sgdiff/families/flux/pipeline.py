"""FLUX.1 text-to-image: CLIP (pooled) + T5 text, our FLUX transformer, the FLUX VAE."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from sgdiff.families.flux.sampling import FluxSampling, flux_rules, true_cfg_scale_of
from sgdiff.models.flux import FluxTransformer, FluxTransformerConfig
from sgdiff.models.flux.packing import image_position_ids, pack_latents, text_position_ids, unpack_latents
from sgdiff.models.image_vae import ImageVaeConfig, ImageVaeDecoder
from sgdiff.models.loading import build_on_meta, load_own_model, read_json
from sgdiff.pipeline.base import ComposedPipeline, PipelineEvents, State
from sgdiff.pipeline.components import load_side_by_side, load_tokenizer, loaded_modules
from sgdiff.pipeline.schedule import FlowMatchSchedule
from sgdiff.pipeline.stages.decoding import VaeDecodingStage
from sgdiff.pipeline.stages.denoising import DenoisingStage
from sgdiff.pipeline.stages.latents import LatentsStage
from sgdiff.pipeline.stages.text_encoding import EncodedTexts, TextEncodingStage, encode_ahead
from sgdiff.pipeline.stages.timesteps import FlowMatchTimestepsStage
from sgdiff.pipeline.stages.validation import InputValidationStage
from sgdiff.pipeline.text_encoders import (
    ClipPooledEncoder,
    T5SequenceEncoder,
    load_clip_text_encoder,
    load_t5_encoder,
)


class FluxLatentGeometry:
    """Image size <-> latent grid for a VAE that downsamples by `vae_scale_factor`."""

    def __init__(self, vae_scale_factor: int, latent_channels: int):
        self.vae_scale_factor = vae_scale_factor
        self.latent_channels = latent_channels

    def latent_size(self, params: FluxSampling) -> tuple[int, int]:
        step = self.vae_scale_factor * 2  # the VAE, then 2x2 packing
        return 2 * (params.height // step), 2 * (params.width // step)

    def image_seq_len(self, params: FluxSampling) -> int:
        h, w = self.latent_size(params)
        return (h // 2) * (w // 2)

    def noise_shape(self, params: FluxSampling) -> tuple[int, ...]:
        return (params.num_outputs_per_prompt, self.latent_channels, *self.latent_size(params))

    def pack(self, noise: torch.Tensor, params: FluxSampling) -> tuple[torch.Tensor, dict]:
        h, w = self.latent_size(params)
        img_ids = image_position_ids(h // 2, w // 2).to(device=noise.device, dtype=noise.dtype)
        return pack_latents(noise), {"img_ids": img_ids}

    def unpack(self, tokens: torch.Tensor, params: FluxSampling) -> torch.Tensor:
        return unpack_latents(tokens, *self.latent_size(params))


class FluxPromptEncoder:
    def __init__(self, clip: ClipPooledEncoder, t5: T5SequenceEncoder, dtype: torch.dtype):
        self.clip, self.t5, self.dtype = clip, t5, dtype

    def __call__(self, prompts: list[str], params: FluxSampling) -> dict[str, torch.Tensor]:
        pooled = self.clip(prompts).to(self.dtype)
        sequence = self.t5(prompts, params.max_sequence_length).to(self.dtype)
        return {"pooled_projections": pooled, "encoder_hidden_states": sequence}


class FluxDenoiser:
    def __init__(self, transformer: FluxTransformer):
        self.transformer = transformer

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, inputs: dict, state: State) -> torch.Tensor:
        batch, text = latents.shape[0], inputs["encoder_hidden_states"]
        # as diffusers: the timestep (sigma * 1000) rounded to the model dtype, then back to [0, 1]
        timestep = t.expand(batch).to(latents.dtype) / 1000
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), state.params.guidance_scale, device=latents.device, dtype=torch.float32)
        txt_ids = text_position_ids(text.shape[1]).to(device=latents.device, dtype=latents.dtype)
        return self.transformer(
            latents,
            text,
            inputs["pooled_projections"],
            timestep,
            img_ids=inputs["img_ids"],
            txt_ids=txt_ids,
            guidance=guidance,
        )


VAE_UNUSED = ("encoder", "quant_conv")  # checkpoint tensors of the VAE's encoding half


@dataclass
class FluxComponents:
    """The loaded parts of a FLUX.1 checkpoint (diffusers' component names)."""

    tokenizer: Any
    text_encoder: torch.nn.Module | None  # sgdiff's ClipTextEncoder (None where not loaded)
    tokenizer_2: Any
    text_encoder_2: torch.nn.Module | None  # sgdiff's T5Encoder
    transformer: FluxTransformer
    vae: ImageVaeDecoder
    encoded_prompts: EncodedTexts = field(default_factory=dict)  # the texts encoded while the rest loaded


TEXT_PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")


def flux_prompt_encoder(
    dtype: torch.dtype, tokenizer: Any, text_encoder: Any, tokenizer_2: Any, text_encoder_2: Any
) -> FluxPromptEncoder:
    clip = ClipPooledEncoder(tokenizer, text_encoder)
    return FluxPromptEncoder(clip, T5SequenceEncoder(tokenizer_2, text_encoder_2), dtype)


def load_flux_components(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    events: PipelineEvents,
    skip: frozenset[str] = frozenset(),
    ahead: Sequence[FluxSampling] = (),
) -> FluxComponents:
    """`skip`: component names not to load (None in their place), e.g. the text encoders on ranks that
    receive the prompt embeddings from rank 0. `ahead`: requests to come, whose prompts are encoded as
    soon as the text encoders are loaded, while the transformer still loads."""
    config = FluxTransformerConfig.from_dict(read_json(model_dir / "transformer" / "config.json"))
    vae_config_path = model_dir / "vae" / "config.json"
    vae_config = ImageVaeConfig.from_dict(read_json(vae_config_path), source=str(vae_config_path))
    unless_skipped = lambda name, load: None if name in skip else load  # noqa: E731  (None: not loaded)
    parts = load_side_by_side(events, device, {
        "tokenizer": lambda: load_tokenizer(model_dir / "tokenizer"),
        "text_encoder": unless_skipped(
            "text_encoder", lambda: load_clip_text_encoder(model_dir / "text_encoder", dtype, device)
        ),
        "tokenizer_2": lambda: load_tokenizer(model_dir / "tokenizer_2"),
        "text_encoder_2": unless_skipped(
            "text_encoder_2", lambda: load_t5_encoder(model_dir / "text_encoder_2", dtype, device)
        ),
        "transformer": lambda: load_own_model(
            build_on_meta(FluxTransformer, config), model_dir / "transformer", dtype, device
        ),
        "vae": lambda: load_own_model(  # the encoder is never run: its weights stay unread
            build_on_meta(ImageVaeDecoder, vae_config), model_dir / "vae", dtype, device, ignored=VAE_UNUSED
        ),
    }, followers={
        "prompt embeddings": (TEXT_PARTS, lambda text: encode_ahead(
            flux_prompt_encoder(dtype, **text), true_cfg_scale_of, ahead
        )),
    } if ahead and not skip & set(TEXT_PARTS) else None)  # fmt: skip
    encoded = parts.pop("prompt embeddings", None) or {}
    return FluxComponents(**parts, encoded_prompts=encoded)


def compose_flux_pipeline(parts: FluxComponents, schedule: FlowMatchSchedule) -> ComposedPipeline:
    """The stages of FLUX.1 text-to-image over already-loaded parts."""
    config = parts.transformer.config
    dtype = next(parts.transformer.parameters()).dtype
    geometry = FluxLatentGeometry(2 ** (len(parts.vae.config.block_out_channels) - 1), config.in_channels // 4)
    stages = [
        InputValidationStage(flux_rules(asdict(config))),
        TextEncodingStage(
            flux_prompt_encoder(dtype, *(getattr(parts, name) for name in TEXT_PARTS)),
            true_cfg_scale_of,
            parts.encoded_prompts,
        ),
        FlowMatchTimestepsStage(schedule, geometry.image_seq_len),
        LatentsStage(geometry.noise_shape, geometry.pack),
        DenoisingStage(FluxDenoiser(parts.transformer)),
        VaeDecodingStage(parts.vae, geometry.unpack),
    ]
    return ComposedPipeline("flux", stages, [parts.transformer], loaded_modules(parts))


def load_flux_pipeline(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    schedule: FlowMatchSchedule,
    events: PipelineEvents,
    skip: frozenset[str] = frozenset(),
    ahead: Sequence[FluxSampling] = (),
) -> ComposedPipeline:
    return compose_flux_pipeline(load_flux_components(model_dir, device, dtype, events, skip, ahead), schedule)

"""Qwen-Image text-to-image: Qwen2.5-VL text (through transformers), sgdiff's Qwen-Image transformer,
diffusers' Qwen-Image VAE, flow-matching Euler steps with the checkpoint's dynamic shift, and true CFG
whose guided velocity keeps the prompt branch's norm, as diffusers' QwenImagePipeline runs them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sgdiff.families.qwen_image.decoding import QwenImageDecodingStage, load_qwen_image_vae
from sgdiff.families.qwen_image.latents import QwenImageGeometry
from sgdiff.families.qwen_image.sampling import (
    QwenImageSampling,
    qwen_image_rules,
    true_cfg_scale_of,
    vae_scale_factor,
)
from sgdiff.families.qwen_image.text import QwenPromptEncoder, text_encoder_class
from sgdiff.models.loading import build_on_meta, load_own_model, read_json
from sgdiff.models.qwen_image import QwenImageTransformer, QwenImageTransformerConfig
from sgdiff.pipeline.base import ComposedPipeline, PipelineEvents, State
from sgdiff.pipeline.components import load_library_model, load_side_by_side, load_tokenizer, loaded_modules
from sgdiff.pipeline.schedule import FlowMatchSchedule
from sgdiff.pipeline.stages.denoising import DenoisingStage, guided_velocity
from sgdiff.pipeline.stages.latents import LatentsStage
from sgdiff.pipeline.stages.text_encoding import EncodedTexts, TextEncodingStage, encode_ahead
from sgdiff.pipeline.stages.timesteps import FlowMatchTimestepsStage
from sgdiff.pipeline.stages.validation import InputValidationStage


class QwenImageDenoiser:
    def __init__(self, transformer: QwenImageTransformer):
        self.transformer = transformer

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, inputs: dict, state: State) -> torch.Tensor:
        batch, tokens = latents.shape[:2]
        # as diffusers: the timestep (sigma * 1000) rounded to the latents' dtype, then back to sigma
        timestep = t.expand(batch).to(latents.dtype) / 1000
        grids = inputs["image_grids"]  # the noise grid (then any edit images')
        velocity = self.transformer(latents, inputs["encoder_hidden_states"], timestep, [grids] * batch)
        return velocity[:, :tokens]  # [B, S_noise, 4C]: the noise tokens' part


def norm_kept_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """True CFG as diffusers' Qwen-Image pipelines guide: the usual combination, rescaled token by token
    to the prompt branch's norm over the channels (velocities [B, S, C])."""
    combined = guided_velocity(cond, uncond, scale)
    return combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


@dataclass
class QwenImageComponents:
    """The loaded parts of a Qwen-Image checkpoint (diffusers' component names)."""

    tokenizer: Any
    text_encoder: torch.nn.Module | None  # transformers' Qwen2.5-VL (None where not loaded)
    transformer: QwenImageTransformer
    vae: Any  # diffusers' AutoencoderKLQwenImage
    encoded_prompts: EncodedTexts = field(default_factory=dict)  # the texts encoded while the rest loaded


def load_qwen_image_components(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    events: PipelineEvents,
    skip: frozenset[str] = frozenset(),
    ahead: Sequence[QwenImageSampling] = (),
) -> QwenImageComponents:
    """`skip`: component names not to load (None in their place). `ahead`: requests to come, whose
    prompts are encoded as soon as the text encoder is loaded, while the transformer still loads."""
    encoder_class = text_encoder_class(read_json(model_dir / "model_index.json"))  # refused before any load
    config = QwenImageTransformerConfig.from_dict(read_json(model_dir / "transformer" / "config.json"))
    encodes = "text_encoder" not in skip
    parts = load_side_by_side(events, device, {
        "tokenizer": lambda: load_tokenizer(model_dir / "tokenizer"),
        "text_encoder": (lambda: load_library_model(encoder_class, model_dir / "text_encoder", dtype, device))
        if encodes else None,
        "transformer": lambda: load_own_model(
            build_on_meta(QwenImageTransformer, config), model_dir / "transformer", dtype, device
        ),
        "vae": lambda: load_qwen_image_vae(model_dir / "vae", dtype, device),
    }, followers={
        "prompt embeddings": (("tokenizer", "text_encoder"), lambda text: encode_ahead(
            QwenPromptEncoder(text["tokenizer"], text["text_encoder"], dtype), true_cfg_scale_of, ahead
        )),
    } if ahead and encodes else None)  # fmt: skip
    encoded = parts.pop("prompt embeddings", None) or {}
    return QwenImageComponents(**parts, encoded_prompts=encoded)


def compose_qwen_image_pipeline(parts: QwenImageComponents, schedule: FlowMatchSchedule) -> ComposedPipeline:
    """The stages of Qwen-Image text-to-image over already-loaded parts."""
    dtype = next(parts.transformer.parameters()).dtype
    scale = vae_scale_factor(dict(parts.vae.config))
    geometry = QwenImageGeometry(scale, parts.transformer.config.in_channels // 4)
    stages = [
        InputValidationStage(qwen_image_rules(scale, schedule.shift_terminal)),
        TextEncodingStage(
            QwenPromptEncoder(parts.tokenizer, parts.text_encoder, dtype), true_cfg_scale_of, parts.encoded_prompts
        ),
        FlowMatchTimestepsStage(schedule, geometry.image_seq_len),
        LatentsStage(geometry.noise_shape, geometry.pack),
        DenoisingStage(QwenImageDenoiser(parts.transformer), guide=norm_kept_guidance),
        QwenImageDecodingStage(parts.vae, geometry.unpack),
    ]
    return ComposedPipeline("qwen_image", stages, [parts.transformer], loaded_modules(parts))


def load_qwen_image_pipeline(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    schedule: FlowMatchSchedule,
    events: PipelineEvents,
    skip: frozenset[str] = frozenset(),
    ahead: Sequence[QwenImageSampling] = (),
) -> ComposedPipeline:
    parts = load_qwen_image_components(model_dir, device, dtype, events, skip, ahead)
    return compose_qwen_image_pipeline(parts, schedule)

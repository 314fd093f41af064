"""Qwen-Image text-to-image and the Edit pipelines: Qwen2.5-VL text (through transformers), sgdiff's
Qwen-Image transformer, diffusers' Qwen-Image VAE, flow-matching Euler steps with the checkpoint's dynamic
shift, and true CFG whose guided velocity keeps the prompt branch's norm, as diffusers' QwenImagePipeline,
QwenImageEditPipeline and QwenImageEditPlusPipeline run them. The Edit pipelines read their input images
in the prompt (edit_text.py) and as VAE tokens after the noise tokens (edit_images.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sgdiff.families.qwen_image.decoding import QwenImageDecodingStage, load_qwen_image_vae
from sgdiff.families.qwen_image.edit_images import EditImages, QwenEditImageLatentsStage
from sgdiff.families.qwen_image.edit_text import QwenEditPromptEncoder, QwenEditTextEncodingStage, load_image_processor
from sgdiff.families.qwen_image.editing import EDIT_VARIANTS, EditVariant, edit_image_rules
from sgdiff.families.qwen_image.latents import QwenImageGeometry
from sgdiff.families.qwen_image.sampling import (
    QwenImageSampling,
    qwen_image_rules,
    true_cfg_scale_of,
    vae_scale_factor,
)
from sgdiff.families.qwen_image.text import QwenPromptEncoder, text_encoder_class, text_encoder_unused
from sgdiff.models.loading import build_on_meta, load_own_model, read_json
from sgdiff.models.qwen_image import QwenImageTransformer, QwenImageTransformerConfig
from sgdiff.pipeline.base import ComposedPipeline, PipelineEvents, Stage, State
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
        grids = [*inputs["image_grids"], *inputs.get("edit_grids", ())]  # the noise grid, then any edit images'
        hidden = latents
        if "image_latents" in inputs:  # the Edit pipelines' images: [1, S_edit, 4C] after the noise [B, S_noise, 4C]
            hidden = torch.cat([latents, inputs["image_latents"].expand(batch, -1, -1)], dim=1)
        velocity = self.transformer(hidden, inputs["encoder_hidden_states"], timestep, [grids] * batch)
        return velocity[:, :tokens]  # [B, S_noise, 4C]: the noise tokens' part


def norm_kept_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """True CFG as diffusers' Qwen-Image pipelines guide: the usual combination, rescaled token by token
    to the prompt branch's norm over the channels (velocities [B, S, C])."""
    combined = guided_velocity(cond, uncond, scale)
    return combined * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


@dataclass
class QwenImageComponents:
    """The loaded parts of a Qwen-Image checkpoint (diffusers' component names)."""

    tokenizer: Any  # the Edit pipelines': their processor's (processor/)
    text_encoder: torch.nn.Module | None  # transformers' Qwen2.5-VL (None where not loaded)
    transformer: QwenImageTransformer
    vae: Any  # diffusers' AutoencoderKLQwenImage (its encoder loaded for the Edit pipelines only)
    encoded_prompts: EncodedTexts = field(default_factory=dict)  # the texts encoded while the rest loaded
    edit: EditVariant | None = None  # the Edit pipelines: which one
    image_processor: Any = None  # the Edit pipelines': transformers' Qwen2VLImageProcessor (processor/)


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
    index = read_json(model_dir / "model_index.json")
    encoder_class = text_encoder_class(index)  # refused before any load
    edit = EDIT_VARIANTS.get(index.get("_class_name", ""))
    config = QwenImageTransformerConfig.from_dict(read_json(model_dir / "transformer" / "config.json"))
    encodes = "text_encoder" not in skip
    parts = load_side_by_side(events, device, {
        # the Edit pipelines tokenize with their processor's tokenizer
        "tokenizer": lambda: load_tokenizer(model_dir / ("processor" if edit else "tokenizer")),
        "image_processor": (lambda: load_image_processor(model_dir / "processor")) if edit and encodes else None,
        "text_encoder": (lambda: load_library_model(
            encoder_class, model_dir / "text_encoder", dtype, device, text_encoder_unused(edit is not None)
        )) if encodes else None,
        "transformer": lambda: load_own_model(
            build_on_meta(QwenImageTransformer, config), model_dir / "transformer", dtype, device
        ),
        "vae": lambda: load_qwen_image_vae(model_dir / "vae", dtype, device, encodes=edit is not None),
    }, followers={  # (an edit prompt is encoded with its images: in the request)
        "prompt embeddings": (("tokenizer", "text_encoder"), lambda text: encode_ahead(
            QwenPromptEncoder(text["tokenizer"], text["text_encoder"], dtype), true_cfg_scale_of, ahead
        )),
    } if ahead and encodes and not edit else None)  # fmt: skip
    encoded = parts.pop("prompt embeddings", None) or {}
    return QwenImageComponents(**parts, encoded_prompts=encoded, edit=edit)


def compose_qwen_image_pipeline(parts: QwenImageComponents, schedule: FlowMatchSchedule) -> ComposedPipeline:
    """The stages of Qwen-Image text-to-image over already-loaded parts."""
    dtype = next(parts.transformer.parameters()).dtype
    scale = vae_scale_factor(dict(parts.vae.config))
    geometry = QwenImageGeometry(scale, parts.transformer.config.in_channels // 4)
    pipeline_class = parts.edit.pipeline_class if parts.edit else "QwenImagePipeline"
    rules = qwen_image_rules(scale, schedule.shift_terminal) + edit_image_rules(pipeline_class)
    stages = [InputValidationStage(rules), *prompt_stages(parts, scale, dtype)]
    stages += [
        FlowMatchTimestepsStage(schedule, geometry.image_seq_len),
        LatentsStage(geometry.noise_shape, geometry.pack),
        DenoisingStage(QwenImageDenoiser(parts.transformer), guide=norm_kept_guidance),
        QwenImageDecodingStage(parts.vae, geometry.unpack),
    ]
    return ComposedPipeline("qwen_image", stages, [parts.transformer], loaded_modules(parts))


def prompt_stages(parts: QwenImageComponents, scale: int, dtype: torch.dtype) -> list[Stage]:
    """Text-to-image: the prompt's encoding; the Edit pipelines: the prompt's with its images, and the images'
    VAE tokens."""
    if parts.edit is None:
        text = QwenPromptEncoder(parts.tokenizer, parts.text_encoder, dtype)
        return [TextEncodingStage(text, true_cfg_scale_of, parts.encoded_prompts)]
    images = EditImages(parts.edit, scale)
    edit = QwenEditPromptEncoder(parts.tokenizer, parts.image_processor, parts.text_encoder, parts.edit.numbered, dtype)
    return [QwenEditTextEncodingStage(edit, images, true_cfg_scale_of), QwenEditImageLatentsStage(parts.vae, images)]


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

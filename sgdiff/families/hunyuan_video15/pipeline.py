"""HunyuanVideo-1.5 text to video and image to video: Qwen2.5-VL and ByT5 text (through transformers), SigLIP and
the VAE's encoder for an input image, sgdiff's HunyuanVideo-1.5 transformer with classifier-free guidance, Euler
steps at the checkpoint's fixed shift, diffusers' HunyuanVideo-1.5 VAE; as diffusers' HunyuanVideo15Pipeline and
HunyuanVideo15ImageToVideoPipeline run them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sgdiff.families.hunyuan_video.decoding import HunyuanVideoDecodingStage
from sgdiff.families.hunyuan_video.schedule import HunyuanVideoTimestepsStage
from sgdiff.families.hunyuan_video15.image import (
    HunyuanVideo15ImageStage,
    image_encoder_class,
    load_feature_extractor,
    load_image_encoder,
)
from sgdiff.families.hunyuan_video15.sampling import (
    IMAGE_TO_VIDEO,
    HunyuanVideo15Sampling,
    guidance_cfg,
    hunyuan_video15_rules,
    spatial_factor,
)
from sgdiff.families.hunyuan_video15.sizes import guider_config
from sgdiff.families.hunyuan_video15.text import (
    GlyphEncoder,
    HunyuanVideo15PromptEncoder,
    QwenPromptEncoder,
    load_qwen_text_encoder,
    text_encoder_class,
)
from sgdiff.models.hunyuan_video15 import HunyuanVideo15Transformer, HunyuanVideo15TransformerConfig
from sgdiff.models.loading import build_on_meta, load_own_model, read_json
from sgdiff.pipeline.base import ComposedPipeline, OptionalStage, PipelineEvents, Stage, State
from sgdiff.pipeline.components import load_library_model, load_side_by_side, load_tokenizer, loaded_modules
from sgdiff.pipeline.schedule import FlowMatchSchedule
from sgdiff.pipeline.stages.denoising import DenoisingStage
from sgdiff.pipeline.stages.latents import LatentsStage
from sgdiff.pipeline.stages.text_encoding import EncodedTexts, TextEncodingStage, encode_ahead
from sgdiff.pipeline.stages.validation import InputValidationStage

TEXT_PARTS = ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")
VAE_ENCODER = ("encoder",)  # what only encoding runs: unread for text to video


def library_classes(index: dict, image_to_video: bool) -> dict[str, type]:
    """The transformers and diffusers classes of the checkpoint's parts, imported on the caller's thread (the
    libraries' lazy imports race where loading threads import at once: "cannot import name ..."); unsupported
    ones refused before anything loads."""
    from diffusers import AutoencoderKLHunyuanVideo15
    from transformers import T5EncoderModel

    classes = {"text_encoder": text_encoder_class(index), "text_encoder_2": T5EncoderModel}
    classes["vae"] = AutoencoderKLHunyuanVideo15
    if image_to_video:
        classes["image_encoder"] = image_encoder_class(index)
    return classes


def load_vae(cls: type, folder: Path, dtype: torch.dtype, device: torch.device, encodes: bool) -> Any:
    """diffusers' AutoencoderKLHunyuanVideo15 (`cls`) in `dtype` (as diffusers' pipeline loads it), tiling on as
    diffusers' examples run it (frames larger than 256x256 pixels in tiles), and slicing (one video at a time:
    its attention's causal mask does not broadcast over a batch of several, so diffusers' decode fails without);
    its encoder only where an image is encoded."""
    vae: Any = load_library_model(cls, folder, dtype, device, () if encodes else VAE_ENCODER)
    vae.enable_tiling()
    vae.enable_slicing()
    return vae


class HunyuanVideo15Geometry:
    """Video size <-> latents, as diffusers' prepare_latents: [N, C, (F - 1) // 4 + 1, H / 16, W / 16]; text to
    video's condition (no image latents, no mask) as zeros beside them."""

    def __init__(self, vae_config: dict[str, Any], latent_channels: int, image_to_video: bool):
        self.spatial = spatial_factor(vae_config)
        self.temporal = int(vae_config.get("temporal_compression_ratio", 4))
        self.latent_channels = latent_channels
        self.image_to_video = image_to_video  # the image stage sets the condition

    def noise_shape(self, params: HunyuanVideo15Sampling) -> tuple[int, ...]:
        frames = (params.num_frames - 1) // self.temporal + 1
        size = (params.height // self.spatial, params.width // self.spatial)
        return (params.num_outputs_per_prompt, self.latent_channels, frames, *size)

    def as_latents(self, noise: torch.Tensor, params: HunyuanVideo15Sampling) -> tuple[torch.Tensor, dict]:
        if self.image_to_video:
            return noise, {}
        # [N, C, F, h, w] -> [N, C + 1, F, h, w]: condition latents and their mask, zeros
        condition = noise.new_zeros(noise.shape[0], noise.shape[1] + 1, *noise.shape[2:])
        return noise, {"condition": condition}


class HunyuanVideo15Denoiser:
    def __init__(self, transformer: HunyuanVideo15Transformer, image_to_video: bool):
        self.transformer = transformer
        self.dtype = next(transformer.parameters()).dtype
        # diffusers' image-to-video pipeline passes the step's end (timestep_r) to meanflow checkpoints
        self.meanflow = image_to_video and transformer.config.use_meanflow

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, inputs: dict, state: State) -> torch.Tensor:
        batch = latents.shape[0]
        hidden = torch.cat([latents, inputs["condition"]], dim=1).to(self.dtype)  # [B, 2C + 1, F, h, w]
        timestep = t.expand(batch).to(self.dtype)  # as diffusers: in the model's dtype
        timestep_r = (
            self.next_timestep(t, state.sampler.timesteps).expand(batch).to(self.dtype) if self.meanflow else None
        )
        return self.transformer(
            hidden_states=hidden,
            timestep=timestep,
            encoder_hidden_states=inputs["encoder_hidden_states"],
            timestep_r=timestep_r,
            encoder_hidden_states_2=inputs.get("encoder_hidden_states_2"),  # None: nothing quoted
            image_embeds=inputs.get("image_embeds"),  # None: text to video
        )

    @staticmethod
    def next_timestep(t: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The timestep after t (0 after the last), without a host sync: t's index is how many are larger."""
        following = torch.cat([timesteps[1:], timesteps.new_zeros(1)])
        return following[(timesteps > t).sum()]


@dataclass
class HunyuanVideo15Components:
    """The loaded parts of a HunyuanVideo-1.5 checkpoint (diffusers' component names)."""

    tokenizer: Any  # Qwen2.5-VL's
    text_encoder: torch.nn.Module | None  # transformers' Qwen2.5-VL text model, cut after the layer read
    tokenizer_2: Any  # ByT5's
    text_encoder_2: torch.nn.Module | None  # transformers' T5EncoderModel (ByT5)
    transformer: HunyuanVideo15Transformer
    vae: Any  # diffusers' AutoencoderKLHunyuanVideo15 (its encoder for image to video only), tiling and slicing on
    image_encoder: torch.nn.Module | None = None  # image to video: transformers' SiglipVisionModel
    feature_extractor: Any = None  # image to video: transformers' SiglipImageProcessor
    image_to_video: bool = False
    encoded_prompts: EncodedTexts = field(default_factory=dict)  # the texts encoded while the rest loaded


def prompt_encoder(
    dtype: torch.dtype, tokenizer: Any, text_encoder: Any, tokenizer_2: Any, text_encoder_2: Any
) -> HunyuanVideo15PromptEncoder:
    return HunyuanVideo15PromptEncoder(
        QwenPromptEncoder(tokenizer, text_encoder), GlyphEncoder(tokenizer_2, text_encoder_2), dtype
    )


def load_hunyuan_video15_components(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    events: PipelineEvents,
    skip: frozenset[str] = frozenset(),
    ahead: Sequence[HunyuanVideo15Sampling] = (),
) -> HunyuanVideo15Components:
    """`skip`: component names not to load (None in their place), e.g. the text encoders on ranks that receive
    the prompt embeddings from rank 0. `ahead`: requests to come, whose prompts are encoded as soon as the text
    encoders are loaded, while the transformer still loads."""
    index = read_json(model_dir / "model_index.json")
    image_to_video = index.get("_class_name") == IMAGE_TO_VIDEO
    config = HunyuanVideo15TransformerConfig.from_dict(read_json(model_dir / "transformer" / "config.json"))
    classes = library_classes(index, image_to_video)
    # (a config file, read here: the image processor's backend is imported as it loads)
    features = load_feature_extractor(index, model_dir / "feature_extractor") if image_to_video else None
    unless_skipped = lambda name, load: None if name in skip else load  # noqa: E731  (None: not loaded)
    image_encoder = unless_skipped("image_encoder", lambda: load_image_encoder(
        classes["image_encoder"], model_dir / "image_encoder", dtype, device
    )) if image_to_video else None  # fmt: skip
    parts = load_side_by_side(events, device, {
        "tokenizer": lambda: load_tokenizer(model_dir / "tokenizer"),
        "text_encoder": unless_skipped("text_encoder", lambda: load_qwen_text_encoder(
            classes["text_encoder"], model_dir / "text_encoder", dtype, device
        )),
        "tokenizer_2": lambda: load_tokenizer(model_dir / "tokenizer_2"),
        "text_encoder_2": unless_skipped(
            "text_encoder_2",
            lambda: load_library_model(classes["text_encoder_2"], model_dir / "text_encoder_2", dtype, device),
        ),
        "transformer": lambda: load_own_model(
            build_on_meta(HunyuanVideo15Transformer, config), model_dir / "transformer", dtype, device
        ),
        "vae": lambda: load_vae(classes["vae"], model_dir / "vae", dtype, device, encodes=image_to_video),
        "image_encoder": image_encoder,
    }, followers={
        "prompt embeddings": (TEXT_PARTS, lambda text: encode_ahead(
            prompt_encoder(dtype, **text), guidance_cfg, ahead
        )),
    } if ahead and not skip & set(TEXT_PARTS) else None)  # fmt: skip
    encoded = parts.pop("prompt embeddings", None) or {}
    return HunyuanVideo15Components(
        **parts, feature_extractor=features, image_to_video=image_to_video, encoded_prompts=encoded
    )


def compose_hunyuan_video15_pipeline(
    parts: HunyuanVideo15Components, schedule: FlowMatchSchedule, model_dir: Path
) -> ComposedPipeline:
    """The stages of HunyuanVideo-1.5 over already-loaded parts."""
    config = parts.transformer.config
    vae_config = dict(parts.vae.config)
    dtype = next(parts.transformer.parameters()).dtype
    pipeline_class = IMAGE_TO_VIDEO if parts.image_to_video else "HunyuanVideo15Pipeline"
    guider_config(model_dir)  # (refused before a request runs where it asks for more than plain CFG)
    geometry = HunyuanVideo15Geometry(vae_config, int(vae_config["latent_channels"]), parts.image_to_video)
    text = prompt_encoder(dtype, *(getattr(parts, name) for name in TEXT_PARTS))
    stages: list[Stage] = [
        InputValidationStage(hunyuan_video15_rules(pipeline_class, {"patch_size": config.patch_size}, vae_config)),
        TextEncodingStage(text, guidance_cfg, parts.encoded_prompts),
    ]
    if parts.image_to_video:
        image = HunyuanVideo15ImageStage(parts.vae, parts.image_encoder, parts.feature_extractor, dtype)
        stages.append(OptionalStage(image, lambda params: params.image_path is not None))
    stages += [
        HunyuanVideoTimestepsStage(schedule),  # (HunyuanVideo's sigmas: the same linspace and fixed shift)
        LatentsStage(geometry.noise_shape, geometry.as_latents),  # noise in the model's dtype, as diffusers draws it
        DenoisingStage(HunyuanVideo15Denoiser(parts.transformer, parts.image_to_video)),
        HunyuanVideoDecodingStage(parts.vae),  # (HunyuanVideo's: latents / scaling_factor, decoded, to uint8)
    ]
    return ComposedPipeline("hunyuan_video15", stages, [parts.transformer], loaded_modules(parts))


def load_hunyuan_video15_pipeline(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    schedule: FlowMatchSchedule,
    events: PipelineEvents,
    skip: frozenset[str] = frozenset(),
    ahead: Sequence[HunyuanVideo15Sampling] = (),
) -> ComposedPipeline:
    parts = load_hunyuan_video15_components(model_dir, device, dtype, events, skip, ahead)
    return compose_hunyuan_video15_pipeline(parts, schedule, model_dir)

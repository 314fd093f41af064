"""Wan 2.1 / 2.2 text-to-video: UMT5 text, sgdiff's Wan transformer (two for the 2.2 MoE models,
switched at `boundary_ratio`), the Wan VAE (sgdiff's decoder for text-to-video; diffusers' whole VAE
where an input image is encoded too) and the scheduler named in the checkpoint."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, cast

import torch

from sgdiff.errors import UserError
from sgdiff.families.wan.image_conditioning import WanImageConditioningStage
from sgdiff.families.wan.sampling import WanSampling, guidance_cfg, wan_rules
from sgdiff.families.wan.unipc import UniPCConfig, UniPCSampler
from sgdiff.models.loading import build_on_meta, load_own_model, read_json
from sgdiff.models.video_vae import ENCODER_PARTS, VideoVaeConfig, VideoVaeDecoder
from sgdiff.models.wan import WanTransformer, WanTransformerConfig
from sgdiff.models.wan.transformer import IGNORED_KEYS, KEEP_FP32
from sgdiff.pipeline.base import ComposedPipeline, OptionalStage, PipelineEvents, State
from sgdiff.pipeline.components import (
    load_library_model,
    load_side_by_side,
    load_tokenizer,
    loaded_modules,
    quiet_libraries,
)
from sgdiff.pipeline.schedule import (
    DmdSampler,
    FlowMatchEulerSampler,
    FlowMatchSchedule,
    Sampler,
    SchedulerSampler,
    flow_match_grid,
    flow_match_spaced_sigmas,
)
from sgdiff.pipeline.stages.decoding import VideoVaeDecodingStage
from sgdiff.pipeline.stages.denoising import DenoisingStage
from sgdiff.pipeline.stages.latents import LatentsStage, seeded_noise
from sgdiff.pipeline.stages.text_encoding import EncodedTexts, TextEncodingStage, encode_ahead
from sgdiff.pipeline.stages.timesteps import SamplerStage
from sgdiff.pipeline.stages.validation import InputValidationStage, ValidationRule
from sgdiff.pipeline.text_encoders import UMT5SequenceEncoder, load_t5_encoder

# The schedulers diffusers' Wan checkpoints name, and the config key each uses for the flow shift.
SCHEDULERS = {"UniPCMultistepScheduler": "flow_shift", "FlowMatchEulerDiscreteScheduler": "shift"}


@dataclass(frozen=True)
class WanSchedule:
    """The scheduler class and config from scheduler/scheduler_config.json (merged under the preset's)."""

    class_name: str
    config: dict[str, Any]

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> WanSchedule:
        class_name = raw.get("_class_name", "UniPCMultistepScheduler")
        if class_name not in SCHEDULERS:
            raise UserError(f"scheduler {class_name} is not supported for Wan (supported: {', '.join(SCHEDULERS)})")
        return cls(class_name, {k: v for k, v in raw.items() if not k.startswith("_")})

    def with_shift(self, flow_shift: float | None) -> dict[str, Any]:
        """The config with the request's flow shift, where it gives one."""
        return {**self.config, SCHEDULERS[self.class_name]: flow_shift} if flow_shift is not None else self.config

    def sampler(self, flow_shift: float | None, num_steps: int, device: torch.device) -> Sampler:
        """A fresh sampler (it holds per-request state): sgdiff's own UniPC or Euler where it implements
        the config (every Wan-AI checkpoint's), else diffusers' scheduler class as named."""
        config = self.with_shift(flow_shift)
        if self.class_name == "UniPCMultistepScheduler":
            unipc = UniPCConfig.from_dict(config)
            if unipc is not None:
                return UniPCSampler(unipc, num_steps, device)
        else:
            euler = own_euler_schedule(config)
            if euler is not None:
                sigmas = flow_match_spaced_sigmas(num_steps, euler)
                return FlowMatchEulerSampler(sigmas.to(device), euler.num_train_timesteps)
        return SchedulerSampler(self.library_scheduler(config), num_steps, device)

    def library_scheduler(self, config: dict[str, Any]) -> Any:
        """diffusers' scheduler instance for a config sgdiff's own samplers do not implement."""
        import diffusers

        return getattr(diffusers, self.class_name).from_config(config)


def own_euler_schedule(config: dict[str, Any]) -> FlowMatchSchedule | None:
    """A FlowMatchEulerDiscreteScheduler config as sgdiff's schedule, or None where it has options sgdiff's
    Euler does not implement (dynamic shifting included: Wan's pipeline passes no `mu`)."""
    try:
        schedule = FlowMatchSchedule.from_dict(config)
    except UserError:
        return None
    return None if schedule.use_dynamic_shifting else schedule


@dataclass
class WanComponents:
    tokenizer: Any
    text_encoder: torch.nn.Module | None  # sgdiff's T5Encoder of a UMT5 config (None where not loaded)
    transformer: WanTransformer | None  # high-noise expert for Wan2.2 A14B
    transformer_2: WanTransformer | None  # low-noise expert (Wan2.2 A14B only)
    vae: Any  # float32: sgdiff's VideoVaeDecoder (text-to-video) or diffusers' AutoencoderKLWan
    image_encoder: torch.nn.Module | None = None  # Wan2.1 I2V: transformers CLIP vision model
    image_processor: Any = None
    boundary_ratio: float | None = None
    expand_timesteps: bool = False  # Wan2.2 TI2V: one timestep per token
    encoded_prompts: EncodedTexts = field(default_factory=dict)  # the texts encoded while the rest loaded


class WanVideoGeometry:
    def __init__(self, vae_config: Any, latent_channels: int):
        self.spatial = vae_config.scale_factor_spatial
        self.temporal = vae_config.scale_factor_temporal
        self.latent_channels = latent_channels

    def noise_shape(self, params: WanSampling) -> tuple[int, ...]:
        assert params.num_frames is not None  # wan_rules refuse None
        frames = (params.num_frames - 1) // self.temporal + 1
        size = (params.height // self.spatial, params.width // self.spatial)
        return (params.num_outputs_per_prompt, self.latent_channels, frames, *size)

    @staticmethod
    def as_latents(noise: torch.Tensor, params: WanSampling) -> tuple[torch.Tensor, dict]:
        return noise, {}


class WanPromptEncoder:
    def __init__(self, encoder: UMT5SequenceEncoder, dtype: torch.dtype):
        self.encoder, self.dtype = encoder, dtype

    def __call__(self, prompts: list[str], params: WanSampling) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": self.encoder(prompts, params.max_sequence_length).to(self.dtype)}


class WanDenoiser:
    """Picks the expert by timestep (Wan2.2 A14B), feeds it latents in its dtype."""

    def __init__(self, parts: WanComponents, num_train_timesteps: int):
        self.parts = parts
        ratio = parts.boundary_ratio
        self.boundary = ratio * num_train_timesteps if ratio is not None else None

    def uses_second_expert(self, t: torch.Tensor) -> bool:
        return self.boundary is not None and bool(t < self.boundary)

    def expert(self, t: torch.Tensor) -> WanTransformer:
        model = self.parts.transformer_2 if self.uses_second_expert(t) else self.parts.transformer
        if model is None:
            raise UserError("this checkpoint lacks the expert needed at this timestep")
        return model

    def cfg_scale_at(self, t: torch.Tensor, state: State) -> float:
        params = cast(WanSampling, state.params)
        if self.uses_second_expert(t) and params.guidance_scale_2 is not None:
            return params.guidance_scale_2
        return state.cfg_scale

    def __call__(self, latents: torch.Tensor, t: torch.Tensor, inputs: dict, state: State) -> torch.Tensor:
        model = self.expert(t)
        batch = latents.shape[0]
        condition = inputs.get("image_condition")
        if self.parts.expand_timesteps:
            # one timestep per token; 0 where the first frame is the given image (TI2V)
            mask = inputs.get("first_frame_mask", torch.ones_like(latents[:1, :1]))  # [1, 1, F, h, w]
            if condition is not None:
                latents = replace_first_frame(latents, condition, mask)
            _, ph, pw = model.config.patch_size
            timestep = (mask[0, 0][:, ::ph, ::pw] * t).flatten().expand(batch, -1)  # [B, F * h/ph * w/pw]
        else:
            timestep = t.expand(batch)
            if condition is not None:  # Wan2.1/2.2 I2V: mask and image latents as extra channels
                latents = torch.cat([latents, condition], dim=1)
        dtype = model_dtype(self.parts)
        image = inputs.get("encoder_hidden_states_image")
        return model(latents.to(dtype), timestep, inputs["encoder_hidden_states"], image)


def replace_first_frame(latents: torch.Tensor, condition: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Where mask is 0 (the first latent frame), the image's latents; elsewhere the noisy ones."""
    return (1 - mask) * condition + mask * latents


def model_dtype(parts: WanComponents) -> torch.dtype:
    """The dtype diffusers calls the transformer's: that of its first parameter (the patch embedding)."""
    model = parts.transformer if parts.transformer is not None else parts.transformer_2
    assert model is not None  # a checkpoint has one expert at least
    return model.patch_embedding.weight.dtype


def make_sampler(state: State, schedule: WanSchedule) -> Sampler:
    """The checkpoint's scheduler, or few-step DMD sampling when the preset asks for it (FastWan)."""
    params = cast(WanSampling, state.params)
    if params.sampler != "dmd":
        return schedule.sampler(params.flow_shift, params.num_inference_steps, state.device)
    shift = params.flow_shift or schedule.config.get(SCHEDULERS[schedule.class_name], 1.0)
    grid = flow_match_grid(FlowMatchSchedule(shift=shift))  # the shifted 1000-step training grid, [1000]

    def draw_noise(shape: tuple[int, ...]) -> torch.Tensor:
        return seeded_noise(shape, params, torch.float32, state.device, state.generator)

    return DmdSampler(params.dmd_timesteps, grid * 1000, grid, draw_noise)


def keep_given_first_frame(latents: torch.Tensor, state: State) -> torch.Tensor:
    """TI2V with an image: the first latent frame is the image's, not the sampled one."""
    if "first_frame_mask" in state.shared:
        return replace_first_frame(latents, state.shared["image_condition"], state.shared["first_frame_mask"])
    return latents


def load_wan_transformer(folder: Path, dtype: torch.dtype, device: torch.device) -> WanTransformer:
    config = WanTransformerConfig.from_dict(read_json(folder / "config.json"))
    return load_own_model(build_on_meta(WanTransformer, config), folder, dtype, device, KEEP_FP32, IGNORED_KEYS)


def load_wan_components(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    events: PipelineEvents,
    skip: frozenset[str] = frozenset(),
    ahead: Sequence[WanSampling] = (),
) -> WanComponents:
    """`skip`: component names not to load (None in their place). `ahead`: requests to come, whose
    prompts are encoded as soon as the text encoder is loaded, while the transformer still loads."""
    index = read_json(model_dir / "model_index.json")

    shares_steps = index.get("boundary_ratio") is not None  # Wan2.2 A14B: two experts, each its share of the steps

    def expert(name: str) -> Callable[[], WanTransformer] | None:  # MoE checkpoints have two
        if not (model_dir / name).is_dir():
            return None

        def load() -> WanTransformer:
            model = load_wan_transformer(model_dir / name, dtype, device)
            model.shares_steps = shares_steps
            return model

        return load

    parts = load_side_by_side(events, device, {
        "tokenizer": lambda: load_tokenizer(model_dir / "tokenizer"),
        "text_encoder": None if "text_encoder" in skip else (
            lambda: load_t5_encoder(model_dir / "text_encoder", dtype, device)
        ),
        "transformer": expert("transformer"),
        "transformer_2": expert("transformer_2"),
        "vae": vae_loader(model_dir / "vae", index, device),
        "image_encoder": image_encoder_loader(model_dir, index, device),
    }, followers={  # (in `dtype`: the transformers' patch embedding, model_dtype's, is never kept in float32)
        "prompt embeddings": (("tokenizer", "text_encoder"), lambda text: encode_ahead(
            WanPromptEncoder(UMT5SequenceEncoder(text["tokenizer"], text["text_encoder"]), dtype), guidance_cfg, ahead
        )),
    } if ahead and "text_encoder" not in skip else None)  # fmt: skip
    encoded = parts.pop("prompt embeddings", None) or {}
    return WanComponents(
        **parts,
        encoded_prompts=encoded,
        image_processor=load_image_processor(model_dir, index),
        boundary_ratio=index.get("boundary_ratio"),
        expand_timesteps=bool(index.get("expand_timesteps", False)),
    )


def takes_image(index: dict) -> bool:
    """Whether the checkpoint encodes an input image with its VAE: I2V always, TI2V (`expand_timesteps`)
    when given one; as `wan_rules` decides which requests may carry `image_path`."""
    return index.get("_class_name") == "WanImageToVideoPipeline" or bool(index.get("expand_timesteps"))


def vae_loader(folder: Path, index: dict, device: torch.device) -> Callable[[], torch.nn.Module]:
    """How to load the VAE, in float32 as diffusers' Wan examples do (small next to the transformer):
    text-to-video decodes only, with sgdiff's decoder (no diffusers import); a checkpoint that takes an
    image needs the encoder too: diffusers' AutoencoderKLWan."""
    if not takes_image(index):
        return lambda: load_video_vae_decoder(folder, device)
    from diffusers import AutoencoderKLWan

    return lambda: load_library_model(AutoencoderKLWan, folder, torch.float32, device)


def load_video_vae_decoder(folder: Path, device: torch.device) -> VideoVaeDecoder:
    config_path = folder / "config.json"
    config = VideoVaeConfig.from_dict(read_json(config_path), source=str(config_path))
    model = build_on_meta(VideoVaeDecoder, config)
    return load_own_model(model, folder, torch.float32, device, ignored=ENCODER_PARTS)


def vae_settings(config: Any) -> dict[str, Any]:
    """The VAE's config as a dict: our decoder's dataclass or diffusers' FrozenDict."""
    return asdict(config) if is_dataclass(config) else dict(config)  # type: ignore[arg-type]  # (not a class)


IMAGE_ENCODERS = ("CLIPVisionModel", "CLIPVisionModelWithProjection")


def image_encoder_loader(model_dir: Path, index: dict, device: torch.device) -> Callable[[], Any] | None:
    """How to load the checkpoint's CLIP image encoder (I2V), or None where it has none."""
    entry = index.get("image_encoder")
    if not isinstance(entry, list) or entry[1] is None:
        return None
    if entry[1] not in IMAGE_ENCODERS:
        raise UserError(f"image encoder {entry[1]} is not supported (supported: {', '.join(IMAGE_ENCODERS)})")
    import transformers

    cls = getattr(transformers, entry[1])
    # float32, as diffusers' I2V examples load it (small); its features are cast to the transformer's dtype
    return lambda: load_library_model(cls, model_dir / "image_encoder", torch.float32, device)


def load_image_processor(model_dir: Path, index: dict):
    entry = index.get("image_processor")
    if not isinstance(entry, list) or entry[1] is None:
        return None
    if entry[1] != "CLIPImageProcessor":
        raise UserError(f"image processor {entry[1]} is not supported (supported: CLIPImageProcessor)")
    import transformers  # (quiet_libraries silences what is imported)

    with quiet_libraries():  # without torchvision transformers advises at import; its PIL version serves
        return transformers.CLIPImageProcessor.from_pretrained(model_dir / "image_processor")


def compose_wan_pipeline(parts: WanComponents, schedule: WanSchedule, rules: list[ValidationRule]) -> ComposedPipeline:
    geometry = WanVideoGeometry(parts.vae.config, parts.vae.config.z_dim)  # I2V adds condition channels later
    denoiser = WanDenoiser(parts, int(schedule.config.get("num_train_timesteps", 1000)))
    image_stage = WanImageConditioningStage(
        parts.vae, parts.image_encoder, parts.image_processor, parts.expand_timesteps, model_dtype(parts)
    )
    stages = [
        InputValidationStage(rules),
        TextEncodingStage(
            WanPromptEncoder(UMT5SequenceEncoder(parts.tokenizer, parts.text_encoder), model_dtype(parts)),
            guidance_cfg,
            parts.encoded_prompts,
        ),
        OptionalStage(image_stage, lambda params: params.image_path is not None),
        SamplerStage(lambda state: make_sampler(state, schedule)),
        LatentsStage(geometry.noise_shape, geometry.as_latents, noise_dtype=torch.float32),
        DenoisingStage(denoiser, denoiser.cfg_scale_at),
        VideoVaeDecodingStage(parts.vae, finalize=keep_given_first_frame),
    ]
    experts: list[torch.nn.Module] = [model for model in (parts.transformer, parts.transformer_2) if model is not None]
    return ComposedPipeline("wan", stages, experts, loaded_modules(parts))


def load_wan_pipeline(
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    schedule: WanSchedule,
    events: PipelineEvents,
    skip: frozenset[str] = frozenset(),
    ahead: Sequence[WanSampling] = (),
) -> ComposedPipeline:
    parts = load_wan_components(model_dir, device, dtype, events, skip, ahead)
    reference = parts.transformer if parts.transformer is not None else parts.transformer_2
    assert reference is not None  # a checkpoint has one expert at least
    index = read_json(model_dir / "model_index.json")
    experts = (parts.transformer is not None, parts.transformer_2 is not None)
    rules = wan_rules(asdict(reference.config), index, vae_settings(parts.vae.config), experts)
    return compose_wan_pipeline(parts, schedule, rules)

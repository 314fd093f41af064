"""Image to video (HunyuanVideo15ImageToVideoPipeline): the input image cropped to the output's aspect ratio and
resized to it, then (1) SigLIP's last hidden state of it (image_embeds, the transformer's image tokens) and
(2) its VAE latents as the first latent frame of the condition, marked by a mask of ones there; as diffusers'
pipeline prepares them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import torch

from sgdiff.errors import UserError
from sgdiff.families.hunyuan_video15.sampling import VAE_TEMPORAL_FACTOR, HunyuanVideo15Sampling
from sgdiff.io.input_image import load_image
from sgdiff.models.loading import read_json
from sgdiff.pipeline.base import ParallelMode, Stage, State
from sgdiff.pipeline.components import load_library_model, quiet_libraries

IMAGE_ENCODERS = ("SiglipVisionModel",)
IMAGE_PROCESSORS = ("SiglipImageProcessor", "SiglipImageProcessorFast", "SiglipImageProcessorPil")


def entry_class(model_index: dict, name: str) -> str | None:
    entry = model_index.get(name)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else None


def image_encoder_class(model_index: dict) -> type:
    """The transformers class model_index.json names for `image_encoder`, refused unless supported (imported on the
    caller's thread, as text.text_encoder_class)."""
    name = entry_class(model_index, "image_encoder")
    if name not in IMAGE_ENCODERS:
        raise UserError(f"image encoder {name} is not supported (supported: {', '.join(IMAGE_ENCODERS)})")
    import transformers

    return getattr(transformers, name)


def load_image_encoder(cls: type, folder: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """transformers' SigLIP vision model (`cls`) in `dtype`, as diffusers' pipeline loads it, without its pooling
    head (diffusers reads last_hidden_state only; the head is left unread)."""
    with_head = read_use_head(folder)
    model: Any = load_library_model(cls, folder, dtype, device, without=("head",) if with_head else ())
    model.use_head = False
    return model


def read_use_head(folder: Path) -> bool:
    return bool(read_json(folder / "config.json").get("vision_use_head", True))


def load_feature_extractor(model_index: dict, folder: Path) -> Any:
    """The checkpoint's SigLIP image processor, as transformers builds it (its PIL twin without torchvision)."""
    name = entry_class(model_index, "feature_extractor")
    if name not in IMAGE_PROCESSORS:
        raise UserError(f"feature extractor {name} is not supported (supported: {', '.join(IMAGE_PROCESSORS)})")
    import transformers

    with quiet_libraries():  # (without torchvision transformers advises at import; its PIL version serves)
        return transformers.SiglipImageProcessor.from_pretrained(folder)


def condition_frames(num_frames: int) -> int:
    return (num_frames - 1) // VAE_TEMPORAL_FACTOR + 1


class HunyuanVideo15ImageStage(Stage):
    """Sets state.shared["condition"] [N, C + 1, F, h, w] (the image's latents in the first frame, zeros after,
    then the mask) and state.shared["image_embeds"] [1, L_img, C_img], both in the transformer's dtype."""

    name = "image_encoding"
    parallel = ParallelMode.ALL_RANKS

    def __init__(self, vae: Any, image_encoder: Any, feature_extractor: Any, dtype: torch.dtype):
        self.vae = vae  # diffusers' AutoencoderKLHunyuanVideo15, its encoder loaded
        self.image_encoder = image_encoder
        self.feature_extractor = feature_extractor
        self.dtype = dtype  # the transformer's

    def run(self, state: State) -> None:
        from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

        params = cast(HunyuanVideo15Sampling, state.params)
        assert params.image_path is not None  # (the rules)
        processor = HunyuanVideo15ImageProcessor(
            vae_scale_factor=self.vae.spatial_compression_ratio, do_resize=False, do_convert_rgb=True
        )
        image = load_image(params.image_path, state.inputs)
        image = processor.resize(image, height=params.height, width=params.width, resize_mode="crop")
        with quiet_libraries():
            pixels = self.feature_extractor.preprocess(images=image, do_resize=True, return_tensors="pt",
                                                       do_convert_rgb=True).pixel_values  # fmt: skip
        encoder_dtype = next(self.image_encoder.parameters()).dtype
        embeds = self.image_encoder(pixel_values=pixels.to(state.device, encoder_dtype)).last_hidden_state
        state.shared["image_embeds"] = embeds.to(self.dtype)  # [1, L_img, C_img]

        frame = processor.preprocess(image, height=params.height, width=params.width)  # [1, 3, H, W] in [-1, 1]
        frame = frame.to(state.device, self.vae.dtype).unsqueeze(2)  # [1, 3, 1, H, W]
        latents = self.vae.encode(frame).latent_dist.mode() * self.vae.config.scaling_factor  # [1, C, 1, h, w]
        _, channels, _, height, width = latents.shape
        shape = (params.num_outputs_per_prompt, channels + 1, condition_frames(params.num_frames), height, width)
        condition = torch.zeros(shape, dtype=self.dtype, device=state.device)
        condition[:, :channels, :1] = latents.to(self.dtype)  # the image's latents as the first latent frame
        condition[:, channels:, :1] = 1  # the mask: 1 where the latents are given
        state.shared["condition"] = condition

"""The Edit pipelines' input images: read from the request's fetched files, resized as diffusers resizes them
(its VaeImageProcessor), and encoded by the VAE into tokens that follow the noise tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch

from sgdiff.families.qwen_image.editing import EditVariant, edit_sizes
from sgdiff.families.qwen_image.sampling import QwenImageSampling
from sgdiff.io.input_image import load_image
from sgdiff.models.flux.packing import pack_latents
from sgdiff.models.qwen_image.rope import Grid
from sgdiff.pipeline.base import ParallelMode, Stage, State


@dataclass
class EditImage:
    image: Any  # PIL, RGB, as given
    vae_size: tuple[int, int]  # (width, height) the VAE encodes
    vl_size: tuple[int, int]  # (width, height) the text encoder reads


class EditImages:
    """A request's input images, resized for the text encoder and the VAE (`vae_scale_factor`: the VAE's)."""

    def __init__(self, variant: EditVariant, vae_scale_factor: int):
        from diffusers.image_processor import VaeImageProcessor

        self.variant = variant
        self.processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor * 2)  # as the pipelines make it

    def of(self, state: State) -> list[EditImage]:
        params = cast(QwenImageSampling, state.params)
        assert params.image_path  # (edit_image_rules)
        images = []
        for path in params.image_path:
            image = load_image(path, state.inputs)
            images.append(EditImage(image, *edit_sizes(self.variant, path, *image.size)))
        return images

    def vl_image(self, item: EditImage) -> Any:
        """The PIL image the text encoder's image processor gets."""
        width, height = item.vl_size
        return self.processor.resize(item.image, height, width)

    def vae_pixels(self, item: EditImage) -> torch.Tensor:
        """[1, 3, 1, H, W] in [-1, 1]: one frame for the video-shaped VAE."""
        width, height = item.vae_size
        return self.processor.preprocess(item.image, height, width).unsqueeze(2)


def normalized_image_latents(vae: Any, pixels: torch.Tensor) -> torch.Tensor:
    """pixels [1, 3, 1, H, W] -> the VAE's most likely latents, normalised per channel as diffusers' Edit
    pipelines do ((z - mean) / std): [1, C, 1, H/s, W/s]."""
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
    channel = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(channel).to(latents.device, latents.dtype)
    std = torch.tensor(vae.config.latents_std).view(channel).to(latents.device, latents.dtype)
    return (latents - mean) / std


class QwenEditImageLatentsStage(Stage):
    """Each input image's normalised VAE latents packed into tokens: state.shared["image_latents"]
    [1, S_edit, 4C] (every image's tokens in order, shared by all outputs and both CFG branches) and
    state.shared["edit_grids"], their (frames, rows, cols) grids for the rotary positions."""

    name = "image_encoding"
    parallel = ParallelMode.ALL_RANKS

    def __init__(self, vae: Any, images: EditImages):
        self.vae = vae
        self.images = images

    def run(self, state: State) -> None:
        tokens: list[torch.Tensor] = []
        grids: list[Grid] = []
        for item in self.images.of(state):
            latents = normalized_image_latents(self.vae, self.images.vae_pixels(item))[:, :, 0]  # [1, C, h, w]
            tokens.append(pack_latents(latents).to(state.device, state.dtype))  # [1, h/2 * w/2, 4C]
            grids.append((1, latents.shape[-2] // 2, latents.shape[-1] // 2))
        state.shared["image_latents"] = torch.cat(tokens, dim=1)
        state.shared["edit_grids"] = grids

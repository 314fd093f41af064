"""sgdiff's own decoder for Wan's video VAE (diffusers' AutoencoderKLWan layout), so that decoding a
text-to-video request needs no diffusers import."""

from sgdiff.models.video_vae.config import VideoVaeConfig
from sgdiff.models.video_vae.decoder import VideoVaeDecoder

# what a diffusers AutoencoderKLWan checkpoint holds that decoding never uses (load_own_model's `ignored`)
ENCODER_PARTS = ("encoder", "quant_conv")

__all__ = ["ENCODER_PARTS", "VideoVaeConfig", "VideoVaeDecoder"]

"""Train the demo image model (FLUX.1 architecture, 128x128) and save it as a diffusers FluxPipeline."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sgdiff.demo.architecture import IMAGE_SIZE, MAX_TEXT_TOKENS, make_image_parts
from sgdiff.demo.train.data import ScenePool
from sgdiff.demo.train.loop import load_trained_vae, train_flow_matching, train_vae
from sgdiff.models.flux.packing import image_position_ids, pack_latents, text_position_ids
from sgdiff.pipeline.components import quiet_libraries
from sgdiff.pipeline.text_encoders import ClipPooledEncoder, T5SequenceEncoder


@dataclass(frozen=True)
class ImageTraining:
    vae_steps: int = 2500
    vae_batch: int = 64
    transformer_steps: int = 6000
    batch: int = 256
    pool: int = 60_000
    lr: float = 7e-4
    seed: int = 0


@torch.no_grad()
def encode_pool(vae, pool: ScenePool) -> torch.Tensor:
    """[N, 256, 4C] packed, normalised latents of every pool image. FLUX's VAE config carries the shift
    and scale that bring latents to zero mean and unit variance: they are measured here."""
    latents = pool.encode_all(lambda pictures: vae.encode(pictures[:, 0]).latent_dist.mode(), IMAGE_SIZE)
    vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1 / latents.std().item())
    return pack_latents((latents - vae.config.shift_factor) * vae.config.scaling_factor)  # [N, C, 32, 32] -> tokens


def train_transformer(
    parts: dict, pool: ScenePool, latents: torch.Tensor, run: ImageTraining, generator: torch.Generator, deadline: float
):
    clip = ClipPooledEncoder(parts["tokenizer"], parts["text_encoder"])
    t5 = T5SequenceEncoder(parts["tokenizer_2"], parts["text_encoder_2"])
    device = latents.device
    side = IMAGE_SIZE // 8  # latent grid after 4x VAE and 2x2 packing
    img_ids = image_position_ids(side, side).to(device)
    txt_ids = text_position_ids(MAX_TEXT_TOKENS).to(device)

    def predict(noisy: torch.Tensor, sigma: torch.Tensor, tokens: dict) -> torch.Tensor:  # noisy: [B, 256, 4C]
        return parts["transformer"](
            hidden_states=noisy,
            encoder_hidden_states=t5.encode(tokens["t5"]),
            pooled_projections=clip.encode(tokens["clip"]),
            timestep=sigma,  # FLUX takes sigma; it scales by 1000 inside
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]

    trained = [parts["transformer"], parts["text_encoder"], parts["text_encoder_2"]]
    return train_flow_matching("image transformer", trained, predict, latents, pool, run, generator, deadline)


def train_image_model(
    out: Path, run: ImageTraining, device: torch.device, deadline: float, vae_from: Path | None = None
) -> dict:
    """Train from `run.seed` and save a FluxPipeline folder (float16 weights) at `out`.
    `vae_from`: a folder with an already trained VAE of this architecture: it is reused, not trained."""
    from diffusers import AutoencoderKL, FluxPipeline

    torch.manual_seed(run.seed)
    generator = torch.Generator(device).manual_seed(run.seed)
    parts = make_image_parts()
    if vae_from is not None:
        parts["vae"] = load_trained_vae(AutoencoderKL, vae_from)
    clip = ClipPooledEncoder(parts["tokenizer"], parts["text_encoder"])
    t5 = T5SequenceEncoder(parts["tokenizer_2"], parts["text_encoder_2"])

    def tokenize(captions: list[str]) -> dict[str, torch.Tensor]:
        return {"clip": clip.tokenize(captions), "t5": t5.tokenize(captions, MAX_TEXT_TOKENS)}

    pool = ScenePool.sample(run.pool, run.seed, clip=False, tokenize=tokenize, device=device)
    for name in ("vae", "transformer", "text_encoder", "text_encoder_2"):
        parts[name].to(device)
    start = time.perf_counter()
    if vae_from is None:
        train_vae("image vae", parts["vae"], lambda rows: pool.pictures(rows, IMAGE_SIZE)[:, 0], pool, run, generator)
    latents = encode_pool(parts["vae"], pool)
    vae_seconds = time.perf_counter() - start
    steps, progress = train_transformer(parts, pool, latents, run, generator, deadline)
    with quiet_libraries():
        pipe = FluxPipeline(**parts).to("cpu", torch.float16)
        pipe.save_pretrained(out, safe_serialization=True)
    return {
        "vae_steps": run.vae_steps if vae_from is None else f"reused from {vae_from}",
        "vae_seconds": round(vae_seconds, 1),
        "transformer_steps": steps,
        "transformer_seconds": round(progress.seconds(), 1),
        "final_loss": progress.running,
    }

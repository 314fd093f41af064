"""Train the demo video model (Wan2.1 architecture, 64x64, 9 frames) and save it as a diffusers WanPipeline."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sgdiff.demo.architecture import MAX_TEXT_TOKENS, VIDEO_FRAMES, VIDEO_SIZE, make_video_parts
from sgdiff.demo.train.data import ScenePool
from sgdiff.demo.train.loop import load_trained_vae, train_flow_matching, train_vae
from sgdiff.pipeline.components import quiet_libraries
from sgdiff.pipeline.text_encoders import UMT5SequenceEncoder


@dataclass(frozen=True)
class VideoTraining:
    vae_steps: int = 1500
    vae_batch: int = 48
    transformer_steps: int = 12000
    batch: int = 256
    pool: int = 8000
    lr: float = 7e-4
    seed: int = 1


def as_videos(pictures: torch.Tensor) -> torch.Tensor:
    return pictures.permute(0, 2, 1, 3, 4)  # [B, T, 3, H, W] -> [B, 3, T, H, W]


@torch.no_grad()
def encode_pool(vae, pool: ScenePool) -> torch.Tensor:
    """[N, C, 3, 16, 16] normalised latents of every pool clip. Wan's VAE config carries a mean and std
    per latent channel: they are measured here."""
    latents = pool.encode_all(lambda p: vae.encode(as_videos(p)).latent_dist.mode(), VIDEO_SIZE, VIDEO_FRAMES, 64)
    per_channel = latents.transpose(0, 1).flatten(1)  # [C, N*T*H*W]
    mean, std = per_channel.mean(1), per_channel.std(1)
    vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
    return (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)


def train_transformer(
    parts: dict, pool: ScenePool, latents: torch.Tensor, run: VideoTraining, generator: torch.Generator, deadline: float
):
    encoder = UMT5SequenceEncoder(parts["tokenizer"], parts["text_encoder"])

    def predict(noisy: torch.Tensor, sigma: torch.Tensor, tokens: dict) -> torch.Tensor:  # noisy: [B, C, 3, 16, 16]
        return parts["transformer"](
            hidden_states=noisy,
            timestep=sigma * 1000,  # Wan takes the scheduler's 0..1000 timesteps
            encoder_hidden_states=encoder.encode(tokens["ids"], tokens["mask"]),
            return_dict=False,
        )[0]

    trained = [parts["transformer"], parts["text_encoder"]]
    return train_flow_matching("video transformer", trained, predict, latents, pool, run, generator, deadline)


def train_video_model(
    out: Path, run: VideoTraining, device: torch.device, deadline: float, vae_from: Path | None = None
) -> dict:
    """Train from `run.seed` and save a WanPipeline folder (float16 weights) at `out`.
    `vae_from`: a folder with an already trained VAE of this architecture: it is reused, not trained."""
    from diffusers import AutoencoderKLWan, WanPipeline

    from sgdiff.models.repo_configs import WAN_CLASS_NAMES

    torch.manual_seed(run.seed)
    generator = torch.Generator(device).manual_seed(run.seed)
    parts = make_video_parts()
    if vae_from is not None:
        parts["vae"] = load_trained_vae(AutoencoderKLWan, vae_from)
    encoder = UMT5SequenceEncoder(parts["tokenizer"], parts["text_encoder"])

    def tokenize(captions: list[str]) -> dict[str, torch.Tensor]:
        ids, mask = encoder.tokenize(captions, MAX_TEXT_TOKENS)
        return {"ids": ids, "mask": mask}

    pool = ScenePool.sample(run.pool, run.seed, clip=True, tokenize=tokenize, device=device)
    for name in ("vae", "transformer", "text_encoder"):
        parts[name].to(device)
    start = time.perf_counter()
    if vae_from is None:
        train_vae(
            "video vae",
            parts["vae"],
            lambda rows: as_videos(pool.pictures(rows, VIDEO_SIZE, VIDEO_FRAMES)),
            pool,
            run,
            generator,
        )
    latents = encode_pool(parts["vae"], pool)
    vae_seconds = time.perf_counter() - start
    steps, progress = train_transformer(parts, pool, latents, run, generator, deadline)
    with quiet_libraries():
        pipe = WanPipeline(**parts).to("cpu", torch.float16)
        pipe.register_to_config(tokenizer=WAN_CLASS_NAMES["tokenizer"])
        pipe.save_pretrained(out, safe_serialization=True)
    return {
        "vae_steps": run.vae_steps if vae_from is None else f"reused from {vae_from}",
        "vae_seconds": round(vae_seconds, 1),
        "transformer_steps": steps,
        "transformer_seconds": round(progress.seconds(), 1),
        "final_loss": progress.running,
    }

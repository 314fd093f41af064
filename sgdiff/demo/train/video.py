"""Train the demo video model (Wan2.1 architecture, 64x64, 9 frames) and save it as a diffusers WanPipeline."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sgdiff.demo.architecture import MAX_TEXT_TOKENS, VIDEO_FRAMES, VIDEO_SIZE, make_video_parts
from sgdiff.demo.train.data import ScenePool
from sgdiff.demo.train.loop import Progress, WeightAverage, load_trained_vae, make_optimizer, noise_levels
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


def train_vae(vae, pool: ScenePool, steps: int, batch: int, generator: torch.Generator, kl_weight: float = 1e-6):
    optimizer, schedule = make_optimizer(vae.parameters(), 1e-3, steps)
    progress = Progress("video vae", steps)
    vae.train()
    for step in range(steps):
        videos = as_videos(pool.pictures(pool.sample_rows(batch, generator), VIDEO_SIZE, VIDEO_FRAMES))
        posterior = vae.encode(videos).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(recon, videos) + kl_weight * posterior.kl().mean()
        schedule.set(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.step(step, loss)
    vae.eval().requires_grad_(False)


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
    transformer = parts["transformer"]
    encoder = UMT5SequenceEncoder(parts["tokenizer"], parts["text_encoder"])
    trained = [transformer, parts["text_encoder"]]
    for module in trained:
        module.train().requires_grad_(True)
    optimizer, schedule = make_optimizer(
        (p for m in trained for p in m.parameters()), run.lr, run.transformer_steps, deadline
    )
    average = WeightAverage(trained, decay=0.999)
    device = next(transformer.parameters()).device
    progress = Progress("video transformer", run.transformer_steps)
    done = 0
    for step in range(run.transformer_steps):
        if time.monotonic() > deadline:
            print(f"[video transformer] deadline reached after {step} steps", flush=True)
            break
        rows = pool.sample_rows(run.batch, generator)
        clean, tokens = latents.index_select(0, rows), pool.tokens_of(rows)  # [B, C, 3, 16, 16]
        noise = torch.randn(clean.shape, generator=generator, device=device)
        sigma = noise_levels(run.batch, generator)
        noisy = (1 - sigma.view(-1, 1, 1, 1, 1)) * clean + sigma.view(-1, 1, 1, 1, 1) * noise
        prediction = transformer(
            hidden_states=noisy,
            timestep=sigma * 1000,
            encoder_hidden_states=encoder.encode(tokens["ids"], tokens["mask"]),
            return_dict=False,
        )[0]
        loss = torch.nn.functional.mse_loss(prediction, noise - clean)
        schedule.set(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for m in trained for p in m.parameters()], 1.0)
        optimizer.step()
        average.update(step)
        progress.step(step, loss)
        done = step + 1
    average.copy_to_modules()
    for module in trained:
        module.eval().requires_grad_(False)
    return done, progress


def train_video_model(
    out: Path, run: VideoTraining, device: torch.device, deadline: float, vae_from: Path | None = None
) -> dict:
    """Train from `run.seed` and save a WanPipeline folder (float16 weights) at `out`.
    `vae_from`: a folder with an already trained VAE of this architecture: it is reused, not trained."""
    from diffusers import AutoencoderKLWan, WanPipeline

    from sgdiff.testing.tiny_wan import REAL_CLASS_NAMES

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
        train_vae(parts["vae"], pool, run.vae_steps, run.vae_batch, generator)
    latents = encode_pool(parts["vae"], pool)
    vae_seconds = time.perf_counter() - start
    steps, progress = train_transformer(parts, pool, latents, run, generator, deadline)
    with quiet_libraries():
        pipe = WanPipeline(**parts).to("cpu", torch.float16)
        pipe.register_to_config(tokenizer=REAL_CLASS_NAMES["tokenizer"])
        pipe.save_pretrained(out, safe_serialization=True)
    return {
        "vae_steps": run.vae_steps if vae_from is None else f"reused from {vae_from}",
        "vae_seconds": round(vae_seconds, 1),
        "transformer_steps": steps,
        "transformer_seconds": round(progress.seconds(), 1),
        "final_loss": progress.running,
    }

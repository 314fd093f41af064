"""Train the demo image model (FLUX.1 architecture, 128x128) and save it as a diffusers FluxPipeline."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sgdiff.demo.architecture import IMAGE_SIZE, MAX_TEXT_TOKENS, make_image_parts
from sgdiff.demo.train.data import ScenePool
from sgdiff.demo.train.loop import Progress, WeightAverage, load_trained_vae, make_optimizer, noise_levels
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


def train_vae(vae, pool: ScenePool, steps: int, batch: int, generator: torch.Generator, kl_weight: float = 1e-6):
    optimizer, schedule = make_optimizer(vae.parameters(), 1e-3, steps)
    progress = Progress("image vae", steps)
    vae.train()
    for step in range(steps):
        images = pool.pictures(pool.sample_rows(batch, generator), IMAGE_SIZE)[:, 0]  # [B, 3, H, W]
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        loss = torch.nn.functional.mse_loss(recon, images) + kl_weight * posterior.kl().mean()
        schedule.set(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.step(step, loss)
    vae.eval().requires_grad_(False)


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
    transformer = parts["transformer"]
    clip = ClipPooledEncoder(parts["tokenizer"], parts["text_encoder"])
    t5 = T5SequenceEncoder(parts["tokenizer_2"], parts["text_encoder_2"])
    trained = [transformer, parts["text_encoder"], parts["text_encoder_2"]]
    for module in trained:
        module.train().requires_grad_(True)
    optimizer, schedule = make_optimizer(
        (p for m in trained for p in m.parameters()), run.lr, run.transformer_steps, deadline
    )
    average = WeightAverage(trained, decay=0.999)
    device = next(transformer.parameters()).device
    side = IMAGE_SIZE // 8  # latent grid after 4x VAE and 2x2 packing
    img_ids = image_position_ids(side, side).to(device)
    txt_ids = text_position_ids(MAX_TEXT_TOKENS).to(device)
    progress = Progress("image transformer", run.transformer_steps)
    done = 0
    for step in range(run.transformer_steps):
        if time.monotonic() > deadline:
            print(f"[image transformer] deadline reached after {step} steps", flush=True)
            break
        rows = pool.sample_rows(run.batch, generator)
        clean, tokens = latents.index_select(0, rows), pool.tokens_of(rows)  # [B, 256, 4C]
        noise = torch.randn(clean.shape, generator=generator, device=device)
        sigma = noise_levels(run.batch, generator)
        noisy = (1 - sigma[:, None, None]) * clean + sigma[:, None, None] * noise
        prediction = transformer(
            hidden_states=noisy,
            encoder_hidden_states=t5.encode(tokens["t5"]),
            pooled_projections=clip.encode(tokens["clip"]),
            timestep=sigma,
            img_ids=img_ids,
            txt_ids=txt_ids,
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
        train_vae(parts["vae"], pool, run.vae_steps, run.vae_batch, generator)
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

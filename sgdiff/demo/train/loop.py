"""What both demo models' training shares: the optimiser and its schedule, an exponential moving
average of the weights, flow-matching noise levels, and a progress log."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from sgdiff.pipeline.components import quiet_libraries


class LearningRate:
    """Linear warm-up, then cosine decay to a tenth of `peak` over `steps` or over the time left
    before `deadline` (time.monotonic()), whichever ends first: a run cut short still anneals."""

    def __init__(self, optimizer: torch.optim.Optimizer, peak: float, steps: int, deadline: float, warmup: int = 300):
        self.optimizer, self.peak, self.steps, self.warmup = optimizer, peak, steps, warmup
        self.start, self.deadline = time.monotonic(), deadline

    def set(self, step: int) -> None:
        if step < self.warmup:
            factor = (step + 1) / self.warmup
        else:
            by_steps = (step - self.warmup) / max(1, self.steps - self.warmup)
            by_time = (time.monotonic() - self.start) / max(1e-9, self.deadline - self.start)
            progress = min(1.0, max(by_steps, by_time))
            factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        for group in self.optimizer.param_groups:
            group["lr"] = self.peak * factor


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float, steps: int, deadline: float = math.inf):
    optimizer = torch.optim.AdamW(list(params), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    return optimizer, LearningRate(optimizer, lr, steps, deadline)


class WeightAverage:
    """EMA of the modules' parameters (buffers are copied as they are)."""

    def __init__(self, modules: list[torch.nn.Module], decay: float):
        self.modules, self.decay = modules, decay
        self.shadow = [[p.detach().clone() for p in m.parameters()] for m in modules]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short memory early on
        for module, shadow in zip(self.modules, self.shadow, strict=True):
            torch._foreach_lerp_(shadow, [p.detach() for p in module.parameters()], 1 - decay)

    @torch.no_grad()
    def copy_to_modules(self) -> None:
        for module, shadow in zip(self.modules, self.shadow, strict=True):
            for param, average in zip(module.parameters(), shadow, strict=True):
                param.copy_(average)


def noise_levels(batch: int, generator: torch.Generator) -> torch.Tensor:
    """[B] flow-matching sigmas in (0, 1), logit-normal (more weight mid-way, as SD3 and FLUX train)."""
    return torch.sigmoid(torch.randn(batch, generator=generator, device=generator.device))


class Progress:
    def __init__(self, name: str, steps: int, every: int = 250):
        self.name, self.steps, self.every = name, steps, every
        self.start = time.perf_counter()
        self.running: float | None = None

    def step(self, step: int, loss: torch.Tensor) -> None:
        if step % self.every and step != self.steps - 1:
            return
        value = loss.item()  # a sync only every `every` steps
        self.running = value if self.running is None else 0.7 * self.running + 0.3 * value
        elapsed = time.perf_counter() - self.start
        print(f"[{self.name}] step {step + 1}/{self.steps} loss {value:.5f} ({elapsed:.0f} s)", flush=True)

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def load_trained_vae(vae_class, folder: Path):
    """A VAE saved by an earlier run (float16 on disk), in float32 for training the transformer."""
    with quiet_libraries():
        return vae_class.from_pretrained(folder, dtype=torch.float32, use_safetensors=True).eval().requires_grad_(False)


def train_vae(name: str, vae, pictures: Callable[[torch.Tensor], torch.Tensor], pool, run, generator) -> None:
    """Reconstruction (MSE) + a small KL term for run.vae_steps batches of run.vae_batch pool rows;
    `pictures(rows)` -> the VAE's input for those rows."""
    optimizer, schedule = make_optimizer(vae.parameters(), 1e-3, run.vae_steps)
    progress = Progress(name, run.vae_steps)
    vae.train()
    for step in range(run.vae_steps):
        x = pictures(pool.sample_rows(run.vae_batch, generator))
        posterior = vae.encode(x).latent_dist
        loss = torch.nn.functional.mse_loss(vae.decode(posterior.sample()).sample, x) + 1e-6 * posterior.kl().mean()
        schedule.set(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.step(step, loss)
    vae.eval().requires_grad_(False)


# predict(noisy latents, sigmas [B], the rows' token tensors) -> velocity with the latents' shape
Predict = Callable[[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


def train_flow_matching(
    name: str,
    trained: list[torch.nn.Module],
    predict: Predict,
    latents: torch.Tensor,
    pool,
    run,
    generator: torch.Generator,
    deadline: float,
) -> tuple[int, Progress]:
    """The transformer (and its text encoders, all of `trained`) learns the velocity noise - x0 at noisy
    latents (1 - sigma) x0 + sigma noise; AdamW, EMA of the weights (copied in at the end). Stops after
    run.transformer_steps or at `deadline`; returns the steps run."""
    for module in trained:
        module.train().requires_grad_(True)
    params = [p for m in trained for p in m.parameters()]
    optimizer, schedule = make_optimizer(params, run.lr, run.transformer_steps, deadline)
    average = WeightAverage(trained, decay=0.999)
    progress = Progress(name, run.transformer_steps)
    done = 0
    for step in range(run.transformer_steps):
        if time.monotonic() > deadline:
            print(f"[{name}] deadline reached after {step} steps", flush=True)
            break
        rows = pool.sample_rows(run.batch, generator)
        clean, tokens = latents.index_select(0, rows), pool.tokens_of(rows)
        noise = torch.randn(clean.shape, generator=generator, device=clean.device)
        sigma = noise_levels(run.batch, generator)
        s = sigma.view(-1, *[1] * (clean.ndim - 1))  # [B, 1, ...]
        loss = torch.nn.functional.mse_loss(predict((1 - s) * clean + s * noise, sigma, tokens), noise - clean)
        schedule.set(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        average.update(step)
        progress.step(step, loss)
        done = step + 1
    average.copy_to_modules()
    for module in trained:
        module.eval().requires_grad_(False)
    return done, progress

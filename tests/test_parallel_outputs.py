"""N CPU processes (gloo) give the single-process result: CFG parallel, Ulysses, Ring, USP and
CFG + Ulysses, for FLUX (joint text + image attention) and Wan (self + cross attention), at token
counts the ranks do not divide evenly."""

from __future__ import annotations

import pytest
import torch

from sgdiff.config import ParallelConfig, RuntimeConfig
from sgdiff.engine.runner import ModelRunner
from sgdiff.testing.distributed import parallel_latents, run_on_ranks

MODES = {
    "cfg-2": ParallelConfig(2, enable_cfg_parallel=True),
    "ulysses-2": ParallelConfig(2),
    "ulysses-4": ParallelConfig(4),
    "ring-2": ParallelConfig(2, ring_degree=2),
    "ring-3": ParallelConfig(3, ring_degree=3),
    "ring-4": ParallelConfig(4, ring_degree=4),
    "usp-2x2": ParallelConfig(4, ulysses_degree=2, ring_degree=2),
    "cfg-ulysses-2x2": ParallelConfig(4, enable_cfg_parallel=True),
}
# FLUX 32x80 (tiny VAE: 2x, then 2x2 packing): 8x20 = 160 image tokens + 512 text tokens, uneven over 3
# ranks; Wan 48x48x9: 3 latent frames x 3x3 patches = 27 video tokens, uneven over 2 and 4 ranks.
REQUESTS = {
    "flux": dict(height=32, width=80, num_inference_steps=3, negative_prompt="blurry", true_cfg_scale=3.0),
    "wan": dict(height=48, width=48, num_frames=9, num_inference_steps=3, negative_prompt="blurry", guidance_scale=3.0),
}


@pytest.fixture(scope="module")
def models(tiny_flux_dev, tiny_wan):
    return {"flux": str(tiny_flux_dev), "wan": str(tiny_wan("t2v"))}


@pytest.fixture(scope="module")
def single_process(models):
    def latents(model: str) -> torch.Tensor:
        engine = ModelRunner(models[model], runtime=RuntimeConfig(device="cpu", dtype="fp32"))
        return engine.generate(engine.sampling_params("a red cube", **REQUESTS[model])).latents

    return {model: latents(model) for model in models}


# three and four processes in the slow tier (CI runs it: pytest -m slow); two in every run
@pytest.mark.parametrize(
    "mode", [pytest.param(m, marks=pytest.mark.slow) if MODES[m].num_gpus > 2 else m for m in MODES]
)
def test_parallel_latents_equal_one_process(mode, models, single_process):
    requests = [(models[model], "a red cube", REQUESTS[model]) for model in REQUESTS]
    per_rank = run_on_ranks(MODES[mode], parallel_latents, requests)  # one spawn serves both models
    for rank, (outputs, loaded) in enumerate(per_rank):
        for model, latents, parts in zip(REQUESTS, outputs, loaded, strict=True):
            reference = single_process[model]
            assert latents.shape == reference.shape
            difference = (latents - reference).abs().max().item()
            assert difference <= 1e-4, f"{model} {mode} rank {rank}: max abs diff {difference}"
            # rank 0 encodes the prompts and sends the embeddings: the others hold no text encoder
            assert ("text_encoder" in parts) == (rank == 0) and "transformer" in parts

"""Checkpoints on disk for the end-to-end benchmark: a full-size FLUX.1 with random weights in
diffusers' layout (speed does not depend on weight values; no weights can be downloaded here), or the
tests' tiny one. Tokenizers are made in code (their ids fit the real vocabularies); every other part
has the real architecture, in bf16. Full size needs a CUDA GPU (~35 GB free) and ~34 GB of disk."""

from __future__ import annotations

from pathlib import Path

import torch

from sgdiff.bench.parts import BENCH_MODELS, CLIP_L, FLUX_VAE, T5_XXL, diffusers_kwargs, seeded
from sgdiff.errors import UserError
from sgdiff.models.repo_configs import FLUX_SCHEDULER_CONFIGS
from sgdiff.testing.tiny_flux import make_clip_tokenizer, make_t5_tokenizer

CHECKPOINT_MODELS = ("flux.1-dev", "flux.1-schnell")


def flux_pipeline(name: str, device: torch.device):
    """diffusers' FluxPipeline of `name` at full size, random bf16 weights, on `device`."""
    import diffusers
    import transformers

    bf16 = torch.bfloat16
    tokenizer, tokenizer_2 = make_clip_tokenizer(), make_t5_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    clip_config = transformers.CLIPTextConfig(**CLIP_L, **ids)
    transformer_kwargs = diffusers_kwargs(BENCH_MODELS[name].config)
    variant = "dev" if name == "flux.1-dev" else "schnell"
    return diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIGS[variant]),
        tokenizer=tokenizer,
        text_encoder=seeded(1, bf16, device, lambda: transformers.CLIPTextModel(clip_config)),
        tokenizer_2=tokenizer_2,
        text_encoder_2=seeded(2, bf16, device, lambda: transformers.T5EncoderModel(transformers.T5Config(**T5_XXL))),
        transformer=seeded(0, bf16, device, lambda: diffusers.FluxTransformer2DModel(**transformer_kwargs)),
        vae=seeded(4, bf16, device, lambda: diffusers.AutoencoderKL(**FLUX_VAE)),
    )


def ensure_checkpoint(name: str, folder: Path, tiny: bool) -> Path:
    """`folder` holding the checkpoint (written once: a folder with a model_index.json is reused)."""
    if (folder / "model_index.json").is_file():
        return folder
    if name not in CHECKPOINT_MODELS:
        raise UserError(f"the end-to-end benchmark writes {list(CHECKPOINT_MODELS)} checkpoints, not {name}",
                        field="model")  # fmt: skip
    if tiny:
        from sgdiff.testing.tiny_flux import build_tiny_flux

        return build_tiny_flux(folder, variant="dev" if name == "flux.1-dev" else "schnell")
    if not torch.cuda.is_available():
        raise UserError("a full-size checkpoint is built on a CUDA GPU (~35 GB): run on one, or use `tiny`")
    flux_pipeline(name, torch.device("cuda")).save_pretrained(folder, safe_serialization=True)
    return folder

"""A full-size FLUX.1 checkpoint with random weights, in diffusers' layout, for timing whole
processes (`sgdiff generate`, diffusers' FluxPipeline) on a GPU: speed does not depend on weight
values, and no weights can be downloaded here. Tokenizers are made in code (their ids fit the real
vocabularies); every other part has the real architecture, in bf16.

    python scripts/make_random_checkpoint.py --model flux.1-dev --out /tmp/flux-dev

Needs a CUDA GPU (~35 GB free) and ~34 GB of disk; about a minute on an H100.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgdiff.bench.parts import BENCH_MODELS, CLIP_L, FLUX_VAE, T5_XXL, diffusers_kwargs, seeded  # noqa: E402
from sgdiff.models.repo_configs import FLUX_SCHEDULER_CONFIGS  # noqa: E402
from sgdiff.testing.tiny_flux import make_clip_tokenizer, make_t5_tokenizer  # noqa: E402


def flux_pipeline(name: str, device: torch.device):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["flux.1-dev", "flux.1-schnell"], default="flux.1-dev")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    pipeline = flux_pipeline(args.model, torch.device("cuda"))
    built = time.perf_counter()
    pipeline.save_pretrained(args.out, safe_serialization=True)
    print(f"{args.model}: built in {built - start:.1f} s, saved to {args.out} in {time.perf_counter() - built:.1f} s")


if __name__ == "__main__":
    main()

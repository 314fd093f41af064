"""FLUX.1-dev end to end: sgdiff's pipeline vs diffusers' FluxPipeline on the same full-size
random-weight parts (CLIP-L, T5-XXL, the 12B transformer, the FLUX VAE), same GPU, same run.

sgdiff's transformer and text encoders are given the very same tensors as diffusers' FluxTransformer2DModel
and transformers' CLIPTextModel / T5EncoderModel, its VAE decoder the AutoencoderKL's decoding weights. Each
pipeline makes the same request (prompt, size, steps, guidance, CPU-generator seed); the script reports how
close the images are and times whole generations, the two pipelines taking turns.

    python scripts/probes/bench_flux_pipeline.py [--height 1024 --width 1024 --steps 28] [--json out.json]

Needs a CUDA GPU with ~45 GB free and diffusers installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

SCRIPTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(SCRIPTS), str(SCRIPTS.parent)]  # bench_flux_transformer (scripts/) and sgdiff from this checkout

from bench_flux_transformer import DEVICE, build_models  # noqa: E402

from sgdiff.bench.parts import CLIP_L, FLUX_VAE, T5_XXL, sgdiff_text_encoder  # noqa: E402
from sgdiff.families.flux.pipeline import FluxComponents, compose_flux_pipeline  # noqa: E402
from sgdiff.families.flux.sampling import FluxSampling  # noqa: E402
from sgdiff.models.image_vae import ImageVaeConfig, ImageVaeDecoder  # noqa: E402
from sgdiff.models.repo_configs import FLUX_SCHEDULER_CONFIGS  # noqa: E402
from sgdiff.pipeline.base import State  # noqa: E402
from sgdiff.pipeline.schedule import FlowMatchSchedule  # noqa: E402
from sgdiff.pipeline.stages.latents import seeded_noise  # noqa: E402
from sgdiff.testing import tiny_configs  # noqa: E402
from sgdiff.testing.tiny_flux import make_clip_tokenizer, make_t5_tokenizer  # noqa: E402


def build_parts(tiny: bool):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = make_clip_tokenizer(), make_t5_tokenizer()  # tiny vocabularies: ids fit the real ones
    reference_transformer, transformer = build_models(tiny)
    if tiny:
        clip_config, t5_config, vae_config = tiny_configs.FLUX_CLIP, tiny_configs.FLUX_T5, tiny_configs.FLUX_VAE
    else:
        clip_config, t5_config, vae_config = CLIP_L, T5_XXL, FLUX_VAE
    vocab = {"vocab_size": len(tokenizer)} if tiny else {}
    torch.manual_seed(1)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(DEVICE):
        clip = CLIPTextModel(
            CLIPTextConfig(
                eos_token_id=tokenizer.eos_token_id,
                bos_token_id=tokenizer.bos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **{**clip_config, **vocab},
            )
        )
        t5 = T5EncoderModel(T5Config(pad_token_id=0, eos_token_id=1, **{**t5_config, "vocab_size": 32128}))
        vae = AutoencoderKL(**vae_config)
        decoder = ImageVaeDecoder(ImageVaeConfig.from_dict(dict(vae.config)))  # sgdiff's, on the same weights
    torch.set_default_dtype(torch.float32)
    decoding = {k: v for k, v in vae.state_dict().items() if not k.startswith(("encoder.", "quant_conv."))}
    decoder.load_state_dict(decoding)
    own_clip, own_t5 = sgdiff_text_encoder(clip), sgdiff_text_encoder(t5)
    parts = FluxComponents(tokenizer, own_clip, tokenizer_2, own_t5, transformer, decoder.eval())
    return parts, (clip.eval(), t5.eval()), reference_transformer, vae.eval()


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tiny", action="store_true", help="tiny parts: checks the script, times nothing real")
    args = parser.parse_args()

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    parts, (reference_clip, reference_t5), reference_transformer, reference_vae = build_parts(args.tiny)
    dev_schedule = FLUX_SCHEDULER_CONFIGS["dev"]
    reference = FluxPipeline(
        FlowMatchEulerDiscreteScheduler(**dev_schedule),
        reference_vae,
        reference_clip,
        parts.tokenizer,
        reference_t5,
        parts.tokenizer_2,
        reference_transformer,
    )
    reference.set_progress_bar_config(disable=True)
    ours = compose_flux_pipeline(parts, FlowMatchSchedule.from_dict(dev_schedule))
    params = FluxSampling(
        prompt="a cat holding a sign that says hello world",
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=3.5,
        seed=0,
    )
    device = torch.device(DEVICE)

    def run_ours() -> tuple[np.ndarray, State]:
        state = ours(State(params=params, device=device, dtype=torch.bfloat16))
        return state.images[0], state

    def run_reference() -> np.ndarray:
        images = reference(
            params.prompt,
            height=params.height,
            width=params.width,
            output_type="np",
            num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale,
            max_sequence_length=params.max_sequence_length,
            generator=torch.Generator("cpu").manual_seed(params.seed),
        ).images
        return (images[0] * 255).round().astype(np.uint8)

    # noise from a CUDA generator is drawn as diffusers draws it too (--generator-device cuda)
    from diffusers.utils.torch_utils import randn_tensor

    cuda_params = FluxSampling(prompt="x", seed=5, generator_device=DEVICE)
    shape = (1, 16, args.height // 8, args.width // 8)
    ours_noise = seeded_noise(shape, cuda_params, torch.bfloat16, device)
    cuda_generator = torch.Generator(DEVICE).manual_seed(5)
    ref_noise = randn_tensor(shape, generator=cuda_generator, device=device, dtype=torch.bfloat16)
    cuda_noise_equal = torch.equal(ours_noise, ref_noise)

    with torch.inference_mode():
        ours_image, state = run_ours()  # warm-up, and the images to compare
        ref_image = run_reference()
        seconds = {"diffusers FluxPipeline": [], "sgdiff": []}
        stage_seconds = []
        for _ in range(args.repeat):
            for name in seconds:
                sync()
                start = time.perf_counter()
                if name == "sgdiff":
                    stage_seconds.append(run_ours()[1].stage_seconds)
                else:
                    run_reference()
                sync()
                seconds[name].append(time.perf_counter() - start)

    diff = np.abs(ours_image.astype(int) - ref_image.astype(int))
    mse = float(((ours_image.astype(float) - ref_image.astype(float)) ** 2).mean())
    psnr = 10 * np.log10(255**2 / mse) if mse else float("inf")
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    median_stages = {k: statistics.median(s[k] for s in stage_seconds) for k in stage_seconds[0]}
    result = {
        "card": card,
        "torch": torch.__version__,
        "height": args.height,
        "width": args.width,
        "steps": args.steps,
        "seconds": seconds,
        "sgdiff_stage_seconds_median": median_stages,
        "image_max_abs_diff": int(diff.max()),
        "image_mean_abs_diff": float(diff.mean()),
        "image_psnr_db": psnr,
        "image_std": [float(ours_image.std()), float(ref_image.std())],
        "cuda_generator_noise_equal": cuda_noise_equal,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))

    size = f"{args.height}x{args.width}, {args.steps} steps"
    print(f"\nFLUX.1-dev end to end, {size}, bf16, {card}, torch {torch.__version__}")
    print(
        f"images sgdiff vs diffusers (bf16): max abs {diff.max()}, mean abs {diff.mean():.2f} of 255, "
        f"PSNR {psnr:.1f} dB; std {ours_image.std():.1f} / {ref_image.std():.1f}"
    )
    print(f"CUDA-generator noise identical to diffusers': {cuda_noise_equal}")
    print("sgdiff stages (median s): " + ", ".join(f"{k} {v:.3f}" for k, v in median_stages.items()))
    baseline = statistics.median(seconds["diffusers FluxPipeline"])
    print(f"{'pipeline':26s} {'median s':>9s} {'min':>7s} {'max':>7s} {'speed-up':>9s}")
    for name, runs in seconds.items():
        median = statistics.median(runs)
        print(f"{name:26s} {median:9.2f} {min(runs):7.2f} {max(runs):7.2f} {baseline / median:8.2f}x")


if __name__ == "__main__":
    main()

"""Wan2.1 transformer (1.3B, 14B) and VAE decode: sgdiff vs diffusers, same random weights, same GPU.

For each size, diffusers' WanTransformer3DModel is built at full size in bf16 (with the parts
diffusers keeps in float32 made float32, as from_pretrained does), sgdiff's WanTransformer gets the
very same tensors, bf16 parity is checked, and one forward at 832x480x81 (21 latent frames, 32760
tokens, 512 text tokens) is timed with the two models taking turns. Then the float32 Wan VAE
decodes 81 frames at 480p, as sgdiff's pipeline does.

    python scripts/probes/bench_wan.py [--sizes 1.3b 14b] [--json out.json] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(SCRIPTS), str(SCRIPTS.parent)]  # bench_common (scripts/) and sgdiff from this checkout

from bench_common import DEVICE, print_top_kernels, speed_matrix, time_call, time_interleaved  # noqa: E402

from sgdiff.bench.parts import BENCH_MODELS, build_transformers  # noqa: E402
from sgdiff.models.wan import WanTransformerConfig  # noqa: E402
from sgdiff.testing.compare import relative_error  # noqa: E402

SIZES = {"1.3b": "wan2.1-t2v-1.3b", "14b": "wan2.1-t2v-14b"}  # sgdiff bench's names
# FLOPs per forward at 832x480x81 (torch.utils.flop_counter on diffusers', ../shared/GPU_NOTES.md)
FLOPS = {"1.3b": 283e12, "14b": 1678e12}


def make_inputs(config: WanTransformerConfig, frames: int, height: int, width: int, seed: int):
    g = torch.Generator(DEVICE).manual_seed(seed)
    bf16 = dict(device=DEVICE, dtype=torch.bfloat16)
    return dict(
        hidden_states=torch.randn(1, config.in_channels, frames, height, width, generator=g, **bf16),
        timestep=torch.tensor([500.0], device=DEVICE),
        encoder_hidden_states=torch.randn(1, 512, config.text_dim, generator=g, **bf16),
    )


def bench_transformer(name: str, latent: tuple[int, int, int], args) -> dict:
    """(diffusers' WanTransformer3DModel, sgdiff's WanTransformer on the same tensors), bf16 (the parts
    diffusers keeps in float32 float32, as from_pretrained does), timed in turns."""
    reference, ours = build_transformers(BENCH_MODELS[SIZES[name]], args.tiny, torch.device(DEVICE))
    config = ours.config
    with torch.inference_mode():
        errors = []
        for seed in (1, 2):
            x = make_inputs(config, *latent, seed)
            expected, actual = reference(**x, return_dict=False)[0], ours(**x)
            assert torch.isfinite(actual).all(), "non-finite output"
            errors.append(relative_error(actual, expected))
        x = make_inputs(config, *latent, 3)
        baseline = {"diffusers WanTransformer3DModel": lambda: reference(**x, return_dict=False)}
        if args.profile:
            print_top_kernels(lambda: ours(**x))
        extra = {}
        if args.matrix:
            times, extra = speed_matrix(ours, lambda: ours(**x), args.warmup, args.repeat, baseline)
            extra["rel_err_compiled"] = relative_error(ours(**x), reference(**x, return_dict=False)[0])
        else:
            times = time_interleaved({**baseline, "sgdiff WanTransformer": lambda: ours(**x)}, args.warmup, args.repeat)
    ms = {k: statistics.median(v) for k, v in times.items()}
    return {"model": "tiny" if args.tiny else name, "rel_err": max(errors), "ms": ms, **extra}


def bench_vae(latent: tuple[int, int, int], tiny: bool) -> dict:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    with torch.device(DEVICE):
        vae = AutoencoderKLWan(base_dim=8, z_dim=16) if tiny else AutoencoderKLWan()
    vae = vae.eval().requires_grad_(False)
    z = torch.randn(1, vae.config.z_dim, *latent, device=DEVICE)
    with torch.inference_mode():
        vae.decode(z)  # warm-up
        seconds = [time_call(lambda: vae.decode(z)) / 1e3 for _ in range(2)]
    return {"vae_decode_s": statistics.median(seconds), "frames": (latent[0] - 1) * 4 + 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["1.3b", "14b"], choices=list(SIZES))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tiny", action="store_true", help="tiny models: checks the script, times nothing real")
    parser.add_argument("--matrix", action="store_true", help="sgdiff's speed toggles one by one (bench_common)")
    args = parser.parse_args()

    latent = (2, 4, 6) if args.tiny else (21, 60, 104)  # 832x480x81 -> 21 x 60 x 104 latents
    rows = [bench_transformer(n, latent, args) for n in args.sizes]
    vae = bench_vae(latent, args.tiny)
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    result = {"card": card, "torch": torch.__version__, "transformers": rows, **vae}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))

    print(f"\nWan2.1 at 832x480x81, bf16, {card}, torch {torch.__version__}")
    header = ("model, sgdiff variant", "diffusers", "sgdiff ms", "speed-up", "TFLOP/s", "rel err")
    print("{:44s} {:>9s} {:>9s} {:>9s} {:>8s} {:>9s}".format(*header))
    for row in rows:
        reference, *variants = row["ms"].items()
        for variant, ours in variants:
            tflops = FLOPS.get(row["model"], float("nan")) / 1e12 / (ours / 1e3)
            speedup = reference[1] / ours
            label = f"{row['model']} {variant.removeprefix('sgdiff')}"
            print(f"{label:44s} {reference[1]:9.1f} {ours:9.1f} {speedup:8.2f}x {tflops:8.0f} {row['rel_err']:9.2e}")
        if "compile_s" in row:
            print(f"  torch.compile first call {row['compile_s']:.1f} s; rel err {row['rel_err_compiled']:.2e}")
    print(f"VAE decode, {vae['frames']} frames at 480p, float32: {vae['vae_decode_s']:.2f} s")


if __name__ == "__main__":
    main()

"""Write a tiny Wan 2.1 / 2.2 pipeline (diffusers format) to OUT_DIR, fully offline.

The model has RANDOM weights and generates noise: it exists only to test loading,
scheduling and the generation loop quickly on a CPU, never to make real videos.

Variants mirror the real Wan-AI diffusers repos:
    t2v       Wan2.1-T2V-1.3B       WanPipeline
    i2v       Wan2.1-I2V-14B-480P   WanImageToVideoPipeline with a CLIP image encoder
    t2v-a14b  Wan2.2-T2V-A14B       WanPipeline, two transformers, boundary_ratio 0.875
    i2v-a14b  Wan2.2-I2V-A14B       WanImageToVideoPipeline, two transformers, boundary_ratio 0.9
    ti2v      Wan2.2-TI2V-5B        WanPipeline, Wan2.2 VAE, expand_timesteps

    python scripts/probes/make_tiny_wan.py OUT_DIR [--variant t2v|i2v|t2v-a14b|i2v-a14b|ti2v] [--seed N]
"""

from __future__ import annotations

import argparse
import os

# transformers' import-time advice (torchvision missing) is noise here
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from sgdiff.testing.tiny_wan import WAN_VARIANTS, build_tiny_wan  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write the pipeline into")
    parser.add_argument("--variant", choices=WAN_VARIANTS, default="t2v")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build_tiny_wan(args.out_dir, variant=args.variant, seed=args.seed))


if __name__ == "__main__":
    main()

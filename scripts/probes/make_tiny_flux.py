"""Write a tiny FLUX.1 pipeline (diffusers format) to OUT_DIR, fully offline.

The model has RANDOM weights and generates noise: it exists only to test loading,
scheduling and the generation loop quickly on a CPU, never to make real images.

    python scripts/probes/make_tiny_flux.py OUT_DIR [--variant dev|schnell] [--seed N] [--shard-transformer]
"""

from __future__ import annotations

import argparse
import os

# transformers' import-time advice (torchvision missing) is noise here
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from sgdiff.testing.tiny_flux import build_tiny_flux  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write the pipeline into")
    parser.add_argument("--variant", choices=["dev", "schnell"], default="dev")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-transformer", action="store_true", help="save the transformer in several shards")
    args = parser.parse_args(argv)
    print(build_tiny_flux(args.out_dir, variant=args.variant, seed=args.seed, shard_transformer=args.shard_transformer))


if __name__ == "__main__":
    main()

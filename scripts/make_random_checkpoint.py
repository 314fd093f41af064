"""A full-size FLUX.1 checkpoint with random weights, in diffusers' layout, for timing whole
processes (`sgdiff generate`, diffusers' FluxPipeline) on a GPU (sgdiff/bench/checkpoint.py builds it;
`sgdiff bench --e2e` does too).

    python scripts/make_random_checkpoint.py --model flux.1-dev --out /tmp/flux-dev

Needs a CUDA GPU (~35 GB free) and ~34 GB of disk; about a minute on an H100.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgdiff.bench.checkpoint import CHECKPOINT_MODELS, ensure_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=CHECKPOINT_MODELS, default="flux.1-dev")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    ensure_checkpoint(args.model, args.out, tiny=False)
    print(f"{args.model}: built and saved to {args.out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

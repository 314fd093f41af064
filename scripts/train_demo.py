"""Train sgdiff's embedded demo models from a seed, save them in diffusers format, and grade them.

    python scripts/train_demo.py image --out OUT/image [--device cuda] [--minutes 7]
    python scripts/train_demo.py video --out OUT/video
    python scripts/train_demo.py image --out /tmp/x --quick     # a few steps on the CPU: checks the code

Image: the FLUX.1-architecture model (VAE, then transformer + CLIP + T5 with flow matching).
Video: the Wan2.1-architecture model (video VAE, then transformer + UMT5). After saving, the folder is
loaded through sgdiff (the same code path as any checkpoint) and graded on the held-out prompts.
The shipped weights (sgdiff/demo/models/) came from the defaults here on one H100 (see
docs/benchmarks.md); GPU kernels are not bit-deterministic, so a rerun gives close, not identical, weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgdiff.config import RuntimeConfig  # noqa: E402
from sgdiff.demo.quality import grade_model  # noqa: E402
from sgdiff.demo.train.image import ImageTraining, train_image_model  # noqa: E402
from sgdiff.demo.train.video import VideoTraining, train_video_model  # noqa: E402
from sgdiff.engine.runner import ModelRunner  # noqa: E402

QUICK = {"vae_steps": 3, "transformer_steps": 3, "pool": 64, "batch": 4, "vae_batch": 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=["image", "video"])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the diffusers-format model to")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=None, help="default: the shipped models' seed")
    parser.add_argument("--transformer-steps", type=int, default=None)
    parser.add_argument("--minutes", type=float, default=60.0, help="stop the transformer phase after this long")
    parser.add_argument("--grade-steps", type=int, nargs="*", default=[], help="also grade at these step counts")
    parser.add_argument("--vae", type=Path, default=None, help="reuse this trained VAE folder instead of training one")
    parser.add_argument("--quick", action="store_true", help="a few tiny steps: checks the code, trains nothing")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    deadline = time.monotonic() + args.minutes * 60
    run = ImageTraining() if args.model == "image" else VideoTraining()
    changes = {**(QUICK if args.quick else {})}
    if args.seed is not None:
        changes["seed"] = args.seed
    if args.transformer_steps is not None:
        changes["transformer_steps"] = args.transformer_steps
    run = replace(run, **changes)
    print(f"training the demo {args.model} model on {device}: {asdict(run)}", flush=True)
    train = train_image_model if args.model == "image" else train_video_model
    record = {"model": args.model, "device": describe(device), "settings": asdict(run)}
    record.update(train(args.out, run, device, deadline, args.vae))

    engine = ModelRunner(str(args.out), runtime=RuntimeConfig(device=args.device, dtype="fp32"))
    grades = {}
    for steps in [None, *args.grade_steps]:  # None: the preset's steps
        result = grade_model(engine, clip=args.model == "video", num_inference_steps=steps)
        label = str(steps or f"preset ({engine.preset.sampling['num_inference_steps']})")
        grades[label] = result.rates
        print(f"graded at {label} steps: {result.summary()}", flush=True)
        for check, captions in result.misses.items():
            print(f"  {check} missed: {captions[:6]}", flush=True)
    record["grades"] = grades
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record), flush=True)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"cpu, torch {torch.__version__}"


if __name__ == "__main__":
    main()

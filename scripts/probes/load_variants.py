"""Which load configuration gives the shortest shell -> file: `sgdiff generate` (FLUX.1-dev, one prompt,
the bench's checkpoint) as whole processes, each variant patched in by variant_site/sitecustomize.py,
rounds interleaved. Prints the median wall and phases per variant, and where each part's load ended.

    python scripts/probes/load_variants.py --checkpoint /tmp/flux-dev-e2e \
        --variants default,text_in_request,lanes_8x32,switch_1ms,warm_up+switch_1ms --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from sgdiff.bench.end_to_end import BENCH_MODELS, PROMPTS, SEQUENCE_LENGTH, run_sgdiff


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--model", default="flux.1-dev")
    parser.add_argument("--variants", default="default,text_in_request,lanes_8x32,switch_1ms,warm_up+switch_1ms")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    model = BENCH_MODELS[args.model]
    size = dict(height=model.height, width=model.width, steps=model.steps)
    if args.tiny:  # the CPU check of this script, on the bench's tiny checkpoint
        from sgdiff.bench.end_to_end import TINY

        size = dict(TINY)
    size["max_sequence_length"] = SEQUENCE_LENGTH[args.model]
    site = str(Path(__file__).parent / "variant_site")
    base_path = os.environ.get("PYTHONPATH", "")
    variants = args.variants.split(",")
    runs: dict[str, list] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for index in range(args.warmup):  # untimed: Triton's kernel cache, the tokenizer cache, the page cache
            os.environ["SGDIFF_PROBE_VARIANT"], os.environ["PYTHONPATH"] = "", base_path
            (Path(tmp) / f"warmup-{index}").mkdir()
            run_sgdiff(args.checkpoint, PROMPTS[:1], size, args.device, [], Path(tmp) / f"warmup-{index}")
        for round_ in range(args.rounds):
            for variant in variants:
                os.environ["SGDIFF_PROBE_VARIANT"] = "" if variant == "default" else variant
                os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [site, base_path]))
                out = Path(tmp) / f"{variant}-{round_}"
                out.mkdir()
                run = run_sgdiff(args.checkpoint, PROMPTS[:1], size, args.device, [], out)
                runs[variant].append(vars(run))
                print(f"{variant:24s} round {round_}: {run.wall:.2f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    print(f"\n{'variant':24s} {'wall':>6s} {'load':>5s} {'text':>5s} {'1st step':>8s} {'denoise':>7s}  parts' load end")
    for variant, rs in runs.items():
        med = lambda f, rs=rs: statistics.median(f(r) for r in rs)  # noqa: E731
        ends = {part: round(statistics.median(r["load_parts"][part][1] for r in rs), 2) for part in rs[0]["load_parts"]}
        print(f"{variant:24s} {med(lambda r: r['wall']):6.2f} {med(lambda r: r['phases']['load']):5.2f} "
              f"{med(lambda r: r['phases']['text']):5.2f} {med(lambda r: r['step_seconds'][0]):8.3f} "
              f"{med(lambda r: r['phases']['denoise']):7.2f}  {ends}")  # fmt: skip


if __name__ == "__main__":
    main()

"""FLUX.1-dev transformer: sgdiff vs diffusers, same random weights, same GPU, same run.

Builds diffusers' FluxTransformer2DModel at full size (12B, bf16, random weights: speed does not
depend on weight values), gives sgdiff's FluxTransformer the very same tensors (no copy), checks
bf16 parity, then times one forward at the requested resolution with CUDA events, the two models
taking turns call by call (median of each).

    python scripts/bench_flux_transformer.py --height 1024 --width 1024 [--json out.json]

Needs a CUDA GPU with ~30 GB free and diffusers installed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import DEVICE, print_top_kernels, speed_matrix, time_interleaved  # noqa: E402

from sgdiff.bench.parts import BENCH_MODELS, build_transformers  # noqa: E402
from sgdiff.models.flux import FluxTransformerConfig  # noqa: E402
from sgdiff.models.flux.packing import image_position_ids, text_position_ids  # noqa: E402
from sgdiff.testing.compare import relative_error  # noqa: E402

FLOP_PER_FORWARD_1024 = 74.4e12  # torch.utils.flop_counter on diffusers' FLUX.1-dev at 1024x1024 (GPU_NOTES)


def build_models(tiny: bool):
    """(diffusers' FluxTransformer2DModel, sgdiff's FluxTransformer on the same tensors), bf16; --tiny:
    a 2+2-layer model, to check the script itself on a CPU before spending GPU time."""
    return build_transformers(BENCH_MODELS["flux.1-dev"], tiny, torch.device(DEVICE))


def make_inputs(config: FluxTransformerConfig, height: int, width: int, text_len: int, seed: int):
    g = torch.Generator(DEVICE).manual_seed(seed)
    rows, cols = height // 16, width // 16
    bf16 = dict(device=DEVICE, dtype=torch.bfloat16)
    return dict(
        hidden_states=torch.randn(1, rows * cols, config.in_channels, generator=g, **bf16),
        encoder_hidden_states=torch.randn(1, text_len, config.joint_attention_dim, generator=g, **bf16),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g, **bf16),
        timestep=torch.tensor([0.7], **bf16),
        img_ids=image_position_ids(rows, cols).to(**bf16),
        txt_ids=text_position_ids(text_len).to(**bf16),
        guidance=torch.tensor([3.5], device=DEVICE, dtype=torch.float32),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--profile", action="store_true", help="also print sgdiff's top kernels (torch.profiler)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model: checks the script, times nothing real")
    parser.add_argument("--matrix", action="store_true", help="sgdiff's speed toggles one by one (bench_common)")
    args = parser.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = True
    reference, ours = build_models(args.tiny)
    config = ours.config
    rows = []
    with torch.inference_mode():
        checks = []
        for seed in (1, 2):  # fresh random inputs per check
            inputs = make_inputs(config, args.height, args.width, args.text_len, seed)
            ref_out = reference(**inputs, return_dict=False)[0]
            our_out = ours(**inputs)
            checks.append(relative_error(our_out, ref_out))
            assert torch.isfinite(our_out).all(), "non-finite output"
        parity = max(checks)

        inputs = make_inputs(config, args.height, args.width, args.text_len, 3)
        baseline = {"diffusers FluxTransformer2DModel": lambda: reference(**inputs, return_dict=False)}
        if args.profile:
            print_top_kernels(lambda: ours(**inputs))
        if args.matrix:
            timings, extra = speed_matrix(ours, lambda: ours(**inputs), args.warmup, args.repeat, baseline)
            compiled = ours(**inputs)  # fused and compiled now (CUDA graphs do not change numbers)
            extra["bf16_rel_err_compiled"] = relative_error(compiled, reference(**inputs, return_dict=False)[0])
            if args.profile:  # where the time goes with every toggle but the graph
                print_top_kernels(lambda: ours(**inputs), rows=25)
        else:
            variants = {**baseline, "sgdiff FluxTransformer": lambda: ours(**inputs)}
            timings, extra = time_interleaved(variants, args.warmup, args.repeat), {}
        for name, times in timings.items():
            rows.append((name, statistics.median(times), min(times), max(times)))

    scale = (args.height * args.width) / (1024 * 1024)
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    result = {
        "card": card,
        "torch": torch.__version__,
        "height": args.height,
        "width": args.width,
        "bf16_rel_err_vs_diffusers": parity,
        **extra,
        "rows": [dict(zip(("variant", "median_ms", "min_ms", "max_ms"), r, strict=True)) for r in rows],
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    model = "FLUX.1-dev transformer" + (" (TINY)" if args.tiny else "")
    print(f"\n{model}, {args.height}x{args.width}, text {args.text_len}, bf16, {card}, torch {torch.__version__}")
    print(
        f"bf16 parity, sgdiff vs diffusers: rel err {parity:.2e} (limit 1e-2): {'PASS' if parity <= 1e-2 else 'FAIL'}"
    )
    baseline = rows[0][1]
    print(f"{'variant':42s} {'median ms':>10s} {'min':>8s} {'max':>8s} {'speedup':>8s} {'TFLOP/s*':>9s}")
    for name, median, lo, hi in rows:
        tflops = FLOP_PER_FORWARD_1024 / 1e12 / (median / 1e3) if scale == 1 and not args.tiny else float("nan")
        print(f"{name:42s} {median:10.1f} {lo:8.1f} {hi:8.1f} {baseline / median:7.2f}x {tflops:9.0f}")
    print("* 74.4 TFLOP per forward at 1024x1024")
    if "compile_s" in extra:
        print(
            f"regional torch.compile: first call {extra['compile_s']:.1f} s, "
            f"bf16 rel err vs diffusers {extra['bf16_rel_err_compiled']:.2e}"
        )


if __name__ == "__main__":
    main()

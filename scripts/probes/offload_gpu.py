"""--cpu-offload on one CUDA GPU: exact outputs in bf16, and what streaming the blocks costs

    python scripts/probes/offload_gpu.py [--blocks 40] [--width 5120] [--tokens 4096 16384] [--skip-exact]

1. Exactness: tiny FLUX.1-dev and Wan2.2-T2V-A14B checkpoints (random weights, built here) in bf16 on the
   GPU: each mode's final latents against the in-memory run's (torch.equal), eagerly and with
   --enable-torch-compile (inductor around the layers hooks); the homes pinned; layers + CUDA graph refused.
2. Streaming: a stack of `--blocks` MLP blocks (`--width`, 4x hidden; 5120: a Wan2.1-14B-sized width) kept
   in pinned CPU memory and streamed by the layers machinery (offload/streaming.py) with prefetch 0, 1 and
   2, against the same stack held on the GPU: ms per forward at each `--tokens` row count, peak memory,
   and the pinned host-to-device copy rate alone (GB/s), to see where copies hide behind compute.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from sgdiff.config import OffloadConfig, RuntimeConfig, SpeedConfig
from sgdiff.engine.runner import ModelRunner
from sgdiff.errors import UserError
from sgdiff.offload.streaming import BlockStreamer

MODES = {
    "components": OffloadConfig("components"),
    "layers": OffloadConfig("layers"),
    "layers-prefetch-2": OffloadConfig("layers", offload_prefetch=2),
    "text-encoders": OffloadConfig(text_encoder_offload=True),
}


def latents(model: Path, offload: OffloadConfig, speed: SpeedConfig, request: dict) -> tuple[torch.Tensor, ModelRunner]:
    runner = ModelRunner(str(model), runtime=RuntimeConfig(device="cuda", dtype="bf16", speed=speed, offload=offload))
    runner.load()
    result = runner.generate(runner.sampling_params("a red cube", **request))
    return result.latents, runner


def exactness(folder: Path) -> None:
    from sgdiff.testing.tiny_flux import build_tiny_flux
    from sgdiff.testing.tiny_wan import build_tiny_wan

    models = {
        "flux": (build_tiny_flux(folder / "flux", variant="dev"), dict(height=64, width=64, num_inference_steps=3)),
        "wan-a14b": (
            build_tiny_wan(folder / "wan", variant="t2v-a14b"),
            dict(height=32, width=32, num_frames=5, num_inference_steps=3, negative_prompt="blurry"),
        ),
    }
    for name, (model, request) in models.items():
        for compiled in (False, True):
            speed = SpeedConfig(torch_compile=compiled)
            reference, _ = latents(model, OffloadConfig(), speed, request)
            for mode, offload in MODES.items():
                ours, runner = latents(model, offload, speed, request)
                assert runner.offloaded is not None
                units = runner.offloaded.on_demand.components
                pinned = all(unit.home.is_pinned() for unit in units)
                same = torch.equal(ours, reference)
                print(f"{name:9} compile={compiled!s:5} {mode:18} equal={same} pinned={pinned} "
                      f"{runner.offloaded.report()}")  # fmt: skip
    try:
        ModelRunner(str(models["flux"][0]), runtime=RuntimeConfig(
            device="cuda", speed=SpeedConfig(cuda_graph=True), offload=OffloadConfig("layers")))  # fmt: skip
        print("layers + cuda_graph: NOT refused")
    except UserError as exc:
        print(f"layers + cuda_graph refused: {exc}")


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(x), approximate="tanh"))


def ms_per_call(fn, repeat: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat * 1e3


def make_stack(blocks: int, width: int, device: torch.device) -> nn.ModuleList:
    """The same random stack each time (seeded), on `device`."""
    torch.manual_seed(0)
    with torch.device(device):
        return nn.ModuleList(Block(width).to(torch.bfloat16) for _ in range(blocks)).requires_grad_(False)


def run_stack(stack: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in stack:
        x = block(x)
    return x


def copy_rate(nbytes: int, device: torch.device) -> float:
    """GB/s of one pinned host-to-device copy of `nbytes`."""
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / ms_per_call(lambda: target.copy_(pinned, non_blocking=True), 20) / 1e6


def timed(stack: nn.ModuleList, x: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """(ms per forward, peak GiB, output)."""
    torch.cuda.reset_peak_memory_stats()
    ms = ms_per_call(lambda: run_stack(stack, x))
    return ms, torch.cuda.max_memory_allocated() / 2**30, run_stack(stack, x)


def streaming(blocks: int, width: int, token_counts: list[int]) -> None:
    device = torch.device("cuda")
    in_memory = make_stack(blocks, width, device)
    block_bytes = sum(p.numel() * p.element_size() for p in in_memory[0].parameters())
    print(f"{blocks} blocks of {block_bytes / 2**20:.0f} MiB; pinned copy {copy_rate(block_bytes, device):.1f} GB/s")
    inputs = {n: torch.randn(n, width, device=device, dtype=torch.bfloat16) for n in token_counts}
    with torch.inference_mode():
        reference = {n: timed(in_memory, x) for n, x in inputs.items()}
    for n, (ms, peak, _) in reference.items():
        print(f"in memory  tokens={n:6}: {ms:8.1f} ms/forward, peak {peak:.1f} GiB")
    in_memory = nn.ModuleList()
    for prefetch in (0, 1, 2):
        # built outside inference mode, as the runner loads its models: the streamer repoints
        # ordinary parameters (inference tensors keep no version counter to swap data under)
        stack = make_stack(blocks, width, device).cpu()  # the streamer's homes are made from CPU tensors
        torch.cuda.empty_cache()
        streamer = BlockStreamer([list(stack)], device, prefetch, pinned=True)
        for n, x in inputs.items():
            with torch.inference_mode():
                ms, peak, out = timed(stack, x)
            same = torch.equal(out, reference[n][2])
            print(f"prefetch {prefetch} tokens={n:6}: {ms:8.1f} ms/forward ({ms / reference[n][0]:.2f}x), "
                  f"peak {peak:.1f} GiB, equal={same}, copies {streamer.copies}, "
                  f"waits {streamer.waits}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--width", type=int, default=5120)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--skip-exact", action="store_true")
    args = parser.parse_args()
    if not args.skip_exact:
        with tempfile.TemporaryDirectory() as folder:
            exactness(Path(folder))
    streaming(args.blocks, args.width, args.tokens)


if __name__ == "__main__":
    main()

"""Multi-GPU speed-up per denoising step on N GPUs (torchrun's N): FLUX.1-dev 1024x1024 with
Ulysses-N, Ring-N and (N >= 4) USP (N/2 x 2); Wan2.1 (1.3B or 14B, 480p and/or 720p, 81 frames, CFG 5)
with CFG parallel x Ulysses-N/2 and Ulysses-N — against one GPU on the same machine, same run.

Full-size sgdiff transformers with random bf16 weights (the same on every rank, from one seed), the
parallelism of sgdiff/parallel applied exactly as `sgdiff generate --num-gpus N` applies it. One
"step" is what the denoising loop runs per timestep: FLUX.1-dev one forward (guidance is embedded),
Wan with CFG two forwards and the guided combination. The 1-GPU baseline runs on every rank at once
(each on its own GPU); rank 0 reports speed-up and scaling efficiency (speed-up / N) against its own
GPU's 1-GPU time, and the speed-up against the slowest GPU's ("slowest": GPUs under their power cap
clock a few per cent apart, and a parallel mode runs at the slowest one's pace). bf16
agreement: relative error of the parallel step's output against the 1-GPU step's.

    torchrun --nproc-per-node N scripts/probes/bench_parallel.py [--cuda-graph] [--wan-model 14b]
        [--wan-size 480p 720p] [--json out.json] [--tiny] [--fake-all-to-all]
        [--modes ulysses ring usp cfg] [--exchange nccl symmetric] [--attention-backend auto]
        [--profile] [--trace DIR]

--exchange with several values runs each sequence-parallel mode once per exchange (NCCL's all-to-all
and send/receive, or writes into the peers' symmetric memory) and checks that both give the same
output.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

SCRIPTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(SCRIPTS), str(SCRIPTS.parent)]  # bench_common (scripts/) and sgdiff from this checkout

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from sgdiff.bench.parts import BENCH_MODELS, TINY_FLUX, TINY_WAN, transformer_inputs  # noqa: E402
from sgdiff.config import ParallelConfig, SpeedConfig  # noqa: E402
from sgdiff.models.attention import use_attention_impl  # noqa: E402
from sgdiff.models.flux import FluxTransformer  # noqa: E402
from sgdiff.models.flux.config import FLUX_DEV  # noqa: E402
from sgdiff.models.loading import build_on_meta  # noqa: E402
from sgdiff.models.wan import WanTransformer  # noqa: E402
from sgdiff.models.wan.config import WAN21_T2V_1_3B, WAN21_T2V_14B  # noqa: E402
from sgdiff.parallel.cfg import CfgParallelBranches  # noqa: E402
from sgdiff.parallel.groups import build_groups  # noqa: E402
from sgdiff.parallel.plans import apply_sequence_parallel  # noqa: E402
from sgdiff.pipeline.registry import family_named  # noqa: E402
from sgdiff.pipeline.stages.denoising import guided_velocity  # noqa: E402
from sgdiff.speed.apply import speed_up_transformer  # noqa: E402
from sgdiff.speed.attention_backends import CHOICES, attention_backend  # noqa: E402
from sgdiff.speed.cuda_graph import CudaGraphForward  # noqa: E402
from sgdiff.testing.compare import relative_error  # noqa: E402

# --tiny: sgdiff bench's tiny models with 8 heads (Ulysses-8 splits them), FLUX with guidance as dev's
TINY_FLUX_8 = replace(TINY_FLUX, num_attention_heads=8, guidance_embeds=True)
TINY_WAN_8 = replace(TINY_WAN, num_attention_heads=8)
WAN_MODELS = {"1.3b": ("Wan2.1-T2V-1.3B", WAN21_T2V_1_3B), "14b": ("Wan2.1-T2V-14B", WAN21_T2V_14B)}
WAN_SIZES = {"480p": dict(frames=81, height=480, width=832), "720p": dict(frames=81, height=720, width=1280)}
WAN_CFG = 5.0


def random_model(cls, config, device: torch.device, seed: int = 0) -> torch.nn.Module:
    """A model with seeded random bf16 weights, identical on every rank."""
    # bf16 while still on meta: fp32 first would leave twice the weights' size in the allocator's
    # cache, where NCCL (which allocates outside it) cannot get it back when a group is made
    model = build_on_meta(cls, config).to(torch.bfloat16).to_empty(device=device)
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.02, generator=g)
            else:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
    return model.eval().requires_grad_(False)


def timed(fn, device: torch.device, warmup: int, repeat: int) -> tuple[float, float, torch.Tensor]:
    """(median ms per call, median ms until the call returned to Python, the last output); every rank
    runs it, ranks start together. When both ms are close the host, not the GPU, sets the pace."""
    for _ in range(warmup):
        out = fn()
    times, host = [], []
    for _ in range(repeat):
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = fn()
        host.append((time.perf_counter() - start) * 1e3)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), statistics.median(host), out


def as_cuda_graph(fn, device: torch.device):
    """fn() replayed as a CUDA graph through sgdiff's --enable-cuda-graph wrapper (collectives included);
    on the CPU (--tiny) fn itself."""
    return CudaGraphForward(fn) if device.type == "cuda" else fn


def comm_rows(device: torch.device, sizes_mb: tuple[float, ...]) -> list[dict]:
    """All-to-all over every rank at the sizes sequence parallelism sends: us per call and GB/s to
    peers, launched from Python and replayed as a CUDA graph (no host in the way)."""
    rows = []
    world = dist.get_world_size()
    for mb in sizes_mb:
        send = torch.randn(int(mb * 2**20) // 2 // world * world, device=device, dtype=torch.bfloat16)
        received = torch.empty_like(send)
        sent = send.numel() * 2 * (world - 1) / world

        def twenty(s=send, r=received):
            for _ in range(20):
                dist.all_to_all_single(r, s)
            return r

        for how, fn in (("eager", twenty), ("graph", as_cuda_graph(twenty, device))):
            per_call = timed(fn, device, 2, 5)[0] / 20
            rows.append(dict(size_mb=mb, launch=how, us=per_call * 1e3, gb_per_s=sent / per_call / 1e6))
    return rows


def profile_on_rank0(fn, title: str, graphed: bool, kinds: dict[str, dict]) -> None:
    """Rank 0 prints the top kernels (eager calls) and records GPU time by kernel kind into `kinds`
    (every rank profiles: the ranks of a parallel mode wait for each other)."""
    from bench_common import kernel_time_by_kind, print_top_kernels

    if not graphed:
        if dist.get_rank() == 0:
            print(f"--- {title}")
        print_top_kernels(fn, rows=22, show=dist.get_rank() == 0)
    kinds[title + (" graph" if graphed else "")] = kernel_time_by_kind(fn)


def print_kinds(kinds: dict[str, dict]) -> None:
    """ms per step of GPU kernel time by kind, one column per profiled mode."""
    names = sorted({k for row in kinds.values() for k in row} - {"busy", "span", "idle"}) + ["busy", "idle", "span"]
    print(f"\nGPU ms per step by kernel kind (rank 0)\n{'':28}" + "".join(f"{t[-26:]:>27}" for t in kinds))
    for name in names:
        print(f"{name:28}" + "".join(f"{row.get(name, 0.0):27.2f}" for row in kinds.values()))


def flux_modes(world: int) -> list[tuple[str, ParallelConfig]]:
    modes = [(f"Ulysses-{world}", ParallelConfig(world)), (f"Ring-{world}", ParallelConfig(world, ring_degree=world))]
    if world >= 4:
        modes.append((f"USP {world // 2}x2", ParallelConfig(world, ulysses_degree=world // 2, ring_degree=2)))
    return modes


def wan_modes(world: int) -> list[tuple[str, ParallelConfig]]:
    cfg = "CFG parallel" if world == 2 else f"CFG 2 x Ulysses-{world // 2}"
    return [(cfg, ParallelConfig(world, enable_cfg_parallel=True)), (f"Ulysses-{world}", ParallelConfig(world))]


def mode_kind(label: str) -> str:
    """A mode's --modes name: "Ulysses-2" -> ulysses, "USP 2x2" -> usp, "CFG 2 x Ulysses-2" -> cfg."""
    return label.split("-")[0].split()[0].lower()


def with_exchanges(
    modes: list[tuple[str, ParallelConfig]], exchanges: list[str]
) -> list[tuple[str, ParallelConfig, str]]:
    """Each sequence-parallel mode once per exchange asked for (labelled when more than one)."""
    out = []
    for label, parallel in modes:
        resolved = parallel.resolved()
        ways = exchanges if resolved.ulysses_degree * resolved.ring_degree > 1 else exchanges[:1]
        out += [(label + (f" {way}" if len(ways) > 1 else ""), parallel, way) for way in ways]
    return out


def prepared(model: torch.nn.Module, args) -> torch.nn.Module:
    """The model with the speed toggles asked for, applied as `sgdiff generate` applies them (the CUDA
    graph is this script's own --cuda-graph, around a whole step)."""
    speed = SpeedConfig(fused_projections=args.fuse, fused_gelu=args.gelu, fused_norms=args.norms,
                        torch_compile=args.compile)  # fmt: skip
    speed_up_transformer(model, speed, family_of(model))
    return model


def family_of(model: torch.nn.Module):
    return family_named("flux" if isinstance(model, FluxTransformer) else "wan")


def compare_modes(name: str, label: str, model, step, modes, device, args, kinds: dict) -> list[dict]:
    """1 GPU against each parallel mode (eager, and replayed as CUDA graphs with --cuda-graph).
    step(groups or None) runs one denoising step as that mode runs it. --profile records each
    mode's GPU time by kernel kind into `kinds`."""
    world = dist.get_world_size()
    rows = []
    for graphed in (False, True) if args.cuda_graph else (False,):
        suffix = " graph" if graphed else ""

        def run(fn, title: str, graphed=graphed, suffix=suffix):
            fn = as_cuda_graph(fn, device) if graphed else fn
            result = timed(fn, device, args.warmup, args.repeat)
            if args.profile and device.type == "cuda":
                profile_on_rank0(fn, f"{name} {title}", graphed, kinds)
            if args.trace:
                from bench_common import export_trace

                file = re.sub(r"[^A-Za-z0-9.-]+", "_", f"{name} {label} {title}{suffix}") + ".json"
                export_trace(fn, args.trace / file, write=dist.get_rank() == 0)
            return result

        with use_attention_impl(args.attention):
            base_ms, base_host, base = run(lambda: step(None), "1 GPU")
        # every GPU ran the 1-GPU step at once; under the power cap their clocks differ by a few per
        # cent, and a parallel mode goes at the pace of the slowest
        each_gpu = [0.0] * world
        dist.all_gather_object(each_gpu, base_ms)
        slowest_ms = max(each_gpu)
        rows.append(dict(model=name, size=label, mode="1 GPU" + suffix, ms_per_step=base_ms, host_ms=base_host,
                         ms_each_gpu=each_gpu))  # fmt: skip
        if not graphed and args.noise_floor:  # two correct 1-GPU kernels disagree this much in bf16
            with use_attention_impl(flash_attention):
                _, _, other = timed(lambda: step(None), device, args.warmup, args.repeat)
            rows.append(dict(model=name, size=label, mode="1 GPU flash", ms_per_step=float("nan"),
                             rel_err_vs_1gpu=relative_error(other, base)))  # fmt: skip
        first_exchange: dict[str, torch.Tensor] = {}  # the first exchange's output of each mode
        chosen = [m for m in modes if args.modes is None or mode_kind(m[0]) in args.modes]
        for mode, parallel, exchange in with_exchanges(chosen, args.exchange):
            if device.type == "cuda":
                torch.cuda.empty_cache()  # NCCL allocates a new group's buffers outside torch's cache
            groups = build_groups(parallel)
            family = family_of(model)
            sharded = groups.sp_degree > 1
            attn = apply_sequence_parallel([model], family, groups, args.attention, exchange) if sharded else None
            with use_attention_impl(attn or args.attention):
                ms, host, out = run(lambda groups=groups: step(groups), mode)
            if attn:
                attn.remove()
            if dist.get_rank() == 0:
                print(f"{name} {label} {mode}{suffix}: {ms:.1f} ms/step", flush=True)
            rows.append(dict(model=name, size=label, mode=mode + suffix, ms_per_step=ms, host_ms=host,
                             speedup=base_ms / ms, scaling=base_ms / ms / world, speedup_vs_slowest=slowest_ms / ms,
                             rel_err_vs_1gpu=relative_error(out, base)))  # fmt: skip
            same_mode = mode.removesuffix(f" {exchange}")
            if same_mode in first_exchange:  # the exchanges move the same bytes: the outputs must be equal
                rows[-1]["max_diff_vs_other_exchange"] = (out - first_exchange[same_mode]).abs().max().item()
            first_exchange.setdefault(same_mode, out)
    return rows


def bench_flux(config, size: int, device, args, kinds: dict) -> list[dict]:
    model = prepared(random_model(FluxTransformer, config, device), args)
    inputs = transformer_inputs(BENCH_MODELS["flux.1-dev"], model, dict(height=size, width=size), device, seed=1)
    modes = flux_modes(dist.get_world_size())
    with torch.inference_mode():
        step = lambda groups: model(**inputs)  # noqa: E731
        return compare_modes("FLUX.1-dev", f"{size}x{size}", model, step, modes, device, args, kinds)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA's flash kernel (the 1-GPU default is cuDNN's); on the CPU SDPA's default."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, S, H, D] -> [B, H, S, D]
    if q.is_cuda:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def bench_wan(name: str, config, size: dict, device, args, kinds: dict) -> list[dict]:
    model = prepared(random_model(WanTransformer, config, device), args)
    wan = BENCH_MODELS["wan2.1-t2v-1.3b"]  # (the inputs' shapes come from `model`)
    cond_inputs = transformer_inputs(wan, model, size, device, seed=2)
    negative = transformer_inputs(wan, model, size, device, seed=3)["encoder_hidden_states"]
    uncond_inputs = {**cond_inputs, "encoder_hidden_states": negative}
    latent = cond_inputs["hidden_states"].shape[2:]

    def step(groups) -> torch.Tensor:
        def cond():
            return model(**cond_inputs)

        def uncond():
            return model(**uncond_inputs)

        cfg_split = groups is not None and groups.config.enable_cfg_parallel
        c, u = CfgParallelBranches(groups)(cond, uncond) if cfg_split else (cond(), uncond())
        return guided_velocity(c, u, WAN_CFG)

    label = f"{latent[0]}x{latent[1]}x{latent[2]} latents"
    with torch.inference_mode():
        return compare_modes(name, label, model, step, wan_modes(dist.get_world_size()), device, args, kinds)


class NothingInFlight:
    def wait(self) -> None:
        return None


def local_copy_instead(output: torch.Tensor, input: torch.Tensor, *args, async_op: bool = False, **kwargs):
    """--fake-all-to-all's stand-in for dist.all_to_all_single: the bytes are copied, none travel."""
    output.copy_(input)
    return NothingInFlight() if async_op else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU (gloo): checks the script")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--models", nargs="+", choices=["flux", "wan"], default=["flux", "wan"])
    parser.add_argument("--profile", action="store_true", help="top kernels, GPU time by kernel kind (CUDA)")
    parser.add_argument("--trace", type=Path, metavar="DIR",
                        help="rank 0's Chrome trace of one step per mode into DIR; where its GPU idles")  # fmt: skip
    parser.add_argument("--cuda-graph", action="store_true", help="FLUX also as CUDA graph replays")
    parser.add_argument("--fuse", action="store_true", help="fused projections (--enable-fused-projections)")
    parser.add_argument("--gelu", action="store_true", help="GELU in the GEMM epilogue (--enable-fused-gelu)")
    parser.add_argument("--norms", action="store_true", help="q/k norm + RoPE kernel (--enable-fused-norms; CUDA)")
    parser.add_argument("--compile", action="store_true", help="regional torch.compile (--enable-torch-compile)")
    parser.add_argument("--wan-model", choices=list(WAN_MODELS), default="1.3b")
    parser.add_argument("--wan-size", nargs="+", choices=list(WAN_SIZES), default=["480p"])
    parser.add_argument("--attention-backend", choices=CHOICES, default="auto",
                        help="the attention kernel, as generate's flag (cudnn: without auto's wave split)")  # fmt: skip
    parser.add_argument("--noise-floor", action="store_true", help="also 1 GPU with flash vs cuDNN (bf16 noise)")
    parser.add_argument("--comm", action="store_true", help="also time all-to-alls of the sizes FLUX Ulysses-2 sends")
    parser.add_argument(
        "--modes", nargs="+", choices=["ulysses", "ring", "usp", "cfg"], help="only these parallel modes (default: all)"
    )
    parser.add_argument(
        "--exchange",
        nargs="+",
        choices=["auto", "nccl", "symmetric"],
        default=["auto"],
        help="how Ulysses exchanges heads and tokens and a ring its K/V blocks; several: each mode once per exchange",
    )
    parser.add_argument("--fake-all-to-all", action="store_true",
                        help="every all-to-all a local copy of its size: Ulysses with its communication hidden "
                             "perfectly (wrong outputs, the same compute)")  # fmt: skip
    args = parser.parse_args()
    if args.fake_all_to_all:
        dist.all_to_all_single = local_copy_instead
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu") if args.tiny else torch.device("cuda", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("gloo" if args.tiny else "nccl", device_id=None if args.tiny else device)
    args.attention = attention_backend(args.attention_backend, device, torch.bfloat16)
    flux_size = 64 if args.tiny else 1024
    results, kinds = [], {}
    with torch.inference_mode():  # (the CUDA graph wrapper replays only without autograd)
        comm = comm_rows(device, (1.0, 14.0, 42.0)) if args.comm else []
    if "flux" in args.models:
        results += bench_flux(TINY_FLUX_8 if args.tiny else FLUX_DEV, flux_size, device, args, kinds)
    if "wan" in args.models:
        name, config = WAN_MODELS[args.wan_model]
        for size in args.wan_size:
            shape = dict(frames=9, height=48, width=64) if args.tiny else WAN_SIZES[size]  # tiny: 3x6x8 latents
            results += bench_wan(name, TINY_WAN_8 if args.tiny else config, shape, device, args, kinds)
    if dist.get_rank() == 0:
        card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        print(f"\n{card}, torch {torch.__version__}, {dist.get_world_size()} ranks")
        for r in comm:
            print(f"all-to-all {r['size_mb']:5.1f} MB {r['launch']}: {r['us']:7.1f} us, {r['gb_per_s']:6.1f} GB/s")
        header = ("model", "size", "mode", "ms/step", "host ms", "speed-up", "slowest", "scaling", "rel err")
        print("{:16} {:22} {:20} {:>9} {:>8} {:>9} {:>8} {:>8} {:>8}".format(*header))
        for r in results:
            speedup = f"{r['speedup']:.2f}x" if "speedup" in r else ""
            slowest = f"{r['speedup_vs_slowest']:.2f}x" if "speedup_vs_slowest" in r else ""
            err = f"{r['rel_err_vs_1gpu']:.1e}" if "rel_err_vs_1gpu" in r else ""
            host = f"{r['host_ms']:.1f}" if "host_ms" in r else ""
            ms = f"{r['ms_per_step']:.1f}"
            scaling = f"{r['scaling']:.0%}" if "scaling" in r else ""
            row = f"{r['model']:16} {r['size']:22} {r['mode']:20} {ms:>9} {host:>8}"
            row += f" {speedup:>9} {slowest:>8} {scaling:>8} {err:>8}"
            if "ms_each_gpu" in r:
                row += "  each GPU: " + " ".join(f"{t:.1f}" for t in r["ms_each_gpu"])
            print(row + (f"  max diff vs other exchange {r['max_diff_vs_other_exchange']:.1e}"
                         if "max_diff_vs_other_exchange" in r else ""))  # fmt: skip
        if kinds:
            print_kinds(kinds)
        if args.json:
            payload = {"card": card, "torch": torch.__version__, "rows": results, "all_to_all": comm, "kernels": kinds}
            args.json.write_text(json.dumps(payload, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

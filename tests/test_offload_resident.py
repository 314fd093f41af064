"""--offload-resident-blocks (sgdiff/offload/resident.py): under --cpu-offload layers, the blocks kept stay on
the compute device while the denoising runs and only the others stream (fewer copies), spread over the order
the blocks run in; `auto` streams the first forward and then keeps as many as the room allows; every choice
gives the in-memory outputs exactly (fp32 tiny models on the CPU, where the same machinery runs), and the
blocks go back to streaming when the stage ends."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sgdiff.cli import main as cli
from sgdiff.config import OffloadConfig
from sgdiff.errors import UserError
from sgdiff.offload.resident import ResidentBlocks, spread
from sgdiff.speed.compile import compile_blocks
from sgdiff.testing.offload import FLUX, WAN, assert_same, generate, load, where

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flux_in_memory(tiny_flux_dev):
    return generate(load(tiny_flux_dev), **FLUX)


def blocks_present_each_entry(streamer) -> list[list[int]]:
    """A recorder: at each block's entry (after the streamer's own hook), which blocks are on the device."""
    seen: list[list[int]] = []
    for unit in streamer.units:
        unit.module.register_forward_pre_hook(
            lambda *_: seen.append([i for i, u in enumerate(streamer.units) if where(u.module) == "device"])
        )
    return seen


@pytest.mark.parametrize("kept", [1, 3, 100])
def test_kept_blocks_stay_and_the_others_stream(tiny_flux_dev, flux_in_memory, kept):
    runner = load(tiny_flux_dev, OffloadConfig("layers", offload_resident_blocks=kept))
    streamer = runner.offloaded.streamer  # type: ignore[union-attr]
    n = len(streamer.units)
    seen = blocks_present_each_entry(streamer)
    result = generate(runner, **FLUX)
    assert_same(result, flux_in_memory)
    count = min(kept, n)
    chosen = spread(list(range(n)), count)
    assert streamer.kept == count
    assert all(set(chosen) <= set(present) for present in seen)  # on the device at every block's entry
    forwards = FLUX["num_inference_steps"]
    assert streamer.copies == (n - count) * forwards + (1 if count < n else 0)  # (+1: the next forward's first)
    assert streamer.resident == {} and all(where(u.module) == "home" for i, u in enumerate(streamer.units)
                                           if i in chosen)  # fmt: skip  # released when the stage ended
    assert_same(generate(runner, **FLUX), flux_in_memory)  # the next request keeps them again
    assert streamer.kept == count


def test_kept_blocks_run_their_compiled_forwards_too(tiny_flux_dev, flux_in_memory):
    """Compiled blocks (aot_eager: torch.compile's tracing without a C++ compiler) with some kept and the
    others streaming: the in-memory outputs, twice (the second request keeps them again)."""
    runner = load(tiny_flux_dev, OffloadConfig("layers", offload_resident_blocks=2))
    for model in runner.pipeline.transformers:  # type: ignore[union-attr]
        compile_blocks(model, backend="aot_eager")
    streamer = runner.offloaded.streamer  # type: ignore[union-attr]
    for _ in range(2):
        assert_same(generate(runner, **FLUX), flux_in_memory)
        assert streamer.kept == 2 and streamer.copies > 0


def test_auto_streams_the_first_forward_then_keeps_what_fits(tiny_flux_dev, flux_in_memory, monkeypatch):
    room: list[int] = []
    monkeypatch.setattr(ResidentBlocks, "room", lambda self, device: room[0])
    runner = load(tiny_flux_dev, OffloadConfig("layers", offload_resident_blocks="auto"))
    streamer = runner.offloaded.streamer  # type: ignore[union-attr]
    n = len(streamer.units)
    room.append(sum(streamer.units[i].nbytes for i in spread(list(range(n)), 2)))  # two blocks' bytes
    seen = blocks_present_each_entry(streamer)
    assert_same(generate(runner, **FLUX), flux_in_memory)
    kept = spread(list(range(n)), streamer.kept)
    assert 2 <= streamer.kept < n and sum(streamer.units[i].nbytes for i in kept) <= room[0]
    first_forward, later = seen[:n], seen[n : 2 * n]
    assert all(len(present) <= 2 for present in first_forward)  # streamed: the running block and the next
    assert all(len(present) >= streamer.kept for present in later)


def test_auto_keeps_none_on_the_cpu_and_nothing_changes(tiny_wan):
    reference = generate(load(tiny_wan("t2v-a14b")), **WAN)
    runner = load(tiny_wan("t2v-a14b"), OffloadConfig("layers", offload_resident_blocks="auto"))
    assert_same(generate(runner, **WAN), reference)
    assert runner.offloaded.streamer.kept == 0  # type: ignore[union-attr]


def test_choice_spreads_over_the_order_and_fills_the_room():
    assert spread([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], 3) == [1, 5, 8]
    assert spread([4, 7, 9], 3) == [4, 7, 9] and spread([4, 7, 9], 1) == [7]
    cpu = torch.device("cpu")
    assert ResidentBlocks(2, None).choose(range(10), [1] * 10, cpu) == [2, 7]
    assert ResidentBlocks(20, None).choose(range(3), [1] * 3, cpu) == [0, 1, 2]

    class Room(ResidentBlocks):
        def room(self, device):
            return 25

    sizes = [10, 10, 4, 4, 4, 4]
    chosen = Room(None, None).choose(range(6), sizes, cpu)
    assert sum(sizes[i] for i in chosen) <= 25 and len(chosen) == 4  # [0, 2, 3, 5]: 22 bytes; 5 would need 26
    assert Room(None, None).choose([0, 1], [30, 30], cpu) == []


@pytest.mark.parametrize(
    ("value", "message"),
    [("2", "--offload-resident-blocks is how many of the blocks --cpu-offload layers streams stay on the GPU"),
     ("some", "--offload-resident-blocks must be auto or an integer >= 0, got 'some'")],
)  # fmt: skip
def test_bad_values_fail_in_one_line(tiny_flux_dev, tmp_path, value, message):
    mode = ["--cpu-offload", "layers"] if value == "some" else []
    args = ["generate", "--model-path", str(tiny_flux_dev), "--prompt", "p", "--device", "cpu", *mode,
            "--offload-resident-blocks", value, "--output-path", str(tmp_path / "out")]  # fmt: skip
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and message in result.output, result.output
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match="auto or an integer"):
        OffloadConfig("layers", offload_resident_blocks=-1)


def test_the_flag_reaches_the_runtime_config(monkeypatch):
    received: list = []
    monkeypatch.setattr(cli, "run", lambda request, quiet: received.append(request))
    for value in (None, "auto", "12", "0"):
        given = [] if value is None else ["--offload-resident-blocks", value]
        args = ["generate", "--model-path", "m", "--prompt", "p", "--cpu-offload", "layers", *given]
        assert CliRunner().invoke(cli.app, args).exit_code == 0
    # auto unless told: measured faster (FLUX.1-dev under 12 GiB on an H100, docs/benchmarks.md run GK)
    assert [r.runtime.offload.offload_resident_blocks for r in received] == ["auto", "auto", 12, 0]
    assert OffloadConfig("layers").offload_resident_blocks == "auto"


def test_auto_room_is_what_the_process_may_hold_beyond_one_forward(monkeypatch):
    """On CUDA: (the cap, or the free memory plus what this process holds) less the allocator's reserve after a
    forward, less the margin; the cache emptied when the stage starts, so that the reserve measures it."""
    gib = 2**30
    emptied: list[bool] = []
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * gib)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    gpu = torch.device("cuda", 0)
    margin = lambda allowed: 2**29 + 0.05 * allowed  # noqa: E731
    assert ResidentBlocks(None, None).room(gpu) == int(70 * gib - 10 * gib - margin(70 * gib))
    assert ResidentBlocks(None, 12 * gib).room(gpu) == int(12 * gib - 10 * gib - margin(12 * gib))
    assert ResidentBlocks(None, 96 * gib).room(gpu) == int(70 * gib - 10 * gib - margin(70 * gib))
    assert ResidentBlocks(None, None).room(torch.device("cpu")) == 0
    ResidentBlocks(None, None).stage_started(gpu)
    ResidentBlocks(3, None).stage_started(gpu)  # (a count measures nothing)
    assert emptied == [True]


def test_offload_benchmark_streams_the_blocks_it_does_not_keep_and_changes_no_output():
    """scripts/bench_offload.py on the tiny Wan (two blocks, CFG: two forwards a step), one block kept: the
    other is copied in at each forward, and the offloaded step's output is the in-memory one's bit for bit."""
    spec = importlib.util.spec_from_file_location("bench_offload", ROOT / "scripts" / "bench_offload.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = argparse.Namespace(model="wan2.1-t2v-14b", height=None, width=None, gpu_memory_limit=None, prefetch=1,
                              resident_blocks="1", warmup=0, repeat=1, tiny=True, device="cpu", json=None)  # fmt: skip
    result = script.run(args)
    offloaded = result["offloaded"]
    assert (offloaded["blocks"], offloaded["blocks_kept"], offloaded["blocks_copied_per_step"]) == (2, 1, 2)
    assert result["identical"] is True
    assert "output identical to the in-memory one: yes" in script.render(result)

"""--cpu-offload and --text-encoder-offload (sgdiff/offload/): every mode gives the in-memory run's outputs
exactly (fp32 tiny models on the CPU, where the same machinery runs: CPU homes, slots, copies, hooks), the
offloaded parts are off the compute device while other stages run, the blocks stream through a ring, the
memory checks count what stays on the device, and flags that cannot go together are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from sgdiff.cli import main as cli
from sgdiff.cli.errors import flag
from sgdiff.cli.options import CpuOffloadChoice
from sgdiff.config import OFFLOAD_MODES, OffloadConfig, ParallelConfig, RuntimeConfig, SpeedConfig
from sgdiff.engine import memory, service
from sgdiff.engine.runner import ModelRunner
from sgdiff.engine.service import Engine
from sgdiff.errors import UserError
from sgdiff.offload.apply import check_offload
from sgdiff.offload.memory import split_blocks, weight_placement
from sgdiff.speed.compile import compile_blocks
from sgdiff.testing.distributed import run_on_ranks
from sgdiff.testing.offload import FLUX, WAN, assert_same, generate, load, offloaded_parallel_latents, where

MODES = {
    "components": OffloadConfig("components"),
    "layers": OffloadConfig("layers"),
    "layers-prefetch-2": OffloadConfig("layers", offload_prefetch=2),
    "layers-prefetch-0": OffloadConfig("layers", offload_prefetch=0),
    "text-encoders": OffloadConfig(text_encoder_offload=True),
}


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    y, x = np.mgrid[0:40, 0:48]
    path = tmp_path_factory.mktemp("img") / "first.png"
    Image.fromarray(np.stack([x * 5, y * 6, (x + y) * 3], axis=-1).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def in_memory(tiny_flux_dev, tiny_wan, picture):
    """The outputs with everything on the compute device, by model."""
    return {
        "flux": generate(load(tiny_flux_dev), **FLUX),
        "wan-a14b": generate(load(tiny_wan("t2v-a14b")), **WAN),
        "wan-i2v": generate(load(tiny_wan("i2v")), **WAN, image_path=str(picture)),
    }


@pytest.mark.parametrize("mode", MODES)
def test_flux_outputs_are_the_in_memory_ones_exactly(tiny_flux_dev, in_memory, mode):
    assert_same(generate(load(tiny_flux_dev, MODES[mode]), **FLUX), in_memory["flux"])


@pytest.mark.parametrize("mode", ["components", "layers", "text-encoders"])
def test_wan_two_experts_outputs_are_the_in_memory_ones_exactly(tiny_wan, in_memory, mode):
    """Wan2.2 A14B: two transformers (components: one slot for both), CFG, UMT5, sgdiff's VAE decoder."""
    assert_same(generate(load(tiny_wan("t2v-a14b"), MODES[mode]), **WAN), in_memory["wan-a14b"])


@pytest.mark.parametrize("mode", ["components", "layers"])
def test_wan_image_to_video_outputs_are_the_in_memory_ones_exactly(tiny_wan, picture, in_memory, mode):
    """Wan2.1 I2V: transformers' CLIP image encoder and diffusers' whole VAE (encode, then decode)."""
    runner = load(tiny_wan("i2v"), MODES[mode])
    assert_same(generate(runner, **WAN, image_path=str(picture)), in_memory["wan-i2v"])
    assert runner.offloaded is not None and runner.offloaded.on_demand.copies == 4  # text, image, VAE twice


@pytest.mark.parametrize("family", ["qwen-image-edit", "hunyuanvideo"])
def test_other_families_outputs_are_the_in_memory_ones_exactly(tmp_path, picture, family):
    """Qwen-Image-Edit: transformers' Qwen2.5-VL reading the image too, diffusers' VAE encoding and decoding;
    HunyuanVideo: Llama 3 and CLIP text, diffusers' tiled VAE. Layers offloads the components too."""
    if family == "qwen-image-edit":
        from sgdiff.testing.tiny_qwen_image import build_tiny_qwen_image_edit

        model, request = build_tiny_qwen_image_edit(tmp_path / "q"), dict(image_path=str(picture))
    else:
        from sgdiff.testing.tiny_hunyuan_video import build_tiny_hunyuan_video

        model, request = build_tiny_hunyuan_video(tmp_path / "h"), dict(num_frames=5)
    request |= dict(height=32, width=32, num_inference_steps=2)
    runner = load(model, OffloadConfig("layers"))
    assert_same(generate(runner, **request), generate(load(model), **request))
    assert runner.offloaded is not None and runner.offloaded.on_demand.copies == 3


def test_fused_projections_and_compiled_blocks_stream_too(tiny_flux_dev):
    """The concatenated weights of fused projections move with their block; a block's compiled forward
    (aot_eager: torch.compile's tracing, without a C++ compiler) runs between the hooks, which stay eager."""
    speed = SpeedConfig(fused_projections=True)
    reference = generate(load(tiny_flux_dev, speed=speed), **FLUX)
    runner = load(tiny_flux_dev, OffloadConfig("layers"), speed)
    for model in runner.pipeline.transformers:  # type: ignore[union-attr]
        compile_blocks(model, backend="aot_eager")
    assert_same(generate(runner, **FLUX), reference)
    streamer = runner.offloaded.streamer  # type: ignore[union-attr]
    assert streamer is not None and streamer.copies > len(streamer.units) and streamer.waits == 1


def test_fp8_weights_stream_too(tiny_flux_dev, monkeypatch):
    """FP8 weights (--dit-precision fp8: float8 bytes and their row scales) move with their block: the in-memory
    FP8 run's latents exactly. On the CPU their matmuls are emulated; the check that refuses fp8 there is
    bypassed for this test only."""
    from dataclasses import replace

    from sgdiff.engine import runner as runner_module

    real = runner_module.check_speed

    def check_but_fp8(speed, device, dtype):
        return real(replace(speed, dit_precision="default"), device, dtype)

    monkeypatch.setattr(runner_module, "check_speed", check_but_fp8)
    speed = SpeedConfig(dit_precision="fp8")
    reference = generate(load(tiny_flux_dev, speed=speed), **FLUX)
    plain = generate(load(tiny_flux_dev), **FLUX)
    assert not torch.equal(reference.latents, plain.latents)  # (the FP8 weights ran)
    runner = load(tiny_flux_dev, OffloadConfig("layers"), speed)
    assert any(getattr(m, "fp8", False) for m in runner.pipeline.transformers[0].modules())  # type: ignore[union-attr]
    assert_same(generate(runner, **FLUX), reference)
    streamer = runner.offloaded.streamer  # type: ignore[union-attr]
    assert streamer is not None and streamer.copies > len(streamer.units)


def test_components_wait_at_home_while_other_stages_run(tiny_flux_dev):
    runner = load(tiny_flux_dev, OffloadConfig("components"))
    modules = runner.pipeline.modules  # type: ignore[union-attr]
    seen: list[tuple[str, dict[str, str]]] = []

    def probe(stage: str):
        return lambda *_: seen.append((stage, {name: where(model) for name, model in modules.items()}))

    # (registered after the offload's hooks: they run once the module is lent)
    modules["text_encoder_2"].register_forward_hook(probe("text"))
    modules["transformer"].register_forward_pre_hook(probe("denoising"))
    modules["vae"].decoder.register_forward_pre_hook(probe("decoding"))
    assert {name: where(model) for name, model in modules.items()} == {
        "text_encoder": "home", "text_encoder_2": "home", "transformer": "device", "vae": "home"
    }  # fmt: skip
    generate(runner, **FLUX)
    text, *steps, decoding = seen
    assert text == ("text", {"text_encoder": "device", "text_encoder_2": "device", "transformer": "device",
                             "vae": "home"})  # fmt: skip
    for step in steps:
        assert step == ("denoising", {"text_encoder": "home", "text_encoder_2": "home", "transformer": "device",
                                      "vae": "home"})  # fmt: skip
    assert decoding == ("decoding", {"text_encoder": "home", "text_encoder_2": "home", "transformer": "device",
                                     "vae": "device"})  # fmt: skip
    assert len(steps) == FLUX["num_inference_steps"]
    assert [where(model) for model in modules.values()] == ["home", "home", "device", "home"]  # once it ended


def test_text_encoders_leave_the_gpu_and_come_back_for_the_next_prompt(tiny_flux_dev):
    runner = load(tiny_flux_dev, OffloadConfig(text_encoder_offload=True))
    modules = runner.pipeline.modules  # type: ignore[union-attr]
    during: list[dict[str, str]] = []
    modules["transformer"].register_forward_pre_hook(
        lambda *_: during.append({n: where(m) for n, m in modules.items()})
    )
    first, second = generate(runner, **FLUX), runner.generate(runner.sampling_params("a blue sphere", **FLUX))
    assert during[0] == {"text_encoder": "home", "text_encoder_2": "home", "transformer": "device", "vae": "device"}
    assert runner.offloaded is not None and runner.offloaded.on_demand.copies == 4  # both encoders, twice
    assert not torch.equal(first.latents, second.latents)  # type: ignore[arg-type]  # the new prompt's


def test_two_experts_share_one_slot(tiny_wan):
    """components: of Wan2.2 A14B's experts only the one running is on the device, in one shared slot."""
    runner = load(tiny_wan("t2v-a14b"), OffloadConfig("components"))
    first, second = runner.pipeline.transformers  # type: ignore[union-attr]
    seen: list[tuple[str, str]] = []
    for model in (first, second):
        model.register_forward_pre_hook(lambda *_: seen.append((where(first), where(second))))
    generate(runner, **WAN)
    assert set(seen) == {("device", "home"), ("home", "device")}
    assert seen.index(("home", "device")) > 0 and seen[-1] == ("home", "device")  # high noise, then low
    slot = runner.offloaded.on_demand.shared.slots[0].buffer  # type: ignore[union-attr]
    start = slot.data_ptr()
    assert all(start <= t.data_ptr() < start + slot.numel() for t in second.parameters())


@pytest.mark.parametrize("prefetch", [1, 2])
def test_blocks_stream_through_a_ring(tiny_flux_dev, prefetch):
    runner = load(tiny_flux_dev, OffloadConfig("layers", offload_prefetch=prefetch))
    streamer = runner.offloaded.streamer  # type: ignore[union-attr]
    assert streamer is not None and len(streamer.ring.slots) == prefetch + 1
    slots = [(s.buffer.data_ptr(), s.buffer.data_ptr() + s.buffer.numel()) for s in streamer.ring.slots]
    calls: list[int] = []

    def probe(index: int):
        def check(*_):
            calls.append(index)
            lent = [i for i, unit in enumerate(streamer.units) if where(unit.module) == "device"]
            assert index in lent and len(lent) <= prefetch + 1  # the running block, and the ones copied ahead
            assert all(where(unit.module) == "home" for i, unit in enumerate(streamer.units) if i not in lent)
            pointers = [t.data_ptr() for t in streamer.units[index].tensors]
            assert any(all(low <= p < high for p in pointers) for low, high in slots)  # in one slot of the ring

        return check

    for index, unit in enumerate(streamer.units):
        unit.module.register_forward_pre_hook(probe(index))
    generate(runner, **FLUX)
    runs = len(calls)
    assert calls == list(range(len(streamer.units))) * FLUX["num_inference_steps"]
    # every block copied once per forward, the first `prefetch` once more (for the next forward), only the
    # very first one when it was about to run
    assert (streamer.copies, streamer.waits) == (runs + prefetch, 1)
    generate(runner, **FLUX)  # the next request's first blocks were foreseen
    assert (streamer.copies, streamer.waits) == (2 * runs + prefetch, 1)


def test_weights_on_the_device_under_each_mode(tiny_flux_dev, tiny_wan):
    """The memory checks' counts (offload/memory.py), from the headers, against what loading makes."""
    runner = ModelRunner(str(tiny_flux_dev), runtime=RuntimeConfig(device="cpu", dtype="fp32"))
    tensors = memory.tensor_bytes(runner.model_dir, runner.info.model_index, torch.float32, frozenset())
    sizes = {name: sum(component.values()) for name, component in tensors.items()}
    total, texts = sum(sizes.values()), sizes["text_encoder"] + sizes["text_encoder_2"]
    place = lambda **o: weight_placement(tensors, OffloadConfig(**o), runner.family.text_encoders)  # noqa: E731
    plain = place()
    assert (plain.lending, plain.resident, plain.host) == (total, total, 0)
    te = place(text_encoder_offload=True)
    assert (te.lending, te.resident, te.host) == (total, total - texts, texts)
    components = place(cpu_offload="components")
    assert (components.resident, components.host) == (sizes["transformer"], total - sizes["transformer"])
    parts = [size for name, size in sizes.items() if name != "transformer"]
    assert components.lending == sizes["transformer"] + max(parts)  # while the largest part is lent
    blocks, rest = split_blocks(tensors["transformer"])
    assert len(blocks) == 4 and place(cpu_offload="layers").resident < components.resident
    for prefetch in (0, 1, 2):
        layers = place(cpu_offload="layers", offload_prefetch=prefetch)
        assert layers.resident == rest + (prefetch + 1) * max(blocks)
        offloaded = load(tiny_flux_dev, OffloadConfig("layers", offload_prefetch=prefetch)).offloaded
        streamer = offloaded.streamer  # type: ignore[union-attr]
        assert streamer is not None
        padding = (prefetch + 1) * max(len(unit.tensors) for unit in streamer.units) * 512
        assert layers.resident - rest <= streamer.resident_bytes() <= layers.resident - rest + padding
    wan = ModelRunner(str(tiny_wan("t2v-a14b")), runtime=RuntimeConfig(device="cpu", dtype="fp32"))
    tensors = memory.tensor_bytes(wan.model_dir, wan.info.model_index, torch.float32, frozenset())
    experts = weight_placement(tensors, OffloadConfig("components"), wan.family.text_encoders)
    assert experts.resident == max(sum(tensors["transformer"].values()), sum(tensors["transformer_2"].values()))


def test_a_run_that_fits_with_offload_is_not_refused(tiny_flux_dev, monkeypatch):
    """On one GPU (its memory faked): what cannot fit in memory is refused before loading, pointing at
    offload (counting the transformers alone: a sure lower bound); with `layers` the same request fits. On
    the CPU offload costs memory (homes and loans)."""
    engines = {mode: Engine(str(tiny_flux_dev), runtime=RuntimeConfig(device="cpu", dtype="fp32",
                                                                     offload=OffloadConfig(mode)))
               for mode in OFFLOAD_MODES}  # fmt: skip
    placements = {mode: engine._weight_placements() for mode, engine in engines.items()}
    request = engines["none"].request("p", **FLUX)
    floor = engines["none"].runner.family.activation_floor(engines["none"].runner.info, request, torch.float32)
    peaks = {mode: placement[2].device_peak(floor) for mode, placement in placements.items()}
    assert peaks["layers"] < peaks["components"] <= peaks["none"]  # (one transformer: components leaves it)
    monkeypatch.setattr(service, "gpu_memory_bytes", lambda device: peaks["layers"])
    for mode, engine in engines.items():
        monkeypatch.setattr(engine.runner, "device", torch.device("cuda"))
        if mode == "layers":
            engine.request("p", **FLUX)
        else:
            with pytest.raises(UserError, match="of GPU memory .* use cpu_offload (components or )?layers") as info:
                engine.request("p", **FLUX)
            assert info.value.field == "cpu_offload"
    cpu = {mode: Engine(str(tiny_flux_dev), runtime=RuntimeConfig(device="cpu", dtype="fp32",
                                                                  offload=OffloadConfig(mode)))
           for mode in ("none", "layers")}  # fmt: skip
    monkeypatch.setattr(
        memory, "available_memory_bytes", lambda field="MemAvailable": placements["none"][0].lending + floor
    )
    cpu["none"].request("p", **FLUX)
    with pytest.raises(UserError, match="memory on the CPU"):
        cpu["layers"].request("p", **FLUX)  # the blocks' ring besides their homes


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cpu-offload", "components", "--text-encoder-offload"],
         "error: --cpu-offload components keeps the text encoders off the GPU already: drop --text-encoder-offload"),
        (["--offload-prefetch", "2"], "error: --offload-prefetch is how many blocks --cpu-offload layers copies ahead"),
        (["--cpu-offload", "layers", "--enable-cuda-graph"], "error: --enable-cuda-graph needs a CUDA GPU"),
    ],
)  # fmt: skip
def test_flags_that_cannot_go_together_fail_in_one_line_before_loading(tiny_flux_dev, tmp_path, flags, message):
    args = ["generate", "--model-path", str(tiny_flux_dev), "--prompt", "p", "--device", "cpu"]
    result = CliRunner().invoke(cli.app, [*args, "--output-path", str(tmp_path / "out"), *flags])
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith(message), result.output
    assert not (tmp_path / "out").exists()


def test_layers_refuse_cuda_graphs():
    """(On a GPU: on the CPU the graph itself is refused first.)"""
    check_offload(OffloadConfig("layers"), SpeedConfig(torch_compile=True))  # compile works with it
    check_offload(OffloadConfig("components"), SpeedConfig(cuda_graph=True))
    with pytest.raises(UserError) as info:
        check_offload(OffloadConfig("layers"), SpeedConfig(cuda_graph=True))
    assert info.value.field == "cuda_graph" and "drop --enable-cuda-graph" in info.value.render(flag)
    with pytest.raises(UserError, match="is not one of none, components, layers"):
        OffloadConfig("disk")
    with pytest.raises(UserError, match=">= 0"):
        OffloadConfig("layers", offload_prefetch=-1)


def test_generate_with_layers_writes_the_same_image_and_reports_the_copies(tiny_flux_dev, tmp_path):
    args = ["generate", "--model-path", str(tiny_flux_dev), "--prompt", "a red cube", "--device", "cpu",
            "--dtype", "fp32", "--height", "32", "--width", "32", "--steps", "2", "-q",
            "--output-file-name", "x"]  # fmt: skip
    for name, flags in (("plain", []), ("layers", ["--cpu-offload", "layers", "--offload-prefetch", "2"])):
        dump = ["--perf-dump-path", str(tmp_path / f"{name}.json"), "--output-path", str(tmp_path / name)]
        result = CliRunner().invoke(cli.app, [*args, *dump, *flags])
        assert result.exit_code == 0, result.output
    assert (tmp_path / "layers" / "x.png").read_bytes() == (tmp_path / "plain" / "x.png").read_bytes()
    plain, layers = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("plain", "layers"))
    assert plain["offload"] is None
    report = layers["offload"]
    assert report["cpu_offload"] == "layers" and report["offload_prefetch"] == 2
    assert report["blocks_copied"] > 0 and report["blocks_not_prefetched"] == 1
    assert report["component_loans"] == 1  # the VAE (the prompt was encoded while the transformer loaded)


def test_the_flags_reach_the_runtime_config(monkeypatch):
    received: list = []
    monkeypatch.setattr(cli, "run", lambda request, quiet: received.append(request))
    for args in ([], ["--cpu-offload", "layers", "--offload-prefetch", "2"], ["--text-encoder-offload"]):
        result = CliRunner().invoke(cli.app, ["generate", "--model-path", "m", "--prompt", "p", *args])
        assert result.exit_code == 0, result.output
    assert [request.runtime.offload for request in received] == [
        OffloadConfig(),
        OffloadConfig("layers", offload_prefetch=2),
        OffloadConfig(text_encoder_offload=True),
    ]
    assert tuple(choice.value for choice in CpuOffloadChoice) == OFFLOAD_MODES
    commands = typer.main.get_command(cli.app).commands  # type: ignore[attr-defined]
    memory_flags = [
        {
            p.name: (tuple(p.opts), p.default)
            for p in commands[name].params
            if getattr(p, "rich_help_panel", "") == "Memory"
        }
        for name in ("generate", "serve")
    ]
    assert memory_flags[0] == memory_flags[1] and len(memory_flags[0]) == 5  # (and --gpu-memory-limit)


@pytest.mark.slow
def test_layers_on_several_processes_give_the_one_process_outputs(tiny_flux_dev):
    """Each rank streams its own copy of the blocks (CFG parallel over 2 CPU processes)."""
    config = ParallelConfig(2, enable_cfg_parallel=True)
    request = (str(tiny_flux_dev), "a red cube", {**FLUX, "negative_prompt": "blurry", "true_cfg_scale": 3.0})
    plain = run_on_ranks(config, offloaded_parallel_latents, *request, OffloadConfig())
    streamed = run_on_ranks(config, offloaded_parallel_latents, *request, OffloadConfig("layers"))
    assert all(torch.equal(a, b) for a, b in zip(plain, streamed, strict=True))


def test_layers_refuse_sequence_parallelism(tiny_flux_dev):
    """(FLUX's sequence-parallel plan computes every block's modulation right after the timestep embedding,
    outside the blocks, where layers has their weights in CPU memory.)"""
    runtime = RuntimeConfig(device="cpu", dtype="fp32", offload=OffloadConfig("layers"))
    with pytest.raises(UserError, match="cannot run with sequence parallelism") as info:
        Engine(str(tiny_flux_dev), runtime=runtime, parallel=ParallelConfig(2, ring_degree=2))
    assert info.value.field == "cpu_offload"
    Engine(str(tiny_flux_dev), runtime=runtime, parallel=ParallelConfig(2, enable_cfg_parallel=True))  # accepted

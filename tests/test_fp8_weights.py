"""--dit-precision fp8 (sgdiff/models/fp8.py, sgdiff/speed/fp8.py): the quantisation and the FP8 Linear
against plain references written here, the transformers with FP8 weights against their own dtype (the
math emulated on the CPU), the toggle's reach, and the refusals where FP8 matmuls cannot run."""

from __future__ import annotations

import copy
import gc
import json
import weakref
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from sgdiff.bench.parts import BENCH_MODELS, TINY_SIZE, build_transformers, transformer_inputs
from sgdiff.cli.errors import flag
from sgdiff.cli.main import app
from sgdiff.cli.options import DitPrecisionChoice
from sgdiff.config import ParallelConfig, SpeedConfig
from sgdiff.demo.quality import grade_model
from sgdiff.engine.runner import ModelRunner
from sgdiff.errors import UserError
from sgdiff.models.fp8 import FP8, cast_fp8, quantize_rows, scaled_mm, scaled_mm_emulated
from sgdiff.models.layers import Linear, project
from sgdiff.pipeline.registry import family_named
from sgdiff.speed import apply
from sgdiff.speed.apply import check_speed, resolve_speed, speed_up_transformer
from sgdiff.speed.compile import repeated_blocks
from sgdiff.speed.fp8 import DIT_PRECISIONS, fp8_linears, use_fp8_weights
from sgdiff.testing.compare import relative_error
from sgdiff.testing.distributed import run_on_ranks
from sgdiff.testing.sharded_flux import sharded_fp8_flux

runner = CliRunner()
FP8_SPEED = SpeedConfig(dit_precision="fp8")


def e4m3_grid() -> torch.Tensor:
    """Every finite value >= 0 of float8 e4m3fn, from its definition: exponent bias 7, 3 mantissa bits,
    subnormals at exponent 0, no infinities, S.1111.111 is NaN. Index i has mantissa i % 8."""
    values = [m / 8 * 2.0**-6 for m in range(8)]
    values += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if (e, m) != (15, 7)]
    return torch.tensor(values, dtype=torch.float64)


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x to the nearest e4m3 value, ties to the even mantissa, saturated at +-448 (float64)."""
    grid, magnitude = e4m3_grid(), x.double().abs().clamp(max=448)
    above = torch.searchsorted(grid, magnitude).clamp(max=len(grid) - 1)
    below = (above - 1).clamp(min=0)
    up, down = grid[above] - magnitude, magnitude - grid[below]
    take_up = (up < down) | ((up == down) & (above % 2 == 0))
    return torch.where(take_up, grid[above], grid[below]) * x.sign()


def plain_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per row, amax / 448 (float32, as the tensor cores take it); rows rounded in float64."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / 448
    return round_e4m3(x.float() / scale), scale


def plain_fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The reference: weight per output channel, x per token, each rounded to e4m3, then float64 math."""
    qw, sw = plain_quantize(weight)
    qx, sx = plain_quantize(x.reshape(-1, x.shape[-1]))
    out = (qx * sx.double()) @ (qw * sw.double()).t()
    out = out if bias is None else out + bias.double()
    return out.view(*x.shape[:-1], -1)


def test_the_e4m3_grid_is_torchs_float8():
    grid = e4m3_grid()
    assert len(grid) == 127 and grid.max() == 448 and grid[1] == 2.0**-9  # largest finite, smallest subnormal
    assert torch.equal(grid.to(FP8).double(), grid)


def test_rows_are_scaled_by_their_amax_and_rounded_to_nearest_even():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1e4, 1.0, 1.0])[:, None]
    x[4] = 0  # an all-zero row: a tiny scale, zeros
    # amax 448 gives scale 1: exact ties (1.0625 between 1 and 1.125, 2^-10 between 0 and 2^-9) and plain values
    x[5, :6] = torch.tensor([448.0, 1.0625, 1.1875, 2.0**-10, 300.0, -3 * 2.0**-10])
    q, scale = quantize_rows(x)
    expected_q, expected_scale = plain_quantize(x)
    assert q.dtype == FP8 and q.shape == x.shape and scale.shape == (6, 1) and scale.dtype == torch.float32
    assert torch.equal(scale, expected_scale)
    assert torch.equal(q.double(), expected_q)
    assert torch.equal(q[5, :6].double(), torch.tensor([448.0, 1.0, 1.25, 0.0, 288.0, -(2.0**-8)], dtype=torch.float64))
    assert (q.double().abs().amax(dim=1)[[0, 1, 2, 3, 5]] == 448).all()  # each row's largest lands on 448
    assert not q[4].double().any() and torch.isfinite(q.double()).all()


def test_values_beyond_448_saturate():
    x = torch.tensor([[449.0, 464.0, 470.0, -1e4, float(2**20), 447.0]])
    q = cast_fp8(x, torch.ones(1, 1))
    assert q.double().tolist() == [[448.0, 448.0, 448.0, -448.0, 448.0, 448.0]]  # never NaN (e4m3fn: no infinity)


def test_torchs_scaled_mm_gets_the_operands_the_emulation_assumes():
    """The call the GPU makes (scaled_mm: row-wise scales, the weight transposed to column-major), run by
    the CPU's torch._scaled_mm, gives the emulated numbers: the layout and the scales' shapes are right."""
    g = torch.Generator().manual_seed(1)
    qx, sx = quantize_rows(torch.randn(40, 64, generator=g))
    qw, sw = quantize_rows(torch.randn(48, 64, generator=g))
    bias = torch.randn(48, generator=g).bfloat16()
    try:
        real = scaled_mm(qx, sx, qw, sw.view(-1), bias, torch.bfloat16)
    except (RuntimeError, NotImplementedError) as exc:  # a torch without the CPU kernel
        pytest.skip(f"this torch has no CPU torch._scaled_mm: {exc}")
    emulated = scaled_mm_emulated(qx, sx, qw, sw.view(-1), bias, torch.float32)
    assert real.dtype == torch.bfloat16 and real.shape == (40, 48)
    assert (real.float() - emulated).abs().max() <= emulated.abs().max() * 2**-8  # bf16's rounding of the output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_is_the_plain_reference(dtype):
    g = torch.Generator().manual_seed(2)
    linear = Linear(64, 48).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=g) / 8)
        linear.bias.copy_(torch.randn(48, generator=g))
    x = (torch.randn(2, 5, 64, generator=g) * torch.logspace(-2, 2, 5)[None, :, None]).to(dtype)  # tokens differ
    plain = linear(x)
    reference = plain_fp8_linear(x, linear.weight, linear.bias)
    linear.to_fp8()
    out = linear(x)
    assert out.dtype == dtype and out.shape == (2, 5, 48)
    assert linear.weight.dtype == FP8 and linear.weight_scale.shape == (48,) and linear.bias.dtype == dtype
    assert relative_error(out, reference) <= (1e-6 if dtype == torch.float32 else 4e-3)  # float32 sums; bf16 output
    assert 1e-3 < relative_error(out, plain) < 5e-2  # lossy, by e4m3's 3 mantissa bits


def test_fused_fp8_projections_are_the_linears_own():
    g = torch.Generator().manual_seed(3)
    linears = [Linear(32, 16), Linear(32, 32), Linear(32, 16)]
    for linear in linears:
        linear.to_fp8()
    x = torch.randn(3, 7, 32, generator=g)
    apart = [linear(x) for linear in linears]
    from sgdiff.models.layers import FusedProjection

    linears[0].fused = FusedProjection(tuple(linears))
    fused = project(x, *linears)
    assert linears[0].fused.weight.dtype == FP8 and linears[0].fused.scale.shape == (64,)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(apart, fused, strict=True))
    assert all(torch.equal(a, linear(x)) for a, linear in zip(apart, linears, strict=True))  # views of the fused rows


def test_an_fp8_linear_traces_as_one_graph():
    """No graph break (no data-dependent Python branch): torch.compile and CUDA graphs take it whole."""
    linear = Linear(32, 16)
    linear.to_fp8()
    x = torch.randn(3, 5, 32)
    traced = torch.compile(linear, backend="eager", fullgraph=True)
    assert torch.equal(traced(x), linear(x))


def tiny(model_name: str):
    """A tiny bench transformer (diffusers' init, bf16, CPU) and one forward's inputs."""
    model = BENCH_MODELS[model_name]
    _, ours = build_transformers(model, tiny=True, device=torch.device("cpu"))
    return model, ours, transformer_inputs(model, ours, TINY_SIZE, torch.device("cpu"), seed=1)


@pytest.mark.parametrize("model_name", ["flux.1-dev", "wan2.1-t2v-1.3b"])
def test_the_toggle_converts_every_block_linear_and_halves_their_bytes(model_name):
    model, ours, inputs = tiny(model_name)
    blocks = repeated_blocks(ours)
    in_blocks = [m for block in blocks for m in block.modules() if isinstance(m, Linear)]
    before = {id(linear): linear.weight.nbytes for linear in in_blocks}
    dtypes = {id(m): m.weight.dtype for m in ours.modules() if isinstance(m, Linear)}
    released = weakref.ref(in_blocks[0].weight)
    with torch.inference_mode():
        plain = ours(**inputs)
        speed_up_transformer(ours, FP8_SPEED, family_named(model.family))
        gc.collect()
        fp8 = ours(**inputs)
    converted = [m for m in ours.modules() if isinstance(m, Linear) and m.fp8]
    assert {id(m) for m in converted} == {id(m) for m in in_blocks} == {id(m) for m in fp8_linears(ours)}
    # FLUX: 14 per double-stream block (two modulations, 8 attention projections, two MLPs), 6 per single-stream
    # block (modulation, q, k, v, MLP in, out); Wan: 10 per block (two attentions' q, k, v, out, the MLP)
    assert len(converted) == {"flux": 2 * 14 + 2 * 6, "wan": 2 * 10}[model.family]
    assert all(linear.weight.nbytes * 2 == before[id(linear)] for linear in converted)  # bf16 -> float8
    assert released() is None  # the bf16 weight is gone, not kept beside its float8 copy
    outside = [m for m in ours.modules() if isinstance(m, Linear) and not m.fp8]
    assert outside and all(m.weight.dtype == dtypes[id(m)] for m in outside)  # embedders, output projection
    # measured 6.8e-3 (FLUX) and 9.8e-3 (Wan) on these randomly initialised models (one FP8 Linear alone: ~3.7e-2
    # on random data, e4m3's rounding of its input and weight; the residual stream carries the rest unrounded)
    assert 1e-3 < relative_error(fp8, plain) < 2e-2


def test_weights_in_cpu_memory_are_quantised_where_the_model_computes(monkeypatch):
    """Offloading keeps the weights in CPU memory while the toggles run: each Linear is quantised on the
    compute device (a GPU: seconds, not the CPU's tens of seconds for FLUX.1-dev; the same bytes as an
    in-memory model's there: scripts/probes/fp8_quantize_on_gpu.py) and stays where it was."""
    model, ours, _ = tiny("flux.1-dev")
    asked: list = []
    to_fp8 = Linear.to_fp8
    monkeypatch.setattr(Linear, "to_fp8", lambda self, on=None: asked.append(on) or to_fp8(self))
    speed_up_transformer(ours, FP8_SPEED, family_named(model.family), torch.device("cuda", 0))
    assert asked == [torch.device("cuda", 0)] * len(fp8_linears(ours)) and asked
    asked.clear()
    _, on_cpu, _ = tiny("flux.1-dev")
    use_fp8_weights(on_cpu, torch.device("cpu"))  # (computing where the weights are: nothing to move)
    assert asked == [None] * len(fp8_linears(on_cpu))
    here = Linear(32, 16, dtype=torch.bfloat16)
    reference = copy.deepcopy(here)
    reference.to_fp8()
    here.to_fp8(on=torch.device("cpu"))
    assert torch.equal(here.weight.view(torch.uint8), reference.weight.view(torch.uint8))
    assert torch.equal(here.weight_scale, reference.weight_scale)


def test_fp8_weights_fuse_with_the_same_numbers():
    model, ours, inputs = tiny("flux.1-dev")
    fused = copy.deepcopy(ours)
    family = family_named(model.family)
    with torch.inference_mode():
        speed_up_transformer(ours, FP8_SPEED, family)
        speed_up_transformer(fused, replace(FP8_SPEED, fused_projections=True), family)
        assert relative_error(fused(**inputs), ours(**inputs)) < 1e-5
    first = fused.transformer_blocks[0].attn.to_q
    assert first.fused is not None and first.fused.weight.dtype == FP8


@pytest.mark.slow
@pytest.mark.parametrize("name, clip", [("sgdiff/demo-image", False), ("sgdiff/demo-video", True)])
def test_demo_models_pass_their_quality_checks_with_fp8_weights(name, clip):
    """The embedded demo models' held-out checks (tests/test_demo_models.py: each >= 90%) with FP8 weights,
    emulated on the CPU in float32, on a third of the held-out prompts spread over them (`sgdiff bench
    --quality --dit-precision fp8` grades them all)."""
    engine = ModelRunner(name)
    engine.load()
    (transformer,) = engine.pipeline.transformers
    assert use_fp8_weights(transformer) == 60  # the demo image's 3 + 3 blocks, the demo video's 6
    grades = grade_model(engine, clip=clip, prompts=20 if not clip else 16)
    assert grades.passed(), f"{grades.summary()}; missed: {grades.misses}"


def test_cli_precision_names_are_the_librarys():
    assert tuple(choice.value for choice in DitPrecisionChoice) == DIT_PRECISIONS


def test_fp8_is_refused_where_its_matmuls_cannot_run(monkeypatch):
    cpu, cuda, bf16 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16
    with pytest.raises(UserError, match=r"^dit_precision fp8 needs FP8 tensor cores.*runs on cpu") as caught:
        check_speed(FP8_SPEED, cpu, torch.float32)
    assert caught.value.field == "dit_precision"
    assert caught.value.render(flag).startswith("--dit-precision fp8 needs FP8 tensor cores")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(UserError, match=r"this NVIDIA A100 has compute capability 8.0: drop dit_precision"):
        check_speed(FP8_SPEED, cuda, bf16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    with pytest.raises(UserError, match=r"fp8 computes in bfloat16; the model runs in float16"):
        check_speed(FP8_SPEED, cuda, torch.float16)
    with pytest.raises(UserError, match=r"^fused_gelu computes the GELU in a bf16 GEMM's epilogue") as caught:
        check_speed(replace(FP8_SPEED, fused_gelu=True), cuda, bf16)
    assert caught.value.field == "fused_gelu"
    with pytest.raises(UserError, match=r"dit_precision 'fp4' is not one of default, fp8"):
        check_speed(SpeedConfig(dit_precision="fp4"), cpu, torch.float32)
    monkeypatch.setattr(apply, "attention_backend", lambda *args: "kernel")  # (no GPU to pick a kernel on)
    resolved = resolve_speed(FP8_SPEED, cuda, bf16)
    assert resolved.fused_gelu is False and resolved.fused_norms == resolve_speed(SpeedConfig(), cuda, bf16).fused_norms
    assert check_speed(resolved, cuda, bf16) == "kernel"  # an H100 in bf16 runs it


def test_cli_refuses_fp8_on_the_cpu_in_one_line(tiny_flux_dev, tmp_path):
    args = ["generate", "--model-path", str(tiny_flux_dev), "--prompt", "p", "--device", "cpu", "--dit-precision"]
    result = runner.invoke(app, [*args, "fp8", "--output-path", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --dit-precision fp8 needs FP8 tensor cores: a CUDA GPU of compute capability 8.9 or newer (Ada, "
        "Hopper, Blackwell); the model runs on cpu: drop --dit-precision"
    ]
    assert not (tmp_path / "out").exists()


def test_bench_reports_fp8_weights_against_diffusers_bf16(monkeypatch, tmp_path):
    monkeypatch.setattr(apply, "check_fp8", lambda device, dtype: None)  # the CPU emulates the FP8 matmuls
    out = tmp_path / "bench.json"
    args = ["bench", "--model", "flux.1-dev", "--tiny", "--repeat", "1", "--warmup", "0", "--dit-precision", "fp8"]
    result = runner.invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["speed"]["dit_precision"] == "fp8"
    assert 1e-3 < data["bf16_rel_err"] < 5e-2  # the FP8 error now, against diffusers' bf16
    assert data["sgdiff"]["weights_gib"] < 0.75 * data["diffusers"]["weights_gib"]
    assert "rel err, sgdiff with FP8 weights vs diffusers' bf16: " in result.output
    assert any(line.startswith("transformer weights, GiB") for line in result.output.splitlines())


@pytest.mark.slow
@pytest.mark.parametrize(
    "config", [ParallelConfig(2), ParallelConfig(3, ring_degree=3)], ids=["ulysses-2", "ring-3-unaligned-rows"]
)
def test_sequence_parallel_runs_fp8_weights_as_one_process_does(config):
    """FLUX's modulation shared out over the ranks computes its FP8 rows (a rank's range cut anywhere: ring-3's
    683 rows each); under Ulysses-2 the FP8 q, k, v projections run in the model and q, k, v travel."""
    for rank, result in enumerate(run_on_ranks(config, sharded_fp8_flux, 1)):
        assert result["fp8_pieces"] > 0, f"rank {rank} computed no FP8 modulation rows"
        assert result["sharded"] <= 1e-5 * result["scale"], f"rank {rank}: {result}"

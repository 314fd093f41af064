"""Every speed toggle changes what runs, and leaves the output as it was (sgdiff/speed/)."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from typer.testing import CliRunner

from sgdiff.cli.errors import flag
from sgdiff.cli.main import app
from sgdiff.cli.options import AttentionBackendChoice
from sgdiff.config import RuntimeConfig, SpeedConfig
from sgdiff.engine.runner import ModelRunner
from sgdiff.errors import UserError
from sgdiff.models.attention import use_attention_impl
from sgdiff.speed.apply import check_speed, resolve_speed
from sgdiff.speed.attention_backends import CHOICES
from sgdiff.speed.compile import compile_blocks
from sgdiff.speed.cuda_graph import CudaGraphForward
from sgdiff.speed.precompile import PrecompiledForward
from sgdiff.testing.capture_stand_in import CountingCapture

runner = CliRunner()
spec = importlib.util.find_spec
REQUEST = dict(height=32, width=32, num_inference_steps=2)


FA_MISSING = "error: --attention-backend fa needs FlashAttention, which is not installed: pip install 'sgdiff[flash]'"
MATH, FLASH = "aten::_scaled_dot_product_attention_math", "aten::_scaled_dot_product_flash_attention_for_cpu"


def generate_profiled(model, speed: SpeedConfig) -> tuple[torch.Tensor, dict[str, int]]:
    """Final latents of one small request, and how often it called each aten op."""
    engine = ModelRunner(str(model), runtime=RuntimeConfig(device="cpu", dtype="fp32", speed=speed))
    engine.load()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        latents = engine.generate(engine.sampling_params("a red cube", **REQUEST)).latents
    counts = {event.key: event.count for event in prof.key_averages()}
    return latents, {MATH: counts.get(MATH, 0), FLASH: counts.get(FLASH, 0)}


def test_attention_backend_picks_the_kernel(tiny_flux_dev):
    reference, auto = generate_profiled(tiny_flux_dev, SpeedConfig())
    math, with_math = generate_profiled(tiny_flux_dev, SpeedConfig(attention_backend="math"))
    flash, with_flash = generate_profiled(tiny_flux_dev, SpeedConfig(attention_backend="flash"))
    # the text encoders (transformers) keep SDPA's choice; every transformer attention call moves
    transformer_calls = auto[FLASH] - with_math[FLASH]
    assert transformer_calls == with_math[MATH] > 0 and auto[MATH] == 0
    assert with_flash == auto
    assert (math - reference).abs().max() < 1e-4 and torch.equal(flash, reference)


def test_attention_backend_names_match_the_cli():
    assert tuple(choice.value for choice in AttentionBackendChoice) == CHOICES


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--attention-backend", "cudnn"], "error: --attention-backend cudnn cannot run on cpu in float32"),
        (["--attention-backend", "fa3"], "error: --attention-backend fa3 needs the flash_attn_interface package"),
        (["--attention-backend", "fa"], FA_MISSING),
        (["--enable-cuda-graph"], "error: --enable-cuda-graph needs a CUDA GPU; the model runs on cpu"),
        (["--enable-fused-norms"], "error: --enable-fused-norms runs a Triton kernel on CUDA GPUs; the model runs on"),
    ],
)
def test_toggles_this_machine_cannot_run_fail_before_loading(tiny_flux_dev, tmp_path, flags, message):
    args = ["generate", "--model-path", str(tiny_flux_dev), "--prompt", "p", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--output-path", str(tmp_path / "out"), *flags])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [result.output.strip().splitlines()[0]]
    assert result.output.startswith(message), result.output
    assert "loaded" not in result.output and not (tmp_path / "out").exists()


def test_fused_norms_need_bf16_and_triton_on_a_gpu(monkeypatch):
    # check_speed only reads the device and dtype it is given: no GPU needed to check its answers
    cuda, speed = torch.device("cuda"), SpeedConfig(fused_norms=True)
    with pytest.raises(UserError, match=r"^fused_norms runs in bfloat16 only; the model runs in float16") as caught:
        check_speed(speed, cuda, torch.float16)
    assert caught.value.field == "fused_norms"  # the CLI names its flag, a server the field
    assert caught.value.render(flag).startswith("--enable-fused-norms runs in bfloat16 only")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else spec(name, *a))
    with pytest.raises(UserError, match=r"^fused_norms needs the triton package, which is not installed"):
        check_speed(speed, cuda, torch.bfloat16)


def test_fusions_are_on_by_default_on_a_gpu_in_bf16_only(monkeypatch):
    """None (no flag) means on where a fusion is never slower: fused GELU and norms on a CUDA GPU in
    bf16 (norms with Triton), fused projections there only with compile; off on the CPU or in float32;
    a flag given either way wins."""
    cuda, cpu, bf16 = torch.device("cuda"), torch.device("cpu"), torch.bfloat16
    on = lambda speed: {n for n in ("fused_projections", "fused_gelu", "fused_norms") if getattr(speed, n)}  # noqa: E731
    assert on(resolve_speed(SpeedConfig(), cuda, bf16)) == {"fused_gelu", "fused_norms"}
    assert on(resolve_speed(SpeedConfig(torch_compile=True), cuda, bf16)) == {"fused_projections", "fused_gelu",
                                                                              "fused_norms"}  # fmt: skip
    assert on(resolve_speed(SpeedConfig(torch_compile=True), cuda, torch.float32)) == set()
    assert on(resolve_speed(SpeedConfig(torch_compile=True), cpu, bf16)) == set()
    off = SpeedConfig(fused_projections=False, fused_gelu=False, fused_norms=False, torch_compile=True)
    assert on(resolve_speed(off, cuda, bf16)) == set()
    assert on(resolve_speed(SpeedConfig(fused_gelu=True), cpu, torch.float32)) == {"fused_gelu"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else spec(name, *a))
    assert on(resolve_speed(SpeedConfig(), cuda, bf16)) == {"fused_gelu"}


def test_a_runner_on_the_cpu_runs_the_plain_path_by_default(tiny_flux_dev):
    runner_ = ModelRunner(str(tiny_flux_dev), runtime=RuntimeConfig(device="cpu", dtype="fp32"))
    assert (runner_.speed.fused_projections, runner_.speed.fused_gelu, runner_.speed.fused_norms) == (False,) * 3


def test_torch_compile_compiles_each_block_kind_once(tiny_flux_dev):
    torch._dynamo.reset()
    engine = ModelRunner(str(tiny_flux_dev), runtime=RuntimeConfig(device="cpu", dtype="fp32"))
    engine.load()
    reference = engine.generate(engine.sampling_params("a red cube", **REQUEST)).latents
    model = engine.pipeline.transformers[0]
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    assert compile_blocks(model, backend="eager") == len(blocks) > 2
    assert all(hasattr(block.forward, "_torchdynamo_orig_callable") for block in blocks)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = engine.generate(engine.sampling_params("a red cube", **REQUEST)).latents
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    assert 2 <= graphs < len(blocks)  # one graph per block kind (and shape), shared by every block of it
    assert (compiled - reference).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["ahead", "just-in-time"])
def test_torch_compile_toggle_reaches_the_blocks(tiny_flux_dev, mode):
    speed = SpeedConfig(torch_compile=True, torch_compile_mode=mode)
    engine = ModelRunner(str(tiny_flux_dev), runtime=RuntimeConfig(device="cpu", dtype="fp32", speed=speed))
    engine.load()
    model = engine.pipeline.transformers[0]
    forwards = [block.forward for block in model.single_transformer_blocks]
    if mode == "ahead":
        assert all(isinstance(forward, PrecompiledForward) for forward in forwards)
    else:
        assert all(hasattr(forward, "_torchdynamo_orig_callable") for forward in forwards)


def test_cuda_graph_replays_one_capture_per_signature():
    weight = torch.randn(4, 4)

    def forward(x: torch.Tensor, scale: float) -> torch.Tensor:
        return (x @ weight) * scale

    capture = CountingCapture()
    graphed = CudaGraphForward(forward, capture=capture)
    with torch.inference_mode():
        a, b = torch.randn(2, 4), torch.randn(2, 4)
        out_a, out_b = graphed(a, 2.0), graphed(b, 2.0)  # same signature: one capture, new inputs copied in
        assert capture.captures == 1
        assert torch.equal(out_a, forward(a, 2.0)) and torch.equal(out_b, forward(b, 2.0))  # not aliased
        graphed(torch.randn(3, 4), 2.0)  # another shape
        graphed(a, 3.0)  # another non-tensor argument
        assert capture.captures == 3
        with use_attention_impl(lambda q, k, v: q):  # another attention (sequence parallelism swaps it)
            graphed(a, 2.0)
        assert capture.captures == 4
    graphed(a, 2.0)  # autograd on: the plain forward
    assert capture.captures == 4


def test_rope_traced_by_compile_is_the_eager_rotation():
    from sgdiff.models.rope import apply_rope, rope_frequencies

    ids = torch.stack([torch.zeros(10), torch.arange(10.0), torch.arange(10.0).flip(0)], dim=-1)
    rope = rope_frequencies(ids, (4, 6, 6), 10000.0)  # [10, 8, 2]
    x = torch.randn(2, 10, 3, 16, dtype=torch.bfloat16)
    traced = torch.compile(apply_rope, backend="eager", fullgraph=True)(x, rope)
    eager = apply_rope(x, rope)
    assert torch.equal(traced, eager)
    # a rotation: each channel pair keeps its length
    pairs = x.float().unflatten(-1, (-1, 2)).norm(dim=-1)
    assert torch.allclose(eager.float().unflatten(-1, (-1, 2)).norm(dim=-1), pairs, rtol=1e-2)


def generate_counting_ops(model_fixture: str, request, speed: SpeedConfig) -> tuple[torch.Tensor, dict, dict]:
    """(final latents, aten op -> calls, the transformer's state dict) of one small request."""
    model = request.getfixturevalue(model_fixture)
    model = model("t2v") if model_fixture == "tiny_wan" else model
    flags = dict(REQUEST, num_frames=5) if model_fixture == "tiny_wan" else REQUEST
    engine = ModelRunner(str(model), runtime=RuntimeConfig(device="cpu", dtype="fp32", speed=speed))
    engine.load()
    transformer = engine.pipeline.transformers[0]
    state = {name: t.clone() for name, t in transformer.state_dict().items()}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        latents = engine.generate(engine.sampling_params("a red cube", **flags)).latents
    return latents, {e.key: e.count for e in prof.key_averages()}, state


@pytest.mark.parametrize("model_fixture", ["tiny_flux_dev", "tiny_wan"])
def test_fused_projections_run_fewer_gemms_with_the_same_weights(model_fixture, request):
    plain, plain_ops, plain_state = generate_counting_ops(model_fixture, request, SpeedConfig())
    fused, fused_ops, fused_state = generate_counting_ops(model_fixture, request, SpeedConfig(fused_projections=True))
    assert fused_ops["aten::linear"] < plain_ops["aten::linear"]
    assert plain_state.keys() == fused_state.keys()
    assert all(torch.equal(plain_state[name], fused_state[name]) for name in plain_state)
    assert (fused - plain).abs().max() < 1e-4


@pytest.mark.parametrize("model_fixture", ["tiny_flux_dev", "tiny_wan"])
def test_fused_gelu_runs_the_mlp_gelu_with_its_gemm(model_fixture, request):
    speed = SpeedConfig(fused_projections=True)
    plain, plain_ops, _ = generate_counting_ops(model_fixture, request, speed)
    fused, fused_ops, _ = generate_counting_ops(model_fixture, request, replace(speed, fused_gelu=True))
    # on the CPU the epilogue is an addmm with the GELU in place on its output (on CUDA: cuBLASLt's)
    moved = plain_ops["aten::gelu"] - fused_ops.get("aten::gelu", 0)
    assert moved > 0 and fused_ops["aten::gelu_"] == moved and "aten::gelu_" not in plain_ops
    assert plain_ops["aten::linear"] - fused_ops["aten::linear"] >= moved  # those GEMMs are addmm now
    if model_fixture == "tiny_flux_dev":  # single-stream blocks: proj_out without the concatenation
        assert fused_ops["aten::cat"] < plain_ops["aten::cat"] and fused_ops["aten::addmm_"] > 0
    assert (fused - plain).abs().max() < 1e-4


def test_ring_attention_refuses_a_chosen_backend(tiny_flux_dev, tmp_path):
    args = ["generate", "--model-path", str(tiny_flux_dev), "--prompt", "p", "--device", "cpu", "--num-gpus", "2"]
    result = runner.invoke(app, [*args, "--ring-degree", "2", "--attention-backend", "math"])
    assert result.exit_code == 2
    assert result.output.startswith("error: --attention-backend math cannot run ring attention")

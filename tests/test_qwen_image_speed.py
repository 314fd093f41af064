"""Every speed toggle reaches Qwen-Image's transformer, changes what runs and keeps its output: fused
projections and GELU within float32 rounding of the plain path (1e-4, as FLUX's and Wan's), fused norms
bit for bit in bf16 (Triton's interpreter: sgdiff/testing/qwen_kernel_checks.py), regional
torch.compile with one graph for the one block kind, CUDA graphs captured once per signature; a
toggle taken off again gives the plain path's output exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from sgdiff.config import RuntimeConfig, SpeedConfig
from sgdiff.engine.runner import ModelRunner
from sgdiff.families.qwen_image import FAMILY
from sgdiff.models.layers import LayerNormModulation, Linear, RMSNorm
from sgdiff.models.qwen_image import QwenImageTransformer, QwenImageTransformerConfig
from sgdiff.speed.apply import speed_up_transformer
from sgdiff.speed.compile import compile_blocks
from sgdiff.speed.cuda_graph import CudaGraphForward
from sgdiff.speed.precompile import PrecompiledForward
from sgdiff.testing.capture_stand_in import CountingCapture
from sgdiff.testing.compare import randomize_weights
from sgdiff.testing.qwen_parallel import TINY_EDIT, edit_inputs
from sgdiff.testing.tiny_qwen_image import build_tiny_qwen_image

REQUEST = dict(height=32, width=48, num_inference_steps=2, seed=3)
CFG = dict(REQUEST, negative_prompt="blurry", true_cfg_scale=4.0)  # two forwards a step, of unequal text lengths
PLAIN = SpeedConfig(fused_projections=False, fused_gelu=False, fused_norms=False)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    return build_tiny_qwen_image(tmp_path_factory.mktemp("qwen-image") / "tiny")


def generate_counting_ops(model, speed: SpeedConfig, flags: dict) -> tuple[torch.Tensor, dict, dict]:
    """(final latents, aten op -> calls, the transformer's state dict) of one small request."""
    engine = ModelRunner(str(model), runtime=RuntimeConfig(device="cpu", dtype="fp32", speed=speed))
    engine.load()
    transformer = engine.pipeline.transformers[0]
    state = {name: t.clone() for name, t in transformer.state_dict().items()}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        latents = engine.generate(engine.sampling_params("a red cube", **flags)).latents
    return latents, {e.key: e.count for e in prof.key_averages()}, state


def test_fused_projections_run_fewer_gemms_with_the_same_weights(tiny_qwen):
    plain, plain_ops, plain_state = generate_counting_ops(tiny_qwen, PLAIN, CFG)
    fused, fused_ops, fused_state = generate_counting_ops(tiny_qwen, replace(PLAIN, fused_projections=True), CFG)
    # q, k, v of each stream as one GEMM: 2 x 2 GEMMs fewer per block and forward
    forwards, blocks = 2 * REQUEST["num_inference_steps"], 2
    assert plain_ops["aten::linear"] - fused_ops["aten::linear"] == 4 * blocks * forwards
    assert plain_state.keys() == fused_state.keys()  # diffusers' names, loadable as they were
    assert all(torch.equal(plain_state[name], fused_state[name]) for name in plain_state)
    assert (fused - plain).abs().max() < 1e-4


def test_fused_gelu_runs_the_mlp_gelu_with_its_gemm(tiny_qwen):
    speed = replace(PLAIN, fused_projections=True)
    plain, plain_ops, _ = generate_counting_ops(tiny_qwen, speed, REQUEST)
    fused, fused_ops, _ = generate_counting_ops(tiny_qwen, replace(speed, fused_gelu=True), REQUEST)
    # on the CPU the epilogue is an addmm with the GELU in place on its output (on CUDA: cuBLASLt's)
    moved = plain_ops["aten::gelu"] - fused_ops.get("aten::gelu", 0)
    assert moved == 2 * 2 * REQUEST["num_inference_steps"]  # both streams' MLPs, 2 blocks, one forward a step
    assert fused_ops["aten::gelu_"] == moved and "aten::gelu_" not in plain_ops
    assert (fused - plain).abs().max() < 1e-4


@pytest.mark.slow
def test_fused_norms_give_the_plain_and_diffusers_output_in_bf16():
    """q/k RMSNorm + RoPE (diffusers' RMSNorm: two roundings, which the kernel makes too) and the
    blocks' LayerNorm + modulation (per token with zero_cond_t), run in Triton's interpreter."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "sgdiff.testing.qwen_kernel_checks"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # per block q and k (2) and four modulations, then the output's; 12 norms and 2 modulations marked, txt_norm
    assert "Qwen-Image, 14 modules marked, 4 + 9 + 0 kernel calls: identical output" in done.stdout, done.stdout
    assert "Qwen-Image zero_cond_t, 14 modules marked, 4 + 9 + 0 kernel calls: identical output" in done.stdout


def tiny_edit_model() -> tuple[QwenImageTransformer, dict]:
    """TINY_EDIT (zero_cond_t) with random weights, and an Edit-style input of three grids."""
    model = randomize_weights(QwenImageTransformer(QwenImageTransformerConfig(**TINY_EDIT)), seed=1)
    return model, edit_inputs(2, [(1, 4, 6), (1, 5, 3), (1, 2, 2)], 9)


def test_every_toggle_taken_off_again_gives_the_plain_output_exactly():
    """Each toggle's choice is an attribute of the layers (speed/fuse.py); with every one set back to its
    default the model runs its plain path, bit for bit (the fused projections' weights are views of one
    matrix then, of the same values)."""
    model, inputs = tiny_edit_model()
    speed = SpeedConfig(fused_projections=True, fused_gelu=True, fused_norms=True)
    with torch.no_grad():
        plain = model(**inputs)
        speed_up_transformer(model, speed, FAMILY)
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
        modulations = [m for m in model.modules() if isinstance(m, LayerNormModulation)]
        assert sum(linear.fused is not None for linear in linears) == 2 * 2  # q/k/v of both streams, 2 blocks
        assert sum(linear.gelu_epilogue for linear in linears) == 2 * 2
        assert all(norm.rope_kernel for norm in norms) and len(modulations) == 2 * 2 + 1
        assert all(m.norm_kernel for m in modulations)
        toggled = model(**inputs)  # (float32 on the CPU: the kernels do not run)
        for linear in linears:
            linear.fused, linear.gelu_epilogue = None, False
        for norm in norms:
            norm.rope_kernel = False
        for modulation in modulations:
            modulation.norm_kernel = False
        restored = model(**inputs)
    assert (toggled - plain).abs().max() < 1e-4
    assert torch.equal(restored, plain)


def test_torch_compile_compiles_the_block_kind_once(tiny_qwen):
    torch._dynamo.reset()
    engine = ModelRunner(str(tiny_qwen), runtime=RuntimeConfig(device="cpu", dtype="fp32"))
    engine.load()
    reference = engine.generate(engine.sampling_params("a red cube", **REQUEST)).latents
    model = engine.pipeline.transformers[0]
    blocks = list(model.transformer_blocks)
    assert compile_blocks(model, backend="eager") == len(blocks) == 2
    assert all(hasattr(block.forward, "_torchdynamo_orig_callable") for block in blocks)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = engine.generate(engine.sampling_params("a red cube", **REQUEST)).latents
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1  # one graph serves both blocks
    assert (compiled - reference).abs().max() < 1e-5


def test_torch_compile_toggle_reaches_the_blocks(tiny_qwen):
    engine = ModelRunner(str(tiny_qwen), runtime=RuntimeConfig(device="cpu", speed=SpeedConfig(torch_compile=True)))
    engine.load()
    model = engine.pipeline.transformers[0]
    assert all(isinstance(block.forward, PrecompiledForward) for block in model.transformer_blocks)


def test_cuda_graph_captures_each_branch_once_and_replays_it(tiny_qwen):
    """The transformer's forward as speed/cuda_graph.py wraps it (a CPU stand-in for the capture): the
    prompt's and the negative prompt's forwards (text lengths 3 and 1) are two signatures, each captured
    once and replayed at every later step, with the plain path's latents."""
    engine = ModelRunner(str(tiny_qwen), runtime=RuntimeConfig(device="cpu", dtype="fp32"))
    engine.load()
    flags = dict(CFG, num_inference_steps=3)
    plain = engine.generate(engine.sampling_params("a red cube", **flags)).latents
    model, capture = engine.pipeline.transformers[0], CountingCapture()
    model.forward = CudaGraphForward(model.forward, capture=capture)
    with torch.inference_mode():
        graphed = engine.generate(engine.sampling_params("a red cube", **flags)).latents
    assert capture.captures == 2
    assert torch.equal(graphed, plain)

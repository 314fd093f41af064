"""sgdiff's UniPC (and Wan's Euler) against diffusers' schedulers, bit for bit, and the choice between them."""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from sgdiff.families.wan.pipeline import WanSchedule
from sgdiff.families.wan.unipc import FIXED_OPTIONS, UNUSED_OPTIONS, UniPCConfig, UniPCSampler
from sgdiff.models.repo_configs import WAN_SCHEDULER_CONFIG
from sgdiff.pipeline.schedule import (
    FlowMatchEulerSampler,
    FlowMatchSchedule,
    SchedulerSampler,
    flow_match_grid,
    flow_match_sigmas,
    flow_match_spaced_sigmas,
)

CPU = torch.device("cpu")
SHAPE = (2, 4, 3, 5, 6)  # [B, C, F, H, W] latents


def diffusers_sampler(config: dict, steps: int) -> SchedulerSampler:
    scheduler = getattr(sys.modules["diffusers"], config.get("_class_name", "UniPCMultistepScheduler"))
    return SchedulerSampler(scheduler.from_config(config), steps, CPU)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN where the other has NaN (bh1 ends in NaN at sigma 0, in diffusers too)."""
    return a.dtype == b.dtype and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0), b.nan_to_num(0))


def run_both(config: dict, steps: int, dtype: torch.dtype, seed: int = 0, keep_at: int | None = None, rows=None):
    """Both samplers over `steps` random model outputs of `dtype` (float32 latents, as Wan's): the sample after
    each step, ours and diffusers'. `keep_at`: after that step, go on with `rows` only."""
    ours, theirs = UniPCSampler(UniPCConfig.from_dict(config), steps, CPU), diffusers_sampler(config, steps)
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.scheduler.sigmas)
    generator = torch.Generator().manual_seed(seed)
    x = y = torch.randn(SHAPE, generator=generator)
    pairs, kept = [], torch.arange(SHAPE[0])
    for i in range(steps):
        velocity = torch.randn(SHAPE, generator=generator).to(dtype)[kept]  # the same draws, cut or not
        x, y = ours.step(velocity, i, x), theirs.step(velocity, i, y)
        pairs.append((x, y))
        if i == keep_at:
            ours.keep_rows(rows, x.shape[0])
            theirs.keep_rows(rows, y.shape[0])
            x, y, kept = x[rows], y[rows], rows
    return pairs


@pytest.mark.parametrize("shift", [3.0, 5.0, 12.0])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 10, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wan_unipc_matches_diffusers_bit_for_bit(shift, steps, dtype):
    for x, y in run_both({**WAN_SCHEDULER_CONFIG, "flow_shift": shift}, steps, dtype):
        assert x.dtype == torch.float32 and torch.equal(x, y)


VARIANTS = [
    {"solver_type": "bh1"},
    {"solver_order": 1},
    {"solver_order": 3},
    {"solver_order": 3, "solver_type": "bh1"},
    {"lower_order_final": False},
    {"disable_corrector": [0, 2]},
    {"final_sigmas_type": "sigma_min"},
    {"num_train_timesteps": 500, "flow_shift": 8},
    {"timestep_spacing": "trailing", "steps_offset": 1},
]


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("steps", [1, 2, 3, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_other_unipc_options_match_diffusers(options, steps, dtype):
    for x, y in run_both({**WAN_SCHEDULER_CONFIG, "flow_shift": 5.0, **options}, steps, dtype, seed=1):
        assert same(x, y)


def test_a_bfloat16_sample_stays_bfloat16_as_in_diffusers():
    config = {**WAN_SCHEDULER_CONFIG, "flow_shift": 3.0}
    ours, theirs = UniPCSampler(UniPCConfig.from_dict(config), 5, CPU), diffusers_sampler(config, 5)
    generator = torch.Generator().manual_seed(2)
    x = y = torch.randn(SHAPE, generator=generator).bfloat16()
    for i in range(5):
        velocity = torch.randn(SHAPE, generator=generator).bfloat16()
        x, y = ours.step(velocity, i, x), theirs.step(velocity, i, y)
        assert x.dtype == torch.bfloat16 and torch.equal(x, y)


@pytest.mark.parametrize("keep_at", [0, 1, 5])
def test_keep_rows_mid_loop_equals_the_kept_rows_alone(keep_at):
    config = {**WAN_SCHEDULER_CONFIG, "flow_shift": 5.0}
    rows = torch.tensor([1])
    cut = run_both(config, 8, torch.bfloat16, keep_at=keep_at, rows=rows)
    assert all(torch.equal(x, y) for x, y in cut)  # diffusers' scheduler cut alike

    # the same loop for row 1 alone, from the start: the same draws
    ours = UniPCSampler(UniPCConfig.from_dict(config), 8, CPU)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE, generator=generator)[rows]
    for i in range(8):
        x = ours.step(torch.randn(SHAPE, generator=generator).to(torch.bfloat16)[rows], i, x)
        assert torch.equal(x, cut[i][0] if i > keep_at else cut[i][0][rows])


def test_the_configs_of_wan_checkpoints_are_ours(tiny_wan):
    saved = json.loads((tiny_wan("t2v") / "scheduler" / "scheduler_config.json").read_text())  # all diffusers' keys
    for config in (WAN_SCHEDULER_CONFIG, saved, {**saved, "flow_shift": 12}):
        assert UniPCConfig.from_dict(config) is not None
    schedule = WanSchedule.from_dict(saved)
    assert isinstance(schedule.sampler(None, 4, CPU), UniPCSampler)
    sampler = schedule.sampler(7.0, 4, CPU)
    assert isinstance(sampler, UniPCSampler) and sampler.config.flow_shift == 7.0
    without = {k: v for k, v in WAN_SCHEDULER_CONFIG.items() if k != "prediction_type"}
    assert UniPCConfig.from_dict(without) is None  # diffusers' default, "epsilon", is not ours


@pytest.mark.parametrize(
    "options",
    [
        {"prediction_type": "epsilon"},
        {"prediction_type": None},
        {"use_flow_sigmas": False},
        {"thresholding": True},
        {"use_karras_sigmas": True},
        {"use_dynamic_shifting": True},
        {"shift_terminal": 0.1},
        {"predict_x0": False},
        {"solver_type": "midpoint"},
        {"final_sigmas_type": "other"},
        {"solver_order": 0},
        {"disable_corrector": None},
    ],
)
def test_other_configs_stay_with_diffusers(options):
    config = {**WAN_SCHEDULER_CONFIG, **options}
    assert UniPCConfig.from_dict(config) is None
    if options == {"thresholding": True}:  # one that diffusers runs: a request gets its scheduler
        sampler = WanSchedule.from_dict(config).sampler(3.0, 4, CPU)
        assert isinstance(sampler.scheduler, UniPCMultistepScheduler) and sampler.scheduler.config.flow_shift == 3.0


def test_every_diffusers_unipc_option_is_decided():
    """A diffusers option ours neither follows, fixes nor knows to be unused would be ignored silently."""
    options = set(inspect.signature(UniPCMultistepScheduler.__init__).parameters) - {"self"}
    fields = set(UniPCConfig.__dataclass_fields__)
    assert options == fields | set(FIXED_OPTIONS) | set(UNUSED_OPTIONS)


EULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0, 12.0])
@pytest.mark.parametrize("steps", [1, 2, 4, 50])
def test_wan_euler_schedule_and_steps_match_diffusers(shift, steps):
    schedule = WanSchedule.from_dict(EULER_CONFIG)
    ours, theirs = schedule.sampler(shift, steps, CPU), diffusers_sampler({**EULER_CONFIG, "shift": shift}, steps)
    assert isinstance(ours, FlowMatchEulerSampler)
    assert torch.equal(ours.sigmas, theirs.scheduler.sigmas) and torch.equal(ours.timesteps, theirs.timesteps)
    generator = torch.Generator().manual_seed(3)
    x = y = torch.randn(SHAPE, generator=generator)
    for i in range(steps):
        velocity = torch.randn(SHAPE, generator=generator).to(torch.bfloat16)
        x, y = ours.step(velocity, i, x), theirs.step(velocity, i, y)
        assert x.dtype == torch.bfloat16 and torch.equal(x, y)  # diffusers returns the velocity's dtype too


def test_wan_euler_spacing_is_not_fluxs_and_unsupported_euler_options_stay_with_diffusers():
    schedule = FlowMatchSchedule(shift=5.0)
    assert not torch.equal(flow_match_spaced_sigmas(10, schedule), flow_match_sigmas(10, 0, schedule))
    sampler = WanSchedule.from_dict({**EULER_CONFIG, "stochastic_sampling": True}).sampler(None, 4, CPU)
    assert isinstance(sampler.scheduler, FlowMatchEulerDiscreteScheduler)
    with pytest.raises(ValueError, match="`mu` must be passed"):  # diffusers' own answer, as before
        WanSchedule.from_dict({**EULER_CONFIG, "use_dynamic_shifting": True}).sampler(None, 4, CPU)


@pytest.mark.parametrize("shift", [1.0, 3.0, 8.0])
def test_dmd_grid_matches_diffusers(shift):
    grid = FlowMatchEulerDiscreteScheduler(shift=shift)
    ours = flow_match_grid(FlowMatchSchedule(shift=shift))
    assert torch.equal(ours, grid.sigmas) and torch.equal(ours * 1000, grid.timesteps)


def diffusers_schedulers(schedule: WanSchedule, flow_shift, num_steps: int, device) -> SchedulerSampler:
    """WanSchedule.sampler as it was before sgdiff had its own: always diffusers' scheduler."""
    return SchedulerSampler(schedule.library_scheduler(schedule.with_shift(flow_shift)), num_steps, device)


def test_whole_wan_runs_give_the_latents_of_diffusers_schedulers(tiny_wan, tmp_path, monkeypatch):
    """sgdiff's pipeline end to end with its own samplers, then with diffusers' (forced): the same latents."""
    from sgdiff.engine.runner import ModelRunner
    from sgdiff.families.wan import pipeline

    made, make = [], pipeline.make_sampler
    monkeypatch.setattr(
        pipeline, "make_sampler", lambda state, schedule: made.append(make(state, schedule)) or made[-1]
    )
    euler_model = tmp_path / "euler"
    shutil.copytree(tiny_wan("t2v"), euler_model)
    (euler_model / "scheduler" / "scheduler_config.json").write_text(json.dumps(EULER_CONFIG))
    request = dict(height=32, width=32, num_frames=5, num_inference_steps=4, guidance_scale=4.0,
                   num_outputs_per_prompt=2, seed=1)  # fmt: skip
    for model, own in ((tiny_wan("t2v"), UniPCSampler), (euler_model, FlowMatchEulerSampler)):
        runner = ModelRunner(str(model))
        runner.load()
        params = runner.sampling_params("a cube", **request)
        ours = runner.generate(params).latents
        with monkeypatch.context() as patch:
            patch.setattr(pipeline.WanSchedule, "sampler", diffusers_schedulers)
            theirs = runner.generate(params).latents
        assert isinstance(made[-2], own) and isinstance(made[-1], SchedulerSampler)
        assert ours.shape[0] == 2 and torch.equal(ours, theirs)


NO_DIFFUSERS = """
import json, sys
from sgdiff.engine.runner import ModelRunner

for model, preset in [(sys.argv[1], None), (sys.argv[1], "fastwan2.1-t2v-1.3b"), (sys.argv[2], None)]:
    runner = ModelRunner(model, preset=preset)
    runner.load()
    runner.generate(runner.sampling_params("a cube", height=32, width=32, num_frames=5, num_inference_steps=3))
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "diffusers")))
"""


def test_wan_requests_import_no_diffusers(tiny_wan, tmp_path):
    """UniPC, FastWan's DMD and a Euler-scheduled checkpoint: none imports diffusers (~1 s)."""
    euler_model = tmp_path / "euler"
    shutil.copytree(tiny_wan("t2v"), euler_model)
    (euler_model / "scheduler" / "scheduler_config.json").write_text(json.dumps(EULER_CONFIG))
    done = subprocess.run([sys.executable, "-c", NO_DIFFUSERS, str(tiny_wan("t2v")), str(euler_model)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []

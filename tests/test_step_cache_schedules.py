"""--cache magcache and taylorseer (sgdiff/speed/step_cache/schedules.py): each computes and skips the steps its
published rule says (a plain reference of the rule, here), taylorseer's forecast is the Taylor expansion worked
out by hand, each CFG branch and each request keeps its own state, threshold 0 and interval 1 are the uncached
output exactly, N CPU processes skip what one process skips, and a family without magnitude ratios refuses
magcache. (fbcache and teacache: test_step_cache.py, which also holds the flags' one-line errors.)"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS, nearest_interp
from torch import nn
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.config import ParallelConfig, RuntimeConfig, SpeedConfig
from sgdiff.engine.runner import ModelRunner
from sgdiff.errors import UserError
from sgdiff.families.flux.family import MAGCACHE_FLUX
from sgdiff.families.wan.family import WanFamily
from sgdiff.families.wan.magcache import T2V_1_3B_COND, T2V_1_3B_UNCOND, T2V_14B_COND, T2V_14B_UNCOND
from sgdiff.models.wan import WanTransformer, WanTransformerConfig
from sgdiff.pipeline.denoise_step import DenoiseStep, denoise_step
from sgdiff.pipeline.family import CachePlan, ModelFamily
from sgdiff.speed.apply import resolve_speed
from sgdiff.speed.step_cache import apply_step_cache, step_cache_of
from sgdiff.speed.step_cache.schedules import nearest_ratios
from sgdiff.testing.distributed import run_on_ranks
from sgdiff.testing.step_cache import cached_latents_each

CPU = torch.device("cpu")


# ---- the published rules, written plainly --------------------------------------------------------------


def magcache_reference(ratios, steps: int, threshold: float, warmup: int | None = None, k: int = 3) -> list[int]:
    """MagCache (diffusers' MagCacheHeadHook; MagCache4Wan2.1 per CFG branch, with K = 2): from the retention
    step on, each step multiplies the accumulated ratio by its ratio, counts itself and adds |1 - accumulated
    ratio| to the error; it is skipped when a residual exists, the error <= threshold and the count <= K
    (FLUX: 3), otherwise computed with the three sums reset. sgdiff's own: the last step is computed, and
    threshold 0 never skips."""
    table = nearest_interp(torch.tensor(ratios, dtype=torch.float64), steps).tolist()
    retention = int(0.2 * steps + 0.5) if warmup is None else warmup
    skipped, ratio, count, error, residual = [], 1.0, 0, 0.0, False
    for i in range(steps):
        if retention <= i < steps - 1:
            ratio, count = ratio * table[i], count + 1
            error += abs(1.0 - ratio)
            if residual and error <= threshold and count <= k and threshold > 0:
                skipped.append(i)
                continue
        ratio, count, error, residual = 1.0, 0, 0.0, True
    return skipped


def taylorseer_reference(steps: int, warmup: int, interval: int) -> list[int]:
    """TaylorSeer (diffusers' TaylorSeerCacheHook): the steps before disable_cache_before_step (the warm-up)
    are computed, then those with (step - warm-up - 1) % interval == 0; the others are forecast. sgdiff's
    own: the last step is computed."""
    return [i for i in range(warmup, steps - 1) if (i - warmup - 1) % interval != 0]


# ---- a toy transformer: two-stream blocks, the streams joined, then one-stream blocks, as FLUX runs ------


class Pair(nn.Module):
    def __init__(self, runs: list):
        super().__init__()
        self.runs = runs

    def forward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.runs.append(self)
        return x + torch.tanh(x) * (1 + t), y + 0.5 * torch.sin(y) * t


class Single(nn.Module):
    def __init__(self, runs: list):
        super().__init__()
        self.runs = runs

    def forward(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.runs.append(self)
        return h + torch.cos(h) * t


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.runs: list = []  # the blocks run, in order
        self.pairs = nn.ModuleList([Pair(self.runs), Pair(self.runs)])
        self.singles = nn.ModuleList([Single(self.runs), Single(self.runs)])

    def forward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        for block in self.pairs:
            x, y = block(x, y, t)
        h = torch.cat([y, x], dim=1)  # [B, Sy + Sx, D]
        for block in self.singles:
            h = block(h, t)
        return h[:, y.shape[1] :]


class ToyFamily(ModelFamily):
    name = "toy"
    ratios: tuple[float, ...] | None = MAGCACHE_FLUX
    ratios_uncond: tuple[float, ...] | None = None
    max_skips = 3

    def cache_plan(self, model: nn.Module) -> CachePlan:
        return CachePlan([list(model.pairs), list(model.singles)], magnitude_ratios=self.ratios,
                         magnitude_ratios_uncond=self.ratios_uncond, magcache_max_skips=self.max_skips)  # fmt: skip


def step_inputs(i: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step i's (x [1, 4, 3], y [1, 2, 3], t): latents that move from step to step, as a sampler's do."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(1, 4, 3, generator=g), torch.randn(1, 2, 3, generator=g)
    return x * (1 + 0.1 * i), y - 0.05 * i, torch.tensor(0.1 * (i + 1))


def drive(speed: SpeedConfig, steps: int, branches: dict[str, int] | None = None, model: Toy | None = None,
          family: ModelFamily | None = None):  # fmt: skip
    """Run the toy through `steps` steps, the branches (name -> the seed of its inputs) interleaved as CFG
    runs them; returns the skipped steps per branch, each (step, branch)'s output and the toy."""
    model = model or Toy()
    if step_cache_of(model) is None:
        apply_step_cache(model, resolve_speed(speed, CPU, torch.float32), family or ToyFamily())
    record: dict[str, list[int]] = {}
    outputs = {}
    for i in range(steps):
        for branch, seed in (branches or {"cond": 0}).items():
            with denoise_step(DenoiseStep(i, steps, branch, record)):
                outputs[i, branch] = model(*step_inputs(i, seed))
    return record, outputs, model


# the toy's parts, run plainly: what a computed step stores, what a skipped one adds


def run_pairs(model: Toy, x, y, t) -> tuple[torch.Tensor, torch.Tensor]:
    for block in model.pairs:
        x, y = block(x, y, t)
    return x, y


def joined(streams: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = streams
    return torch.cat([y, x], dim=1)


def run_singles(model: Toy, h, t) -> torch.Tensor:
    for block in model.singles:
        h = block(h, t)
    return h


def run_tail(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return h[:, y.shape[1] :]


def plain_output(model: Toy, i: int) -> torch.Tensor:
    x, y, t = step_inputs(i)
    return run_tail(run_singles(model, joined(run_pairs(model, x, y, t)), t), y)


def residuals(model: Toy, i: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each range's residual at computed step i: the two-stream blocks' (x, y), the one-stream blocks'."""
    x, y, t = step_inputs(i, seed)
    out = run_pairs(model, x, y, t)
    h = joined(out)
    return out[0] - x, out[1] - y, run_singles(model, h, t) - h


# ---- MagCache ----------------------------------------------------------------------------------------------


def test_the_flux_ratios_and_their_interpolation_are_diffusers():
    assert torch.equal(torch.tensor(MAGCACHE_FLUX, dtype=torch.float32), FLUX_MAG_RATIOS)
    for steps in range(1, 80):
        reference = nearest_interp(torch.tensor(MAGCACHE_FLUX, dtype=torch.float64), steps).tolist()
        assert nearest_ratios(MAGCACHE_FLUX, steps) == reference, steps


@pytest.mark.parametrize("steps", [2, 3, 8, 20, 28, 50])
@pytest.mark.parametrize("threshold", [0.01, 0.06, 0.12, 0.5])
@pytest.mark.parametrize("warmup", [None, 1, 4])
def test_magcache_skips_what_its_rule_skips(steps, threshold, warmup):
    record, outputs, model = drive(SpeedConfig(cache="magcache", cache_threshold=threshold, cache_warmup_steps=warmup),
                                   steps)  # fmt: skip
    assert record.get("cond", []) == magcache_reference(MAGCACHE_FLUX, steps, threshold, warmup)
    # every block is skipped (none kept), and a skipped step runs none of them
    assert len(model.runs) == 4 * (steps - len(record.get("cond", [])))


def test_magcache_default_skips_of_28_steps():
    # retention int(0.2 * 28 + 0.5) = 6: steps 0-5 computed; step 6 skipped (error 0.031), step 7 computed
    # (1.031 * 1.039: error 0.103); near the middle the ratios stand at ~1.0 and K = 3 skips in a row is
    # the limit (10-12, 14-16, 18-20); at the end they fall, 0.96 and 0.93, and the error passes 0.06 sooner
    record, _, _ = drive(SpeedConfig(cache="magcache"), 28)
    assert record["cond"] == magcache_reference(MAGCACHE_FLUX, 28, 0.06) == [6, 8, 10, 11, 12, 14, 15, 16, 18, 19,
                                                                            20, 22, 23, 25]  # fmt: skip


def test_magcache_reuses_the_last_computed_residual():
    record, outputs, _ = drive(SpeedConfig(cache="magcache", cache_threshold=0.06), 8)
    assert record == {"cond": [2, 4, 5, 6]}  # ratios 1.02344; 1.01562 (error 0.063: computed); 1.00781, 1.0, 0.98828
    plain = Toy()
    for i in (0, 1, 3, 7):
        torch.testing.assert_close(outputs[i, "cond"], plain_output(plain, i))
    for i, last in ((2, 1), (4, 3), (5, 3), (6, 3)):  # this step's input + the last computed step's residuals
        x, y, _ = step_inputs(i)
        rx, ry, rh = residuals(plain, last)
        torch.testing.assert_close(outputs[i, "cond"], run_tail(joined((x + rx, y + ry)) + rh, y))


def test_magcache_threshold_zero_never_skips_even_where_the_ratios_stand_at_one():
    # all ratios 1.0: the accumulated error stays 0, which diffusers' `error <= threshold` would skip at 0
    family = ToyFamily()
    family.ratios = (1.0,) * 10
    record, _, _ = drive(SpeedConfig(cache="magcache", cache_threshold=0.0), 10, family=family)
    assert record == {} and magcache_reference(family.ratios, 10, 0.0) == []
    record, _, _ = drive(SpeedConfig(cache="magcache", cache_threshold=0.01), 10, family=family)
    assert record == {"cond": [2, 3, 4, 6, 7, 8]}  # K = 3 skips in a row at most


def test_a_family_without_magnitude_ratios_refuses_magcache():
    family = ToyFamily()
    family.ratios = None
    with pytest.raises(UserError, match=r"magcache is not available for toy models \(no calibrated magnitude"):
        drive(SpeedConfig(cache="magcache"), 3, family=family)
    with torch.device("meta"):
        wan = WanTransformer(WanTransformerConfig(num_layers=2, num_attention_heads=2, ffn_dim=64))  # (no ratios)
    with pytest.raises(UserError) as error:
        apply_step_cache(wan, resolve_speed(SpeedConfig(cache="magcache"), CPU, torch.float32), WanFamily())
    assert str(error.value) == ("cache magcache is not available for wan models (no calibrated magnitude ratios): "
                                "use fbcache, teacache or taylorseer")  # fmt: skip


def wan_plan(shares_steps: bool = False, **config) -> CachePlan:
    """The Wan family's CachePlan for a transformer of `config`'s architecture (built on the meta device)."""
    with torch.device("meta"):
        model = WanTransformer(WanTransformerConfig(**config))
    model.shares_steps = shares_steps
    return WanFamily().cache_plan(model)


def test_wan_t2v_gets_each_branchs_calibrated_ratios_and_k_2():
    small = wan_plan(num_layers=30, num_attention_heads=12, ffn_dim=8960)  # Wan2.1-T2V-1.3B
    large = wan_plan()  # Wan2.1-T2V-14B (the config's defaults)
    for plan, cond, uncond in [(small, T2V_1_3B_COND, T2V_1_3B_UNCOND), (large, T2V_14B_COND, T2V_14B_UNCOND)]:
        assert plan.magnitude_ratios == cond and plan.magnitude_ratios_uncond == uncond
        assert len(cond) == len(uncond) == 50 and cond[0] == uncond[0] == 1.0 and plan.magcache_max_skips == 2
    # the calibration's first, middle and last steps, as published (interleaved prompt, negative, prompt, ...)
    assert (small.magnitude_ratios[1:3], small.magnitude_ratios_uncond[1:3]) == ((1.0124, 1.00166), (1.02213, 1.0041))
    assert (large.magnitude_ratios[-1], large.magnitude_ratios_uncond[-1]) == (0.86111, 0.86189)
    # other weights of these architectures get none: an A14B expert, image to video
    assert wan_plan(shares_steps=True).magnitude_ratios is None
    assert wan_plan(image_dim=1280, added_kv_proj_dim=5120).magnitude_ratios is None


def test_each_cfg_branch_follows_its_own_ratios():
    """Wan's two branches were calibrated apart: with K = 2, each skips what the rule skips on its own ratios."""
    family = ToyFamily()
    family.ratios, family.ratios_uncond, family.max_skips = T2V_1_3B_COND, T2V_14B_UNCOND, 2
    record, _, _ = drive(SpeedConfig(cache="magcache", cache_threshold=0.06), 50, {"cond": 0, "uncond": 1},
                         family=family)  # fmt: skip
    assert record["cond"] == magcache_reference(T2V_1_3B_COND, 50, 0.06, k=2)
    assert record["uncond"] == magcache_reference(T2V_14B_UNCOND, 50, 0.06, k=2)
    assert record["cond"] != record["uncond"] and len(record["cond"]) > 15


# ---- TaylorSeer --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2, 5, 8, 28])
@pytest.mark.parametrize("warmup", [1, 3, 6])
@pytest.mark.parametrize("interval", [1, 2, 3, 5])
def test_taylorseer_forecasts_the_steps_of_its_schedule(steps, warmup, interval):
    speed = SpeedConfig(cache="taylorseer", cache_warmup_steps=warmup, cache_interval=interval)
    record, _, model = drive(speed, steps)
    assert record.get("cond", []) == taylorseer_reference(steps, warmup, interval)
    assert len(model.runs) == 4 * (steps - len(record.get("cond", [])))


def test_taylorseer_defaults_are_diffusers():
    record, _, _ = drive(SpeedConfig(cache="taylorseer"), 28)  # warm-up 3, interval 5
    assert record["cond"] == taylorseer_reference(28, 3, 5) == [3, 5, 6, 7, 8, 10, 11, 12, 13, 15, 16, 17, 18, 20,
                                                                21, 22, 23, 25, 26]  # fmt: skip


def test_taylorseer_forecast_is_the_taylor_expansion_by_hand():
    # warm-up 1, interval 3, 8 steps: computed 0, 2, 5, 7; step 1 has only order 0 (one computed step)
    speed = SpeedConfig(cache="taylorseer", cache_warmup_steps=1, cache_interval=3)
    record, outputs, _ = drive(speed, 8)
    assert record == {"cond": [1, 3, 4, 6]}
    plain = Toy()
    for i in (0, 2, 5, 7):  # computed: the uncached output
        torch.testing.assert_close(outputs[i, "cond"], plain_output(plain, i))
    for i, last, before in ((1, 0, None), (3, 2, 0), (4, 2, 0), (6, 5, 2)):
        now = residuals(plain, last)
        if before is None:  # order 0: the residual as it was
            forecast = now
        else:  # order 0 + order 1 * offset: the change per step between the two computed steps
            old = residuals(plain, before)
            forecast = tuple(r + (r - o) / (last - before) * (i - last) for r, o in zip(now, old, strict=True))
        x, y, _ = step_inputs(i)
        expected = run_tail(joined((x + forecast[0], y + forecast[1])) + forecast[2], y)
        torch.testing.assert_close(outputs[i, "cond"], expected, rtol=1e-6, atol=1e-6)


def test_taylorseer_keeps_its_factors_in_float32():
    model = Toy().to(torch.bfloat16)
    speed = SpeedConfig(cache="taylorseer", cache_warmup_steps=2, cache_interval=4)
    apply_step_cache(model, resolve_speed(speed, CPU, torch.bfloat16), ToyFamily())
    record: dict[str, list[int]] = {}
    for i in range(4):
        with denoise_step(DenoiseStep(i, 4, "cond", record)):
            out = model(*(a.to(torch.bfloat16) for a in step_inputs(i)))
    assert record == {"cond": [2]} and out.dtype == torch.bfloat16
    cache = step_cache_of(model)
    assert cache is not None
    (branch,) = cache.branches.values()
    assert all(f.dtype == torch.float32 for kept in branch.residuals.values() for fs in kept.factors for f in fs)


# ---- both: per branch, per request ---------------------------------------------------------------------------

SCHEDULED = {
    "magcache": SpeedConfig(cache="magcache", cache_threshold=0.1),
    "taylorseer": SpeedConfig(cache="taylorseer", cache_warmup_steps=1, cache_interval=3),
}


@pytest.mark.parametrize("method", SCHEDULED)
def test_each_cfg_branch_keeps_its_own_state(method):
    # the branches interleaved as CFG calls them give what each gives alone: neither forecasts nor reuses the
    # other's residuals
    record, outputs, _ = drive(SCHEDULED[method], 10, {"cond": 0, "uncond": 1})
    for branch, seed in (("cond", 0), ("uncond", 1)):
        alone, alone_outputs, _ = drive(SCHEDULED[method], 10, {branch: seed})
        assert record[branch] == alone[branch] and alone[branch]
        for i in range(10):
            assert torch.equal(outputs[i, branch], alone_outputs[i, branch])


@pytest.mark.parametrize("method", SCHEDULED)
def test_a_new_request_starts_afresh(method):
    first, first_outputs, model = drive(SCHEDULED[method], 10)
    again, again_outputs, _ = drive(SCHEDULED[method], 10, model=model)
    assert first == again and all(torch.equal(first_outputs[k], again_outputs[k]) for k in first_outputs)
    cache = step_cache_of(model)
    assert cache is not None and cache.report()["skipped_forwards"] == 2 * len(first["cond"])
    assert model(*step_inputs(3)).equal(Toy()(*step_inputs(3)))  # outside a loop: every block runs


# ---- the real model --------------------------------------------------------------------------------------


def generate(model, speed: SpeedConfig, **request):
    engine = ModelRunner(str(model), runtime=RuntimeConfig(device="cpu", dtype="fp32", speed=speed))
    result = engine.generate(engine.sampling_params("a red cube", **request))
    return result.latents, result.skipped_steps


FLUX_REQUEST = dict(height=32, width=32, num_inference_steps=8)


@pytest.fixture(scope="module")
def uncached(tiny_flux_dev):
    return generate(tiny_flux_dev, SpeedConfig(), **FLUX_REQUEST)[0]


@pytest.mark.parametrize("speed", [SpeedConfig(cache="magcache", cache_threshold=0.0),
                                   SpeedConfig(cache="taylorseer", cache_interval=1, cache_warmup_steps=1)],
                         ids=["magcache-threshold-0", "taylorseer-interval-1"])  # fmt: skip
def test_lossless_settings_are_the_uncached_output_exactly(tiny_flux_dev, uncached, speed):
    latents, skipped = generate(tiny_flux_dev, speed, **FLUX_REQUEST)
    assert skipped == {} and torch.equal(latents, uncached)


# the defaults on 8 steps: magcache 0.06 (warm-up 2), taylorseer warm-up 3, interval 5
DEFAULT_SKIPS = {"magcache": magcache_reference(MAGCACHE_FLUX, 8, 0.06), "taylorseer": taylorseer_reference(8, 3, 5)}


@pytest.mark.parametrize("method", DEFAULT_SKIPS)
def test_the_defaults_skip_steps_and_stay_close(tiny_flux_dev, uncached, method):
    latents, skipped = generate(tiny_flux_dev, SpeedConfig(cache=method), **FLUX_REQUEST)
    error = ((latents - uncached).abs().max() / uncached.abs().max()).item()
    print(f"{method}: skipped {skipped}, relative max error {error:.4f}")
    assert (
        skipped
        == {"cond": DEFAULT_SKIPS[method]}
        == {"cond": {"magcache": [2, 4, 5, 6], "taylorseer": [3, 5, 6]}[method]}
    )
    assert not torch.equal(latents, uncached) and error < 0.1


@pytest.mark.slow
def test_processes_skip_what_one_process_skips(tiny_flux_dev):
    # ulysses 2: each rank reuses or forecasts its shard of the tokens, on the same steps (a schedule: nothing
    # to agree on); 32x80: 160 image tokens, even over 2 ranks. Both methods in one start of the ranks.
    request = dict(height=32, width=80, num_inference_steps=8)
    speeds = list(SCHEDULED.values())
    ranks = run_on_ranks(ParallelConfig(2), cached_latents_each, str(tiny_flux_dev), speeds, "a red cube", request)
    for speed, (rank0, rank1) in zip(speeds, zip(*ranks, strict=True), strict=True):
        alone, alone_skipped = generate(tiny_flux_dev, speed, **request)
        assert alone_skipped.get("cond") and rank0[1] == rank1[1] == alone_skipped
        assert (rank0[0] - alone).abs().max() < 1e-4


def test_the_cli_runs_taylorseer_and_reports_its_forecasts(tiny_flux_dev, tmp_path):
    dump = tmp_path / "perf.json"
    args = ["generate", "--model-path", str(tiny_flux_dev), "--prompt", "a red cube", "--device", "cpu",
            "--height", "32", "--width", "32", "--steps", "8", "--cache", "taylorseer", "--cache-interval", "2",
            "--cache-warmup-steps", "2", "--output-path", str(tmp_path), "--perf-dump-path", str(dump)]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(dump.read_text())
    skipped = report["requests"][0]["skipped_steps"]["cond"]
    assert skipped == taylorseer_reference(8, 2, 2) == [2, 4, 6]
    assert f"{len(skipped)} branch-step(s) skipped by --cache" in " ".join(result.output.split())
    (cache,) = report["speed"]["step_cache"]
    assert (report["speed"]["cache_interval"], cache["interval"], cache["threshold"]) == (2, 2, None)
    assert cache["skipped_forwards"] == 3 and cache["blocks_per_skip"] == 4  # 2 + 2 blocks, none kept


@pytest.mark.parametrize(("variant", "shares"), [("t2v", False), ("t2v-a14b", True)])
def test_the_a14b_experts_are_loaded_as_sharing_the_steps(tiny_wan, variant, shares):
    """Wan2.2 A14B's experts have Wan2.1-14B's architecture but other weights and only their share of the steps:
    the loader marks them so that the 14B's MagCache ratios are not offered for them."""
    runner = ModelRunner(str(tiny_wan(variant)), runtime=RuntimeConfig(device="cpu", dtype="fp32"))
    runner.load()
    assert [model.shares_steps for model in runner.pipeline.transformers] == [shares] * (2 if shares else 1)

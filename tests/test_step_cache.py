"""--cache (sgdiff/speed/step_cache/), its methods that read a signal (fbcache, teacache; magcache and taylorseer:
test_step_cache_schedules.py): each method skips the steps its published rule skips (a plain reference
of the rule, here, over signals the test controls), threshold 0 changes nothing, each CFG branch keeps its own
cache, N CPU processes skip what one process skips, and bad flags end as one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.cli.options import CacheChoice
from sgdiff.config import (
    CACHE_METHODS,
    RECOMMENDED_CACHE,
    ParallelConfig,
    RuntimeConfig,
    SpeedConfig,
    load_preset,
    select_preset,
    with_recommended_cache,
)
from sgdiff.engine.runner import ModelRunner
from sgdiff.errors import UserError
from sgdiff.pipeline.denoise_step import DenoiseStep, denoise_step
from sgdiff.pipeline.family import CachePlan, ModelFamily
from sgdiff.speed.apply import resolve_speed
from sgdiff.speed.step_cache import apply_step_cache
from sgdiff.testing.distributed import run_on_ranks
from sgdiff.testing.step_cache import cached_latents

runner = CliRunner()
CPU = torch.device("cpu")


# ---- the published rules, written plainly, over one branch's signals -------------------------------------


def rel_l1(now: torch.Tensor, before: torch.Tensor) -> float:
    return ((now - before).abs().mean() / before.abs().mean()).item()


def fbcache_reference(signals: list[torch.Tensor], threshold: float, warmup: int) -> list[int]:
    """First Block Cache: skip the remaining blocks while the first block's residual changed (relative L1)
    less than the threshold since the last computed step."""
    skipped, last_computed = [], None
    for i, residual in enumerate(signals):
        forced = i < warmup or i == len(signals) - 1 or last_computed is None
        if not forced and rel_l1(residual, last_computed) < threshold:
            skipped.append(i)
        else:
            last_computed = residual
    return skipped


def teacache_reference(signals: list[torch.Tensor], threshold: float, warmup: int, rescale=None) -> list[int]:
    """TeaCache: accumulate the rescaled relative L1 change of the modulated input between consecutive steps;
    skip while the sum is below the threshold, start it again at 0 on a computed step."""
    poly = (
        (lambda x: x)
        if rescale is None
        else (lambda x: sum(c * x ** (len(rescale) - 1 - k) for k, c in enumerate(rescale)))
    )
    skipped, previous, accumulated = [], None, 0.0
    for i, signal in enumerate(signals):
        if i < warmup or i == len(signals) - 1 or previous is None:
            accumulated = 0.0
        else:
            accumulated += poly(rel_l1(signal, previous))
            if accumulated < threshold:
                skipped.append(i)
            else:
                accumulated = 0.0
        previous = signal
    return skipped


REFERENCES = {"fbcache": fbcache_reference, "teacache": teacache_reference}
SIGNAL_METHODS = tuple(REFERENCES)  # the methods that read a signal (the scheduled ones: test_step_cache_schedules.py)


# ---- a model whose first block's residual (and TeaCache signal) the test scripts --------------------------


class Scripted(nn.Module):
    def __init__(self):
        super().__init__()
        self.residual = torch.zeros(1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x + self.residual


class Work(nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 1.5 * x + torch.sin(x) + t


class Fake(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Scripted(), Work(), Work()])
        self.runs = 0  # Work blocks run

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, t)
        return x


class FakeFamily(ModelFamily):
    name = "fake"

    def cache_plan(self, model: nn.Module) -> CachePlan:
        return CachePlan([list(model.blocks)], modulated_input=lambda block, args: block.residual)


def drive(method: str, threshold: float, warmup: int, signals: dict[str, list[torch.Tensor]]):
    """Run the fake model through len(signals) steps per branch, the branches interleaved as CFG runs them;
    returns the skipped steps per branch and each (step, branch)'s output."""
    model = Fake()
    speed = resolve_speed(SpeedConfig(cache=method, cache_threshold=threshold, cache_warmup_steps=warmup), CPU,
                          torch.float32)  # fmt: skip
    apply_step_cache(model, speed, FakeFamily())
    x = torch.linspace(-1, 1, 12).reshape(1, 3, 4)
    record: dict[str, list[int]] = {}
    outputs = {}
    total = len(next(iter(signals.values())))
    for i in range(total):
        for branch, sequence in signals.items():
            model.blocks[0].residual = sequence[i]
            with denoise_step(DenoiseStep(i, total, branch, record)):
                outputs[i, branch] = model(x, torch.tensor(0.1 * i))
    return record, outputs, x


def scaled(scales: list[float], seed: int = 0) -> list[torch.Tensor]:
    base = torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(seed))
    return [base * s for s in scales]


def random_walk(steps: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, out = torch.randn(1, 3, 4, generator=g), []
    for _ in range(steps):
        x = x + 0.15 * torch.rand(()).item() * torch.randn(1, 3, 4, generator=g)
        out.append(x.clone())
    return out


def test_fbcache_skips_what_its_rule_skips_and_reuses_the_last_residual():
    signals = scaled([1, 1.01, 1.03, 1.2, 1.21, 1.22, 2.0, 2.0])
    record, outputs, x = drive("fbcache", 0.05, 1, {"cond": signals})
    assert record == {"cond": fbcache_reference(signals, 0.05, 1)} == {"cond": [1, 2, 4, 5]}

    # a skipped step: its first block's output + the residual the other blocks added at the last computed step
    def computed(i):
        h = x + signals[i]
        for _ in range(2):
            h = 1.5 * h + torch.sin(h) + 0.1 * i
        return h

    torch.testing.assert_close(outputs[0, "cond"], computed(0))
    for i, last in ((1, 0), (2, 0), (4, 3), (5, 3)):
        torch.testing.assert_close(outputs[i, "cond"], x + signals[i] + computed(last) - (x + signals[last]))
    for i in (3, 6, 7):
        torch.testing.assert_close(outputs[i, "cond"], computed(i))


def test_teacache_skips_what_its_rule_skips():
    signals = scaled([1, 1.02, 1.04, 1.06, 1.3, 1.31, 1.32, 1.33, 1.34, 1.35])
    record, _, _ = drive("teacache", 0.05, 1, {"cond": signals})
    # changes 0.02, 0.0196, 0.0192: the sum passes 0.05 at step 3 (computed, the sum back to 0); 0.226 at
    # step 4 (computed); then ~0.0077 a step, 0.0380 by step 8; the last step is always computed
    assert record == {"cond": teacache_reference(signals, 0.05, 1)} == {"cond": [1, 2, 5, 6, 7, 8]}


@pytest.mark.parametrize("method", SIGNAL_METHODS)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("threshold", [0.05, 0.1, 0.3])
@pytest.mark.parametrize("warmup", [1, 3])
def test_each_method_follows_its_reference_on_random_signals(method, seed, threshold, warmup):
    signals = random_walk(12, seed)
    record, _, _ = drive(method, threshold, warmup, {"cond": signals})
    assert record.get("cond", []) == REFERENCES[method](signals, threshold, warmup)


@pytest.mark.parametrize("method", SIGNAL_METHODS)
def test_threshold_zero_never_skips(method):
    record, outputs, _ = drive(method, 0.0, 1, {"cond": scaled([1.0] * 6)})
    assert record == {}


@pytest.mark.parametrize("method", SIGNAL_METHODS)
def test_each_cfg_branch_has_its_own_cache(method):
    # the prompt branch's signal stands still, the negative branch's jumps every step: interleaved as CFG
    # calls them, one shared state would compare the branches with each other and skip nothing
    still = scaled([1.0] * 6)
    jumping = scaled([1.0, 3.0, 1.0, 3.0, 1.0, 3.0], seed=1)
    record, _, _ = drive(method, 0.1, 1, {"cond": still, "uncond": jumping})
    assert record == {"cond": REFERENCES[method](still, 0.1, 1)} == {"cond": [1, 2, 3, 4]}


def test_a_new_request_starts_afresh_and_calls_outside_a_loop_run_every_block():
    model = Fake()
    speed = resolve_speed(SpeedConfig(cache="fbcache", cache_threshold=0.5), CPU, torch.float32)
    cache = apply_step_cache(model, speed, FakeFamily())
    x = torch.ones(1, 3, 4)
    model.blocks[0].residual = torch.ones(1, 3, 4)
    for request in range(2):
        record: dict = {}
        for i in range(3):
            with denoise_step(DenoiseStep(i, 3, "cond", record)):
                model(x, torch.tensor(0.0))
        assert record == {"cond": [1]}, request  # step 0 of the second request compared with nothing
    plain = Fake()
    plain.blocks[0].residual = torch.ones(1, 3, 4)
    assert model(x, torch.tensor(0.0)).equal(plain(x, torch.tensor(0.0)))  # no loop: every block runs
    assert cache.report()["skipped_forwards"] == 2 and cache.report()["blocks_per_skip"] == 2


# ---- the real models -------------------------------------------------------------------------------------


def generate(model, speed: SpeedConfig, **request):
    engine = ModelRunner(str(model), runtime=RuntimeConfig(device="cpu", dtype="fp32", speed=speed))
    result = engine.generate(engine.sampling_params("a red cube", **request))
    return result.latents, result.skipped_steps


FLUX_REQUEST = dict(height=32, width=32, num_inference_steps=8)
WAN_REQUEST = dict(height=48, width=48, num_frames=5, num_inference_steps=8)


@pytest.fixture(scope="module")
def models(tiny_flux_dev, tiny_wan):
    return {"flux": (tiny_flux_dev, FLUX_REQUEST), "wan": (tiny_wan("t2v"), WAN_REQUEST)}


@pytest.fixture(scope="module")
def uncached(models):
    return {name: generate(path, SpeedConfig(), **request)[0] for name, (path, request) in models.items()}


@pytest.mark.parametrize("model", ["flux", "wan"])
@pytest.mark.parametrize("method", SIGNAL_METHODS)
def test_threshold_zero_is_the_uncached_output_exactly(models, uncached, model, method):
    path, request = models[model]
    latents, skipped = generate(path, SpeedConfig(cache=method, cache_threshold=0.0), **request)
    assert skipped == {} and torch.equal(latents, uncached[model])


# thresholds that skip some steps of the tiny random models (8 steps); the latents stay close
SKIPPING = {"fbcache": 0.3, "teacache": 1.0}


@pytest.mark.parametrize("model", ["flux", "wan"])
@pytest.mark.parametrize("method", SIGNAL_METHODS)
def test_a_threshold_skips_steps_and_stays_close(models, uncached, model, method):
    path, request = models[model]
    latents, skipped = generate(path, SpeedConfig(cache=method, cache_threshold=SKIPPING[method]), **request)
    reference = uncached[model]
    error = ((latents - reference).abs().max() / reference.abs().max()).item()
    print(f"{model} {method} {SKIPPING[method]}: skipped {skipped}, relative max error {error:.4f}")
    assert len(skipped["cond"]) > 0 and 0 not in skipped["cond"] and 7 not in skipped["cond"]
    assert not torch.equal(latents, reference) and error < 0.1


def test_cfg_branches_decide_on_their_own_in_the_real_model(tiny_flux_dev):
    speed = SpeedConfig(cache="fbcache", cache_threshold=0.3)
    _, skipped = generate(tiny_flux_dev, speed, **FLUX_REQUEST, negative_prompt="blurry", true_cfg_scale=3.0)
    assert set(skipped) == {"cond", "uncond"} and skipped["cond"] != skipped["uncond"]


@pytest.mark.slow
@pytest.mark.parametrize("method", SIGNAL_METHODS)
@pytest.mark.parametrize("config", [ParallelConfig(2), ParallelConfig(2, enable_cfg_parallel=True)],
                         ids=["ulysses-2", "cfg-2"])  # fmt: skip
def test_processes_skip_what_one_process_skips(tiny_flux_dev, method, config):
    # 32x80: 160 image tokens, even over 2 ranks (padding tokens would enter the agreed sums)
    request = dict(height=32, width=80, num_inference_steps=8, negative_prompt="blurry", true_cfg_scale=3.0)
    speed = SpeedConfig(cache=method, cache_threshold=SKIPPING[method])
    alone, alone_skipped = generate(tiny_flux_dev, speed, **request)
    ranks = run_on_ranks(config, cached_latents, str(tiny_flux_dev), speed, "a red cube", request)
    assert alone_skipped.get("cond") and alone_skipped.get("uncond")
    if config.enable_cfg_parallel:  # each rank runs one branch with its own cache
        assert ranks[0][1] == {"cond": alone_skipped["cond"]} and ranks[1][1] == {"uncond": alone_skipped["uncond"]}
    else:
        assert ranks[0][1] == ranks[1][1] == alone_skipped
    assert (ranks[0][0] - alone).abs().max() < 1e-4


# ---- the flags -------------------------------------------------------------------------------------------


def test_cache_choices_match_the_library():
    assert tuple(c.value for c in CacheChoice) == ("none", RECOMMENDED_CACHE, *CACHE_METHODS)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cache-threshold", "0.1"], "error: --cache-threshold tunes a step cache: give --cache too"),
        (["--cache-warmup-steps", "2"], "error: --cache-warmup-steps tunes a step cache: give --cache too"),
        (["--cache", "fbcache", "--cache-threshold", "-1"], "error: --cache-threshold must be a finite number >= 0"),
        (["--cache", "teacache", "--cache-warmup-steps", "0"], "error: --cache-warmup-steps must be an integer >= 1"),
        (["--cache", "fbcache", "--enable-cuda-graph"], "error: --cache decides on the host"),
        (["--cache", "taylorseer", "--enable-cuda-graph"], "error: --cache decides on the host"),
        (["--cache-interval", "2"], "error: --cache-interval sets taylorseer's schedule: give --cache taylorseer"),
        (["--cache", "magcache", "--cache-interval", "2"], "error: --cache-interval sets taylorseer's schedule"),
        (["--cache", "taylorseer", "--cache-interval", "0"], "error: --cache-interval must be an integer >= 1"),
        (
            ["--cache", "taylorseer", "--cache-threshold", "0.1"],
            "error: --cache-threshold has no meaning for taylorseer, which follows a schedule: set --cache-interval",
        ),
        (["--cache", "magcache", "--cache-threshold", "nan"], "error: --cache-threshold must be a finite number >= 0"),
        (
            ["--cache", "recommended", "--cache-threshold", "0.1"],
            "error: --cache recommended takes the whole of the model's preset's setting, --cache-threshold included: "
            "to tune it, give the method by name",
        ),
        (["--cache", "recommended", "--enable-cuda-graph"], "error: --cache decides on the host"),
    ],
)
def test_bad_cache_flags_end_as_one_line(tiny_flux_dev, tmp_path, flags, message):
    args = ["generate", "--model-path", str(tiny_flux_dev), "--prompt", "p", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--output-path", str(tmp_path / "out"), *flags])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith(message), result.output
    assert not (tmp_path / "out").exists()


def test_the_cli_reports_skipped_steps(tiny_flux_dev, tmp_path):
    dump = tmp_path / "perf.json"
    args = ["generate", "--model-path", str(tiny_flux_dev), "--prompt", "a red cube", "--device", "cpu",
            "--height", "32", "--width", "32", "--steps", "8", "--cache", "fbcache", "--cache-threshold", "0.3",
            "--output-path", str(tmp_path), "--perf-dump-path", str(dump)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(dump.read_text())
    skipped = report["requests"][0]["skipped_steps"]["cond"]
    assert skipped and f"{len(skipped)} branch-step(s) skipped by --cache" in " ".join(result.output.split())
    (cache,) = report["speed"]["step_cache"]
    assert report["speed"]["cache"] == "fbcache" and report["speed"]["cache_threshold"] == 0.3
    assert cache["skipped_forwards"] == len(skipped) and cache["blocks_per_skip"] == 3  # 2 + 2 blocks, less the first


def test_recommended_cache_is_the_presets(tiny_flux_dev, tiny_flux_schnell, tmp_path):
    """--cache recommended runs the model's preset's [cache] (flux.1-dev: MagCache at 0.06): the image and the perf
    dump are those of --cache magcache --cache-threshold 0.06; a model whose preset recommends none is refused."""
    args = ["generate", "--prompt", "a red cube", "--device", "cpu", "--height", "32", "--width", "32", "--steps",
            "8", "--seed", "3", "-q"]  # fmt: skip
    images, reports = [], []
    for name, flags in [("recommended", ["--cache", "recommended"]),
                        ("named", ["--cache", "magcache", "--cache-threshold", "0.06"])]:  # fmt: skip
        dump = tmp_path / f"{name}.json"
        result = runner.invoke(app, [*args, "--model-path", str(tiny_flux_dev), *flags, "--output-path",
                                     str(tmp_path / name), "--perf-dump-path", str(dump)])  # fmt: skip
        assert result.exit_code == 0, result.output
        images.append(np.asarray(Image.open(result.stdout.split()[0])))
        reports.append(json.loads(dump.read_text())["speed"])
    assert np.array_equal(images[0], images[1])
    assert reports[0] == reports[1] and reports[0]["cache"] == "magcache" and reports[0]["cache_threshold"] == 0.06
    assert reports[0]["step_cache"][0]["skipped_forwards"] > 0
    refused = runner.invoke(app, [*args, "--model-path", str(tiny_flux_schnell), "--cache", "recommended",
                                  "--output-path", str(tmp_path / "schnell")])  # fmt: skip
    assert refused.exit_code == 2 and refused.output == (
        "error: --cache recommended: the preset flux.1-schnell recommends no step cache (none measured on it yet): "
        "give one of fbcache, teacache, magcache, taylorseer by name, or leave --cache out\n"
    )
    assert not (tmp_path / "schnell").exists()


def test_a_presets_cache_table_is_checked_and_layered(tmp_path):
    """A preset's [cache] is checked as --cache's flags are; a user's .toml preset without one keeps the model's own
    recommendation, one with its own replaces it whole."""
    own = load_preset("flux.1-dev")
    assert with_recommended_cache(SpeedConfig(cache="recommended"), own) == SpeedConfig(
        cache="magcache", cache_threshold=0.06
    )
    mine = tmp_path / "mine.toml"
    mine.write_text("[sampling]\nnum_inference_steps = 20\n")
    assert select_preset(str(mine), "/local", "FluxPipeline", {"guidance_embeds": True}).cache == own.cache
    mine.write_text('[cache]\nmethod = "taylorseer"\ninterval = 3\n')
    layered = select_preset(str(mine), "/local", "FluxPipeline", {"guidance_embeds": True})
    assert with_recommended_cache(SpeedConfig(cache="recommended"), layered) == SpeedConfig(
        cache="taylorseer", cache_interval=3
    )
    for table, message in [
        ('method = "fastcache"', "[cache] method must be one of fbcache, teacache, magcache, taylorseer, "
                                 "not 'fastcache'"),
        ('method = "fbcache"\nthreshold = -1', "[cache] threshold must be a finite number >= 0, got -1"),
        ('method = "taylorseer"\nthreshold = 0.1', "[cache] threshold has no meaning for taylorseer, which follows a "
                                                   "schedule: set interval instead"),
        ('method = "fbcache"\nspeed = 2', "[cache] has no key 'speed' (it takes method, threshold, warmup_steps, "
                                          "interval)"),
    ]:  # fmt: skip
        mine.write_text(f"[cache]\n{table}\n")
        with pytest.raises(UserError) as caught:
            load_preset(str(mine))
        assert str(caught.value) == f"preset {mine}: {message}"

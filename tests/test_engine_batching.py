"""Dynamic request batching: requests that can share a forward pass and arrive within the delay run as
one batch, each with its own prompt, negative prompt, seed, progress and result, and the pixels it
gets when run alone; requests that cannot share one (the model family decides) run apart; cancelling
a member ends it alone, cancelling every member stops the batch after the step in hand."""

from __future__ import annotations

import time

import numpy as np
import pytest

from sgdiff.config import BatchingConfig, ParallelConfig, RuntimeConfig
from sgdiff.engine.handle import RequestStatus
from sgdiff.engine.service import Engine
from sgdiff.errors import RequestCancelled, UserError
from sgdiff.pipeline.registry import family_named

CPU = RuntimeConfig(device="cpu", dtype="fp32")
TOLERANCE = 2  # of 255: fp32 rounding of batched matrix products (seen: 0 or 1)
SMALL = dict(height=32, width=32, num_inference_steps=3)
DEMO_PROMPTS = [
    "a red circle on a blue background",
    "a small white triangle on the right on a blue background",
    "a green square on a black background",
    "a yellow circle on the left on a white background",
]


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def alone(engine: Engine, params):
    """The request through the single-request path (batching off), in the caller's thread."""
    result = engine.runner.generate(params)
    assert result.batch_size == 1
    return result


def outputs(result) -> np.ndarray:
    return result.images if result.images is not None else result.videos


def assert_as_alone(engine: Engine, params_list, results, batch_sizes: list[int]) -> None:
    assert [result.batch_size for result in results] == batch_sizes
    for params, result in zip(params_list, results, strict=True):
        assert result.params == params
        difference = max_difference(outputs(result), outputs(alone(engine, params)))
        assert difference <= TOLERANCE, f"{params.prompt!r}: {difference}/255 off the request run alone"


@pytest.fixture(scope="module")
def demo_engine():
    with Engine("sgdiff/demo-image", runtime=CPU, batching=BatchingConfig(4, 200)) as engine:
        engine.start()
        yield engine


@pytest.fixture(scope="module")
def flux_engine(tiny_flux_dev):
    with Engine(str(tiny_flux_dev), runtime=CPU, batching=BatchingConfig(4, 300)) as engine:
        engine.start()
        yield engine


def test_batching_config_is_checked():
    with pytest.raises(UserError, match="max_batch_size") as error:
        BatchingConfig(max_batch_size=0)
    assert error.value.field == "max_batch_size"
    with pytest.raises(UserError, match="batching_delay_ms") as error:
        BatchingConfig(delay_ms=-1)
    assert error.value.field == "batching_delay_ms"
    assert Engine("sgdiff/demo-image", runtime=CPU).config.batching == BatchingConfig(1, 0.0)


def test_the_dispatcher_groups_by_key_waits_for_the_delay_and_cancels_members_alone():
    """The front's side alone, with a fake executor: what it is sent, and what its handles say."""
    from sgdiff.engine.dispatch import Dispatcher
    from sgdiff.sampling import SamplingParams

    sent: list[tuple] = []
    dispatcher = Dispatcher(sent.append, batching=BatchingConfig(3, 100), batch_key=lambda params: params.height)
    a, b, c = (
        dispatcher.submit(SamplingParams(prompt, height=size)) for prompt, size in (("a", 32), ("b", 48), ("c", 32))
    )
    assert sent == [] and dispatcher.pending() == 3  # a batch of 2 < 3: the head waits for its delay
    deadline = time.monotonic() + 5
    while not sent and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sent == [("run", [(a.id, a.params, {}), (c.id, c.params, {})])]
    c.cancel()  # a goes on: c ends at once, and the executor is told
    assert c.status is RequestStatus.CANCELLED and sent[-1] == ("cancel", c.id) and dispatcher.pending() == 2
    dispatcher.put(("done", c.id, "ignored"))
    dispatcher.put(("done", a.id, "result a"))
    assert a.result() == "result a" and sent[-1] == ("run", [(b.id, b.params, {})])  # b's delay has passed
    b.cancel()  # the last member of its batch: it ends when the executor says so
    assert sent[-1] == ("cancel", b.id) and not b.done()
    dispatcher.put(("cancelled", b.id))
    assert b.status is RequestStatus.CANCELLED and dispatcher.pending() == 0


def test_a_batch_gives_each_request_its_own_pixels(demo_engine):
    params = [demo_engine.request(prompt, seed=seed) for seed, prompt in enumerate(DEMO_PROMPTS)]
    handles = [demo_engine.submit(p) for p in params]
    results = [handle.result(timeout=120) for handle in handles]
    assert_as_alone(demo_engine, params, results, [4, 4, 4, 4])
    total = params[0].num_inference_steps
    for handle in handles:  # every member sees every stage and step of the shared pass
        events = list(handle.events())
        assert [event.step for event in events if event.step] == [(i, total) for i in range(1, total + 1)]
        stages = [event.args[0] for event in events if event.kind == "stage_started"]
        assert stages == ["input_validation", "text_encoding", "timesteps", "latents", "denoising", "decoding"]
    # the prompts and seeds change the pictures far beyond the tolerance: the comparisons prove something
    assert max_difference(results[0].images, results[1].images) > 40
    assert max_difference(results[2].images, results[3].images) > 40


def test_true_cfg_with_negative_prompts_batched(flux_engine):
    fields = dict(SMALL, true_cfg_scale=4.0)
    params = [
        flux_engine.request("a red cube", negative_prompt="blurry", seed=1, **fields),
        flux_engine.request("a blue sphere", negative_prompt="a red cube", seed=2, **fields),
        flux_engine.request("a red cube", negative_prompt="dark and grainy", seed=1, **fields),
        flux_engine.request("a red cube", seed=1, **SMALL),  # no negative prompt, no true CFG: another batch
    ]
    handles = [flux_engine.submit(p) for p in params]
    results = [handle.result(timeout=120) for handle in handles]
    assert_as_alone(flux_engine, params, results, [3, 3, 3, 1])
    assert max_difference(results[0].images, results[2].images) > TOLERANCE  # the negative prompt is the row's own


def test_requests_that_differ_in_size_or_steps_run_apart(flux_engine):
    params = [
        flux_engine.request("a red cube", seed=1, **SMALL),
        flux_engine.request("a red cube", seed=1, **dict(SMALL, width=48)),
        flux_engine.request("a red cube", seed=1, **dict(SMALL, num_inference_steps=4)),
        flux_engine.request("a blue sphere", seed=4, **SMALL),  # joins the first, past the two queued before it
    ]
    handles = [flux_engine.submit(p) for p in params]
    results = [handle.result(timeout=120) for handle in handles]
    assert_as_alone(flux_engine, params, results, [2, 1, 1, 2])


def test_batches_are_at_most_max_batch_size(tiny_flux_dev):
    with Engine(str(tiny_flux_dev), runtime=CPU, batching=BatchingConfig(2, 300)) as engine:
        params = [engine.request(prompt, seed=seed, **SMALL) for seed, prompt in enumerate(["a", "b c", "d e f"])]
        handles = [engine.submit(p) for p in params]
        results = [handle.result(timeout=120) for handle in handles]
        assert_as_alone(engine, params, results, [2, 2, 1])


def test_a_lone_request_runs_after_the_delay_and_one_within_it_joins(flux_engine):
    lone = flux_engine.submit("a red cube", seed=3, **SMALL)
    assert lone.result(timeout=60).batch_size == 1
    first = flux_engine.submit("a red cube", seed=5, **SMALL)
    time.sleep(0.05)  # well within the 300 ms delay
    second = flux_engine.submit("a blue sphere", seed=6, **SMALL)
    assert [handle.result(timeout=60).batch_size for handle in (first, second)] == [2, 2]
    assert flux_engine.pending() == 0


def test_cancelling_one_member_leaves_the_others_running(flux_engine, step_gate):
    """It ends at once, and after the step in hand its rows leave the batch: the GPU does no more of it."""
    gate = step_gate(at=6)
    fields = dict(SMALL, num_inference_steps=8)
    prompts = ["a red cube", "a blue sphere", "a green cone"]
    params = [flux_engine.request(prompt, seed=seed, **fields) for seed, prompt in enumerate(prompts)]
    transformer = flux_engine.runner.pipeline.transformers[0]
    rows = []  # the rows of each forward
    hook = transformer.register_forward_pre_hook(gate)
    counting = transformer.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        handles = [flux_engine.submit(p) for p in params]
        assert gate.reached.wait(30)  # step 6 of the batch, held
        handles[1].cancel()
        assert handles[1].status is RequestStatus.CANCELLED  # at once: the others go on
        assert flux_engine.pending() == 2
        gate.released.set()
        results = [handles[i].result(timeout=60) for i in (0, 2)]
    finally:
        hook.remove()
        counting.remove()
    with pytest.raises(RequestCancelled):
        handles[1].result()
    assert [event.step[0] for event in handles[1].events() if event.step] == [1, 2, 3, 4, 5]
    assert rows == [3] * 6 + [2] * 2  # steps 7 and 8 without the cancelled member's row
    assert_as_alone(flux_engine, [params[0], params[2]], results, [3, 3])


def test_a_member_leaves_a_multistep_schedulers_batch_and_the_others_keep_their_pixels(tiny_wan, step_gate):
    """Wan's UniPC keeps state of each row across steps: a dropped member's rows leave it too."""
    with Engine(str(tiny_wan("t2v")), runtime=CPU, batching=BatchingConfig(3, 1000)) as engine:
        cfg = dict(VIDEO, num_inference_steps=5, guidance_scale=5.0)
        prompts = ["a red cube", "a blue sphere", "a green cone"]
        params = [engine.request(p, negative_prompt="blurry", seed=s, **cfg) for s, p in enumerate(prompts)]
        engine.start()
        gate = step_gate(at=5)  # step 3's prompt branch (CFG: two forwards a step)
        transformer = engine.runner.pipeline.transformers[0]
        rows = []
        hook = transformer.register_forward_pre_hook(gate)
        counting = transformer.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
        try:
            handles = [engine.submit(p) for p in params]
            assert gate.reached.wait(60)
            handles[0].cancel()
            gate.released.set()
            results = [handles[i].result(timeout=120) for i in (1, 2)]
        finally:
            hook.remove()
            counting.remove()
        assert handles[0].status is RequestStatus.CANCELLED
        assert rows == [3] * 6 + [2] * 4  # steps 4 and 5 (two forwards each) without its row
        assert_as_alone(engine, params[1:], results, [3, 3])


def test_cancelling_every_member_stops_the_batch_after_the_step_in_hand(flux_engine, step_gate):
    gate = step_gate(at=6)
    fields = dict(SMALL, num_inference_steps=20)
    hook = flux_engine.runner.pipeline.transformers[0].register_forward_pre_hook(gate)
    try:
        handles = [flux_engine.submit(prompt, seed=seed, **fields) for seed, prompt in enumerate(["a", "b"])]
        assert gate.reached.wait(30)
        for handle in handles:
            handle.cancel()
        assert handles[0].status is RequestStatus.CANCELLED  # the other still ran then
        gate.released.set()
        steps = [event.step[0] for event in handles[1].events() if event.step]
    finally:
        hook.remove()
    assert handles[1].status is RequestStatus.CANCELLED and steps == [1, 2, 3, 4, 5, 6]
    assert gate.calls == 6  # no step after the one in hand
    assert flux_engine.pending() == 0
    assert flux_engine.submit("a red cube", **SMALL).result(timeout=60).images.shape == (1, 32, 32, 3)


@pytest.mark.slow
def test_a_batch_on_a_two_process_pool_gives_the_pixels_of_one_request_alone(tiny_flux_dev, flux_engine):
    batching = BatchingConfig(3, 1000)
    with Engine(str(tiny_flux_dev), runtime=CPU, parallel=ParallelConfig(num_gpus=2), batching=batching) as pool:
        params = [
            pool.request("a red cube", seed=1, **SMALL),
            pool.request("a blue sphere on a table", seed=2, **SMALL),
            pool.request("a green cone", seed=3, **SMALL),
        ]
        results = [handle.result(timeout=120) for handle in [pool.submit(p) for p in params]]
        assert_as_alone(flux_engine, params, results, [3, 3, 3])
        # a member cancelled mid-batch leaves it on both ranks after the same step (rank 0's word)
        long = [pool.request(p.prompt, seed=p.seed, **dict(SMALL, num_inference_steps=60)) for p in params]
        handles = [pool.submit(p) for p in long]
        next(event for event in handles[1].events() if event.step)
        handles[1].cancel()
        results = [handles[i].result(timeout=120) for i in (0, 2)]
    assert handles[1].status is RequestStatus.CANCELLED
    assert_as_alone(flux_engine, [long[0], long[2]], results, [3, 3])


VIDEO = dict(height=32, width=32, num_frames=5, num_inference_steps=3)


def test_wan_text_to_video_batches_and_dmd_runs_alone(tiny_wan):
    with Engine(str(tiny_wan("t2v")), runtime=CPU, batching=BatchingConfig(4, 300)) as engine:
        cfg = dict(VIDEO, guidance_scale=5.0)
        params = [
            engine.request("a red cube", negative_prompt="blurry", seed=1, **cfg),
            engine.request("a blue sphere", negative_prompt="dark", seed=2, **cfg),
        ]
        dmd = dict(VIDEO, sampler="dmd", dmd_timesteps=[1000, 757, 522], guidance_scale=1.0)
        params += [engine.request("a red cube", seed=seed, **dmd) for seed in (3, 4)]
        results = [handle.result(timeout=120) for handle in [engine.submit(p) for p in params]]
        assert_as_alone(engine, params, results, [2, 2, 1, 1])
    assert max_difference(results[0].videos, results[1].videos) > TOLERANCE


def test_wan_requests_with_an_image_run_alone(tiny_wan, tmp_path):
    from PIL import Image

    y, x = np.mgrid[0:32, 0:32]
    Image.fromarray(np.stack([x * 7, y * 7, (x + y) * 3], axis=-1).astype(np.uint8)).save(tmp_path / "first.png")
    with Engine(str(tiny_wan("ti2v")), runtime=CPU, batching=BatchingConfig(4, 300)) as engine:
        image = dict(VIDEO, image_path=str(tmp_path / "first.png"))
        params = [engine.request("a red cube", seed=seed, **image) for seed in (1, 2)]
        params += [engine.request(prompt, seed=seed, **VIDEO) for seed, prompt in ((3, "a red cube"), (4, "a cone"))]
        handles = [engine.submit(p) for p in params]
        results = [handle.result(timeout=120) for handle in handles]
        assert_as_alone(engine, params, results, [1, 1, 2, 2])


def test_the_families_batch_keys():
    from sgdiff.families.flux.sampling import FluxSampling
    from sgdiff.families.wan.sampling import WanSampling

    flux = family_named("flux")
    plain = FluxSampling("a red cube", seed=1, true_cfg_scale=4.0, negative_prompt="blurry")
    assert flux.batch_key(plain) == flux.batch_key(FluxSampling("x", seed=9, true_cfg_scale=4.0, negative_prompt="y"))
    assert flux.batch_key(plain) != flux.batch_key(FluxSampling("a red cube", seed=1, true_cfg_scale=4.0))
    assert flux.batch_key(plain) != flux.batch_key(FluxSampling("a red cube", seed=1, height=512))
    wan = family_named("wan")
    assert wan.batch_key(WanSampling("a", fps=8)) == wan.batch_key(WanSampling("b", seed=3, fps=16))
    assert wan.batch_key(WanSampling("a", image_path="first.png")) is None
    assert wan.batch_key(WanSampling("a", sampler="dmd")) is None

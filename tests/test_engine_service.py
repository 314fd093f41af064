"""The engine as a long-lived service: one load, many requests from any thread, progress per step,
cancellation between steps, results as arrays; on several processes a pool that starts once, gives
the single process's pixels, and fails clearly when a worker dies."""

from __future__ import annotations

import threading
import time

import numpy as np
import psutil
import pytest

from sgdiff.config import ParallelConfig, RuntimeConfig
from sgdiff.engine.handle import RequestStatus
from sgdiff.engine.service import Engine
from sgdiff.errors import RequestCancelled, UserError, WorkerFailure

CPU = RuntimeConfig(device="cpu", dtype="fp32")
# different sizes and prompts, run back to back on one loaded model
REQUESTS = [
    ("a red cube", dict(height=32, width=48, num_inference_steps=3, seed=1)),
    ("a blue sphere on a table", dict(height=48, width=32, num_inference_steps=4, seed=2)),
    ("a red cube", dict(height=32, width=32, num_inference_steps=2, seed=3, num_outputs_per_prompt=2)),
]


@pytest.fixture(scope="module")
def local_engine(tiny_flux_dev):
    with Engine(str(tiny_flux_dev), runtime=CPU) as engine:
        engine.start()
        yield engine


@pytest.fixture(scope="module")
def pool_engine(tiny_flux_dev):
    with Engine(str(tiny_flux_dev), runtime=CPU, parallel=ParallelConfig(num_gpus=2)) as engine:
        engine.start()
        yield engine


@pytest.fixture(scope="module")
def single_images(local_engine):
    """Each request of REQUESTS run alone in this process."""
    return [local_engine.submit(prompt, **fields).result().images for prompt, fields in REQUESTS]


def assert_same_pixels(images: np.ndarray, expected: np.ndarray) -> None:
    """Equal up to the rounding of fp32 latents that several ranks sum in another order (<= 1e-4)."""
    assert images.shape == expected.shape
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1


def child_processes() -> set[int]:
    """This process's children but multiprocessing's resource tracker (it lives as long as we do)."""
    return {p.pid for p in psutil.Process().children() if "resource_tracker" not in " ".join(p.cmdline())}


def worker_processes(engine: Engine) -> list[psutil.Process]:
    return [psutil.Process(worker.pid) for worker in engine._executor.workers]


def test_results_are_arrays_and_progress_comes_step_by_step(local_engine):
    handle = local_engine.submit("a red cube", height=32, width=48, num_inference_steps=5, num_outputs_per_prompt=2)
    events = list(handle.events())
    result = handle.result()
    assert handle.status is RequestStatus.COMPLETED
    assert result.images.shape == (2, 32, 48, 3) and result.images.dtype == np.uint8 and result.videos is None
    assert [event.step for event in events if event.step] == [(i, 5) for i in range(1, 6)]
    assert handle.progress == (5, 5)
    stages = [event.args[0] for event in events if event.kind == "stage_started"]
    assert stages == ["input_validation", "text_encoding", "timesteps", "latents", "denoising", "decoding"]


def test_a_request_changes_the_output_far_beyond_the_tolerance(single_images):
    """Different prompts (requests 0 and 2 share a prompt, not a seed) give different pictures: the
    pixel comparisons below prove something."""
    first, second = single_images[0][0], single_images[2][0]
    assert np.abs(first[:32, :32].astype(int) - second.astype(int)).max() > 40


@pytest.mark.slow
def test_a_pool_serves_requests_in_a_row_without_restarting(pool_engine, single_images):
    before = [process.pid for process in worker_processes(pool_engine)]
    for _ in range(2):  # the same three requests twice: six in a row on one pool
        handles = [pool_engine.submit(prompt, **fields) for prompt, fields in REQUESTS]  # queued together
        for handle, expected in zip(handles, single_images, strict=True):
            assert_same_pixels(handle.result(timeout=120).images, expected)
    after = worker_processes(pool_engine)
    assert [process.pid for process in after] == before and all(process.is_running() for process in after)
    assert pool_engine.health() is None


def test_a_request_the_pool_cannot_finish_fails_alone(pool_engine, single_images):
    """A caller's error found while a request runs (here: latents overflowing at decode, on rank 0)
    fails that request with its message; the same workers serve the next one."""
    before = [process.pid for process in worker_processes(pool_engine)]
    handle = pool_engine.submit("p", height=32, width=32, num_inference_steps=2, guidance_scale=1e38)
    with pytest.raises(UserError, match="the denoised latents hold NaN or infinity"):
        handle.result(timeout=120)
    assert handle.status is RequestStatus.FAILED and pool_engine.health() is None
    prompt, fields = REQUESTS[0]
    assert_same_pixels(pool_engine.submit(prompt, **fields).result(timeout=120).images, single_images[0])
    assert [process.pid for process in worker_processes(pool_engine)] == before


def cancel_at_step(handle, step: int) -> list[int]:
    """Cancel `handle` once its step `step` has finished; returns the steps it reported."""
    steps = []
    for event in handle.events():
        if event.step:
            steps.append(event.step[0])
            if event.step[0] == step:
                handle.cancel()
    return steps


def test_cancel_stops_a_request_after_the_step_in_hand(local_engine, single_images, step_gate):
    gate = step_gate(at=6)
    hook = local_engine.runner.pipeline.transformers[0].register_forward_pre_hook(gate)
    try:
        handle = local_engine.submit("a red cube", height=32, width=32, num_inference_steps=20)
        assert gate.reached.wait(30)
        queued = local_engine.submit("a red cube", height=32, width=32, num_inference_steps=1)
        assert local_engine.pending() == 2 and queued.status is RequestStatus.QUEUED
        handle.cancel()  # during step 6 of 20
        gate.released.set()
        steps = [event.step[0] for event in handle.events() if event.step]
    finally:
        hook.remove()
    assert handle.status is RequestStatus.CANCELLED and steps == [1, 2, 3, 4, 5, 6]
    assert queued.result(timeout=60).images.shape == (1, 32, 32, 3) and local_engine.pending() == 0
    with pytest.raises(RequestCancelled):
        handle.result()
    prompt, fields = REQUESTS[0]
    assert np.array_equal(local_engine.submit(prompt, **fields).result(timeout=120).images, single_images[0])


def test_cancel_on_a_pool_stops_every_rank_and_the_next_request_runs(pool_engine, single_images):
    """The pool's ranks stop together after the step in hand: rank 0 decides, at every step, for all.
    (How far the workers got past the step the front saw is the events' travel time: a few steps at most.)"""
    handle = pool_engine.submit("a red cube", height=32, width=32, num_inference_steps=5000)
    steps = cancel_at_step(handle, 5)
    assert handle.status is RequestStatus.CANCELLED and 5 <= steps[-1] < 50, steps
    with pytest.raises(RequestCancelled):
        handle.result()
    prompt, fields = REQUESTS[0]
    assert_same_pixels(pool_engine.submit(prompt, **fields).result(timeout=120).images, single_images[0])


def test_a_queued_request_cancelled_never_runs(local_engine):
    first = local_engine.submit("a red cube", height=32, width=32, num_inference_steps=8)
    queued = local_engine.submit("a blue sphere", height=32, width=32, num_inference_steps=2)
    queued.cancel()
    assert queued.status is RequestStatus.CANCELLED and list(queued.events()) == []
    assert first.result(timeout=60).images.shape == (1, 32, 32, 3)


def test_requests_from_many_threads(local_engine, single_images):
    outputs: dict[int, np.ndarray] = {}

    def ask(index: int) -> None:
        prompt, fields = REQUESTS[index]
        outputs[index] = local_engine.submit(prompt, **fields).result(timeout=120).images

    threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(REQUESTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, expected in enumerate(single_images):
        assert np.array_equal(outputs[index], expected)


def test_a_bad_request_fails_in_the_callers_thread_and_the_engine_serves_on(local_engine):
    with pytest.raises(UserError, match="multiple of 16"):
        local_engine.submit("a red cube", height=33)
    with pytest.raises(UserError, match="colour"):
        local_engine.submit("a red cube", colour="red")
    assert local_engine.submit("a red cube", height=32, width=32, num_inference_steps=1).result().images is not None


@pytest.mark.slow
def test_a_killed_worker_fails_its_request_and_the_pool_says_so(tiny_flux_dev):
    children_before = child_processes()
    engine = Engine(str(tiny_flux_dev), runtime=CPU, parallel=ParallelConfig(num_gpus=2))
    try:
        engine.start()
        workers = worker_processes(engine)
        handle = engine.submit("a red cube", height=32, width=32, num_inference_steps=5000)
        queued = engine.submit("a red cube", height=32, width=32, num_inference_steps=2)
        next(event for event in handle.events() if event.step)  # mid-request (ends at once if it failed)
        workers[1].kill()
        killed_at = time.monotonic()
        with pytest.raises(WorkerFailure, match=r"^worker 1 was killed by SIGKILL; every worker was stopped$"):
            handle.result(timeout=30)
        assert time.monotonic() - killed_at < 10
        with pytest.raises(WorkerFailure, match="worker 1 was killed"):
            queued.result(timeout=5)
        assert "worker 1 was killed by SIGKILL" in engine.health()
        with pytest.raises(WorkerFailure, match="the engine cannot take requests: worker 1 was killed"):
            engine.submit("a red cube", height=32, width=32)
        psutil.wait_procs(workers, timeout=10)
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    finally:
        engine.close()
    assert child_processes() <= children_before  # no orphan


def test_from_pretrained_returns_pil_images_as_diffusers_does(tiny_flux_dev, single_images):
    from PIL import Image

    import sgdiff

    engine = sgdiff.Engine.from_pretrained(str(tiny_flux_dev), device="cpu", dtype="fp32")
    with engine:
        prompt, fields = REQUESTS[2]
        output = engine(prompt, **fields)
    assert all(isinstance(image, Image.Image) for image in output.images) and output.videos is None
    assert np.array_equal(np.stack([np.asarray(image) for image in output.images]), single_images[2])
    assert engine.health() == "the engine is closed"
    with pytest.raises(UserError, match="the engine is closed"):
        engine.submit("a red cube")


def test_a_video_model_gives_videos_of_pil_frames(tiny_wan):
    from PIL import Image

    with Engine.from_pretrained(str(tiny_wan("t2v")), device="cpu", dtype="fp32") as engine:
        output = engine("a red cube", height=32, width=32, num_frames=5, num_inference_steps=2, fps=8)
    assert output.images is None and len(output.videos) == 1 and len(output.videos[0]) == 5
    assert all(isinstance(frame, Image.Image) and frame.size == (32, 32) for frame in output.videos[0])
    frames = np.stack([np.asarray(frame) for frame in output.videos[0]])
    assert np.array_equal(frames, output.result.videos[0]) and output.result.fps == 8


def test_from_pretrained_refuses_an_unknown_option(tiny_flux_dev):
    with pytest.raises(UserError, match=r"unknown engine option\(s\) \['torch_compiler'\]"):
        Engine.from_pretrained(str(tiny_flux_dev), device="cpu", torch_compiler=True)

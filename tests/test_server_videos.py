"""Video jobs through the real `openai` client: created at once, progress rising step by step, a
playable MP4 equal to `sgdiff generate`'s, a cancel (DELETE) that stops the work within a step, and
jobs that survive `kill -9`: finished ones still listed and downloadable, the one that was running
failed with the reason, the queued one run after the restart."""

from __future__ import annotations

import time

import httpx
import imageio.v3 as iio
import numpy as np
import openai
import psutil
import pytest
from PIL import Image
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.testing.server import ServerProcess

MODEL = "sgdiff/demo-video"
QUICK = {"num_inference_steps": 6, "seed": 5}  # 64x64x9: well under a second
# the client warns that OpenAI's own video models are retired; the API is what sgdiff speaks
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")
LONG = {"num_inference_steps": 200, "num_frames": 17}  # 128x128x17: ~0.07 s a step on 2 cores


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("video-server")
    with ServerProcess(["--model-path", MODEL], folder / "state", folder / "log.txt") as running:
        yield running


def wait_for(client: openai.OpenAI, video_id: str, until, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        video = client.videos.retrieve(video_id)
        if until(video):
            return video
        time.sleep(0.02)
    raise AssertionError(f"video {video_id} never got there: {video}")


def frames_of(mp4: bytes) -> np.ndarray:
    return iio.imread(mp4, extension=".mp4")  # [T, H, W, 3]


@pytest.mark.slow
def test_a_video_job_reports_each_step_and_gives_generates_mp4(server, tmp_path):
    client = server.openai()
    video = client.videos.create(model=MODEL, prompt="a red ball rolls right", size="128x128",
                                 extra_body={"num_inference_steps": 30, "seed": 5})  # fmt: skip
    assert video.status in ("queued", "in_progress") and video.id.startswith("video_") and video.size == "128x128"
    seen = []
    while video.status in ("queued", "in_progress"):
        video = client.videos.retrieve(video.id)
        if video.status == "in_progress" and video.denoising_step is not None:
            seen.append((video.denoising_step, video.progress))
        time.sleep(0.01)
    assert video.status == "completed" and video.progress == 100 and video.error is None
    steps = sorted({step for step, _ in seen})
    assert len(steps) >= 5 and steps == [step for step, _ in sorted(set(seen))]  # rising, step by step
    assert all(0 <= progress <= 99 for _, progress in seen)
    assert [progress for _, progress in sorted(seen)] == sorted(progress for _, progress in seen)
    mp4 = client.videos.download_content(video.id).read()
    served = frames_of(mp4)
    assert served.shape == (9, 128, 128, 3)
    out = tmp_path / "local"
    result = CliRunner().invoke(app, ["generate", "--model-path", MODEL, "--prompt", "a red ball rolls right",
                                      "--height", "128", "--width", "128", "--steps", "30", "--seed", "5",
                                      "--device", "cpu", "--output-path", str(out), "--output-file-name", "v",
                                      "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert np.array_equal(served, frames_of((out / "v.mp4").read_bytes()))
    listed = client.videos.list()
    assert video.id in [item.id for item in listed.data]


def test_seconds_become_frames_at_the_models_fps(server):
    client = server.openai()
    video = client.videos.create(model=MODEL, prompt="a blue box", seconds="4", size="64x64",
                                 extra_body=QUICK)  # fmt: skip
    assert video.seconds == "4"
    video = wait_for(client, video.id, lambda v: v.status == "completed")
    assert frames_of(client.videos.download_content(video.id).read()).shape[0] == 4 * 8 + 1  # demo-video: 8 fps


def test_delete_cancels_a_running_job_within_a_step(server):
    client = server.openai()
    video = client.videos.create(model=MODEL, prompt="a green ball", size="128x128", extra_body=LONG)
    running = wait_for(client, video.id, lambda v: (v.denoising_step or 0) >= 2)
    client.videos.delete(video.id)
    cancelled = wait_for(client, video.id, lambda v: v.status == "cancelled", timeout=10)
    assert cancelled.progress < 50 and running.denoising_steps == 200
    health = httpx.get(f"{server.url}/health").json()
    assert health["queue_depth"] == 0  # the engine is free: nothing of the job is left running
    with pytest.raises(openai.BadRequestError):
        client.videos.download_content(video.id)
    after = client.videos.create(model=MODEL, prompt="a green ball", size="64x64", extra_body=QUICK)
    assert wait_for(client, after.id, lambda v: v.status in ("completed", "failed")).status == "completed"
    client.videos.delete(video.id)  # a finished (cancelled) job: now deleted
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


def test_delete_cancels_a_queued_job_before_it_runs(server):
    client = server.openai()
    first = client.videos.create(model=MODEL, prompt="a red ball", size="128x128", extra_body=LONG)
    queued = client.videos.create(model=MODEL, prompt="a blue ball", size="64x64", extra_body=QUICK)
    assert client.videos.retrieve(queued.id).status == "queued"
    client.videos.delete(queued.id)
    assert client.videos.retrieve(queued.id).status == "cancelled"
    client.videos.delete(first.id)
    assert wait_for(client, first.id, lambda v: v.status == "cancelled", timeout=10).denoising_step is None


def test_an_input_reference_is_checked(server, tmp_path):
    client = server.openai()
    with pytest.raises(openai.BadRequestError) as not_an_image:
        client.videos.create(model=MODEL, prompt="x", input_reference=("a.png", b"not an image", "image/png"))
    assert not_an_image.value.body["param"] == "input_reference"
    png = tmp_path / "red.png"
    Image.new("RGB", (64, 64), "red").save(png)
    with pytest.raises(openai.BadRequestError) as text_only:
        client.videos.create(model=MODEL, prompt="x", input_reference=png)
    assert text_only.value.body["param"] == "input_reference" and "text only" in text_only.value.body["message"]


@pytest.mark.slow
def test_jobs_survive_kill_9(tmp_path):
    state, log = tmp_path / "state", tmp_path / "log.txt"
    with ServerProcess(["--model-path", MODEL], state, log) as first:
        client = first.openai()
        done = client.videos.create(model=MODEL, prompt="a red ball", size="64x64", extra_body=QUICK)
        wait_for(client, done.id, lambda v: v.status == "completed")
        mp4 = client.videos.download_content(done.id).read()
        running = client.videos.create(model=MODEL, prompt="a blue ball", size="128x128", extra_body=LONG)
        queued = client.videos.create(model=MODEL, prompt="a green ball", size="64x64", extra_body=QUICK)
        wait_for(client, running.id, lambda v: (v.denoising_step or 0) >= 1)
        first.kill()
    with ServerProcess(["--model-path", MODEL], state, log) as second:
        client = second.openai()
        assert {v.id for v in client.videos.list().data} == {done.id, running.id, queued.id}
        assert client.videos.retrieve(done.id).status == "completed"
        assert client.videos.download_content(done.id).read() == mp4
        interrupted = client.videos.retrieve(running.id)
        assert interrupted.status == "failed" and "interrupted" in interrupted.error.message
        again = wait_for(client, queued.id, lambda v: v.status in ("completed", "failed"))
        assert again.status == "completed" and frames_of(client.videos.download_content(queued.id).read()).any()


@pytest.mark.slow
def test_image_to_video_takes_an_uploaded_first_frame(tiny_wan, tmp_path):
    """Multipart with `input_reference`: the video equals `sgdiff generate --image-path`'s, and
    another image gives another video."""
    model = str(tiny_wan("i2v"))
    y, x = np.mgrid[0:40, 0:48]
    first, other = tmp_path / "first.png", tmp_path / "other.png"
    Image.fromarray(np.stack([x * 5, y * 6, (x + y) * 3], axis=-1).astype(np.uint8)).save(first)
    Image.fromarray(np.stack([y * 6, (x + y) * 3, x * 5], axis=-1).astype(np.uint8)).save(other)
    fields = {"num_frames": 5, "num_inference_steps": 3, "seed": 4, "guidance_scale": 4.0, "negative_prompt": "blurry"}
    with ServerProcess(["--model-path", model], tmp_path / "state", tmp_path / "log.txt") as server:
        client = server.openai()
        videos = []
        for picture in (first, other):
            job = client.videos.create(model=model, prompt="a red cube", size="32x32", input_reference=picture,
                                       extra_body=fields)  # fmt: skip
            assert wait_for(client, job.id, lambda v: v.status in ("completed", "failed")).status == "completed"
            videos.append(frames_of(client.videos.download_content(job.id).read()))
        with pytest.raises(openai.BadRequestError) as missing:
            client.videos.create(model=model, prompt="a red cube", size="32x32", extra_body=fields)
        assert missing.value.body["param"] == "input_reference"
    args = ["generate", "--model-path", model, "--prompt", "a red cube", "--negative-prompt", "blurry", "--height",
            "32", "--width", "32", "--num-frames", "5", "--steps", "3", "--seed", "4", "--guidance-scale", "4.0",
            "--image-path", str(first), "--device", "cpu", "--output-path", str(tmp_path / "local"),
            "--output-file-name", "v", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert np.array_equal(videos[0], frames_of((tmp_path / "local" / "v.mp4").read_bytes()))
    assert np.abs(videos[0].astype(int) - videos[1].astype(int)).max() > 20


@pytest.mark.slow
def test_kill_9_leaves_no_worker_process(tiny_flux_dev, tmp_path):
    """A server over a pool of 2 worker processes: killed with SIGKILL, its workers end too."""
    args = ["--model-path", str(tiny_flux_dev), "--num-gpus", "2"]
    with ServerProcess(args, tmp_path / "state", tmp_path / "log.txt") as server:
        workers = psutil.Process(server.process.pid).children(recursive=True)
        workers = [w for w in workers if "resource_tracker" not in " ".join(w.cmdline())]
        assert len(workers) == 2
        request = {"prompt": "a red circle", "num_inference_steps": 2, "size": "32x32"}
        assert httpx.post(f"{server.url}/v1/images/generations", json=request, timeout=60).status_code == 200
        server.kill()
    _, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive

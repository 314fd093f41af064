"""The server's side of the engine, apart from HTTP: requests checked into the engine's fields (and
the server's limits), a bounded queue, image results encoded, video jobs run, tracked step by step
and kept on disk. Everything here runs on the server's event loop; the engine tells it of progress
through RequestHandle listeners, handed over with call_soon_threadsafe."""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sgdiff import __version__
from sgdiff.engine.handle import ProgressEvent, RequestHandle, RequestStatus
from sgdiff.engine.runner import GenerationResult
from sgdiff.engine.service import Engine
from sgdiff.errors import RequestCancelled, UserError, WorkerFailure
from sgdiff.io.image import png_bytes
from sgdiff.io.outputs import DEFAULT_FPS, output_metadata
from sgdiff.io.video import save_mp4
from sgdiff.sampling import SamplingParams
from sgdiff.server.errors import ApiError
from sgdiff.server.jobs import Job, JobStore, new_id
from sgdiff.server.metrics import ServerMetrics
from sgdiff.server.protocol import (
    Body,
    refuse_unsupported,
    sampling_fields,
    take_loras,
    take_model,
    take_prompt,
    take_size,
)

log = logging.getLogger("sgdiff.server")
IMAGE_ID_HEX = 32


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask for (400 beyond), and how many may wait (429 beyond)."""

    max_queue: int = 32  # requests accepted and not finished (queued or running)
    max_body_bytes: int = 32 * 2**20
    max_n: int = 8
    max_size: int = 2048  # pixels, each side
    max_frames: int = 257
    max_steps: int = 200


class ServerCore:
    def __init__(self, engine: Engine, state_dir: Path, limits: ServerLimits, model_id: str):
        self.engine = engine
        self.limits = limits
        self.model_id = model_id
        self.family = engine.runner.family
        self.store = JobStore(state_dir)
        self.images_dir = state_dir / "images"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = ServerMetrics(engine.pending, self._gpu_memory)
        self.live: dict[str, RequestHandle] = {}  # the video jobs queued or running, by id
        self.loop: asyncio.AbstractEventLoop | None = None
        self.recent_seconds = 0.0  # how long the last request took (Retry-After's estimate)
        self.about = {  # what each written PNG and MP4 records, as `sgdiff generate` writes it
            "model": model_id,
            "model_revision": engine.revision,
            "model_commit": engine.model_commit,
            "preset": engine.preset_name,
            "dtype": str(engine.runner.dtype).removeprefix("torch."),
            "sgdiff_version": __version__,
        }

    @property
    def output_kind(self) -> str:
        return self.engine.output_kind

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the server's loop, before it takes requests: jobs queued before a restart run again."""
        self.loop = loop
        for job in self.store.recover():
            try:
                params = self.engine.request(job.prompt, **job.request)
                self._run_job(job.id, params)
            except (UserError, WorkerFailure) as exc:
                self.store.update(job.id, "failed", error={"code": "invalid_request", "message": str(exc)})

    def close(self) -> None:
        self.store.close()

    # Requests into the engine's fields.

    def params(self, prompt: str, body: Body, rename: dict[str, str]) -> tuple[SamplingParams, dict[str, Any]]:
        """The request's other fields (what `take` left) checked by the engine and the server's limits:
        the engine's request, and its fields as given (what a job stores to run again). LoRA adapters: switched per
        request, a request that names none runs the base model; fixed (fused, offloaded), every request runs them."""
        wanted, given_as = take_loras(body)
        if wanted is None and self.engine.lora_switching:
            wanted = []
        fields = sampling_fields(body, self.family.sampling)
        if wanted is not None:
            fields["loras"] = wanted
        try:
            params = self.engine.request(prompt, **fields)
        except UserError as exc:
            raise ApiError.of(exc, {**rename, "loras": given_as or "loras"}) from None
        self._check_limits(params, rename)
        return params, fields

    def _check_limits(self, params: SamplingParams, rename: dict[str, str]) -> None:
        values = asdict(params)
        for name, limit, flag in (
            ("num_inference_steps", self.limits.max_steps, "--max-steps"),
            ("num_frames", self.limits.max_frames, "--max-frames"),
        ):
            if values.get(name) is not None and values[name] > limit:
                param = rename.get(name, name)
                raise ApiError(400, f"`{param}` {values[name]} is over this server's limit of {limit} ({flag})", param,
                               "invalid_value")  # fmt: skip
        for name in ("height", "width"):
            if values[name] > self.limits.max_size:
                param = rename.get(name, name)
                raise ApiError(400, f"`{param}`: {name} {values[name]} is over this server's limit of "
                               f"{self.limits.max_size} (--max-size)", param, "invalid_value")  # fmt: skip

    def take(self, body: Body, kind: str) -> tuple[str, dict[str, str]]:
        """Take the fields every endpoint shares: the prompt, and the renames of library field names
        to the request's own in the engine's errors (`size` for height and width)."""
        if self.output_kind != kind:
            where = "POST /v1/videos" if self.output_kind == "video" else "POST /v1/images/generations"
            raise ApiError(400, f"this server's model {self.model_id!r} makes {self.output_kind}s, not {kind}s: "
                           f"use {where}", "model", "wrong_endpoint")  # fmt: skip
        take_model(body, self.model_id)
        prompt = take_prompt(body)
        refuse_unsupported(body)
        rename: dict[str, str] = {}
        if (size := take_size(body, self.limits.max_size)) is not None:
            body.fields["height"], body.fields["width"] = size
            rename.update(height="size", width="size")
        return prompt, rename

    # The queue.

    def submit(self, params: SamplingParams) -> RequestHandle:
        """Into the engine, or 429 when --max-queue requests are already waiting or running."""
        if (reason := self.engine.health()) is not None:
            raise ApiError(503, f"the engine cannot take requests: {reason}", None, "engine_unhealthy")
        pending = self.engine.pending()
        if pending >= self.limits.max_queue:
            self.metrics.requests.labels(self.output_kind + "s", "rejected").inc()
            wait = max(1, math.ceil(self.recent_seconds * (pending + 1 - self.limits.max_queue)))
            raise ApiError(429, f"the server is busy: {pending} requests are queued or running (--max-queue "
                           f"{self.limits.max_queue}); retry after {wait} s", None, "queue_full",
                           {"Retry-After": str(wait)})  # fmt: skip
        try:
            return self.engine.submit(params)
        except UserError as exc:
            raise ApiError.of(exc) from None
        except WorkerFailure as exc:
            raise ApiError(503, str(exc), None, "engine_unhealthy") from None

    def watch(self, handle: RequestHandle, on_change) -> None:
        """`on_change(handle, event)` on the loop at each change of the request."""
        loop = self.loop
        assert loop is not None  # start() has run

        def heard(h: RequestHandle, event: ProgressEvent | None) -> None:
            if event is not None and event.step is not None:
                self.metrics.step_seconds.observe(event.args[2])
            try:
                loop.call_soon_threadsafe(on_change, h, event)
            except RuntimeError:  # the loop is closed: the server stopped (a restart finds the job in the store)
                pass

        handle.add_listener(heard)

    def finished(self, endpoint: str, handle: RequestHandle, started: float) -> None:
        self.metrics.requests.labels(endpoint, handle.status.value).inc()
        seconds = time.monotonic() - started
        self.metrics.latency.labels(endpoint).observe(seconds)
        if handle.status is RequestStatus.COMPLETED:
            result: GenerationResult = handle.result()
            self.recent_seconds = result.total_seconds
            self.metrics.batch_size.observe(result.batch_size)
            if result.peak_gpu_memory_bytes is not None:
                self.metrics.peak_gpu_memory.set(result.peak_gpu_memory_bytes)

    # Images.

    async def images(self, params: SamplingParams, response_format: str, base_url: str) -> dict[str, Any]:
        started = time.monotonic()
        handle = self.submit(params)
        assert self.loop is not None  # start() has run
        done = self.loop.create_future()

        def on_change(h: RequestHandle, event: ProgressEvent | None) -> None:
            if h.done() and not done.done():
                done.set_result(None)

        self.watch(handle, on_change)
        try:
            await done
        except asyncio.CancelledError:  # the client went away
            handle.cancel()
            raise
        self.finished("images", handle, started)
        try:
            result: GenerationResult = handle.result()
        except UserError as exc:
            raise ApiError.of(exc) from None
        except RequestCancelled:
            raise ApiError(503, "the request was cancelled: the server is shutting down", None, "cancelled") from None
        except Exception as exc:  # noqa: BLE001 - the engine's failure, said in one line
            raise ApiError(500, f"generation failed: {exc}", None, "generation_failed") from None
        encoding = time.monotonic()
        assert result.images is not None  # an image model's
        images = range(len(result.images))  # each PNG on its own thread (zlib lets go of the GIL)
        data = await asyncio.gather(
            *(asyncio.to_thread(self._encode, result, i, response_format, base_url) for i in images)
        )
        extras = self.timings(result)
        extras.update(encode_seconds=time.monotonic() - encoding, server_seconds=time.monotonic() - started)
        return {
            "created": int(time.time()),
            "data": list(data),
            "output_format": "png",
            "size": f"{params.width}x{params.height}",
            "sgdiff": extras,
        }

    def _encode(self, result: GenerationResult, index: int, response_format: str, base_url: str) -> dict[str, Any]:
        assert result.images is not None  # an image model's
        metadata = output_metadata(result.params, index, **self.about, loras=self.engine.lora_record(result.params))
        png = png_bytes(result.images[index], metadata)
        if response_format == "b64_json":
            return {"b64_json": base64.b64encode(png).decode(), "revised_prompt": None}
        image_id = "img_" + secrets.token_hex(IMAGE_ID_HEX // 2)
        (self.images_dir / f"{image_id}.png").write_bytes(png)
        return {"url": f"{base_url}v1/images/files/{image_id}.png", "revised_prompt": None}

    def timings(self, result: GenerationResult) -> dict[str, Any]:
        """sgdiff's extras beside OpenAI's fields: the request as run, and where its time went."""
        return {
            "request": asdict(result.params),
            "loras": self.engine.lora_record(result.params),  # the LoRA adapters it ran with: name, source, scale
            "generation_seconds": result.total_seconds,
            "stage_seconds": result.stage_seconds,
            "step_seconds": result.step_seconds,
            "peak_gpu_memory_bytes": result.peak_gpu_memory_bytes,
            "batch_size": result.batch_size,
        }

    # Video jobs.

    def create_job(self, params: SamplingParams, request: dict[str, Any], job_id: str | None = None) -> Job:
        """`request`: the engine's fields as given (stored, to run the job again after a restart)."""
        job_id = job_id or new_id()
        request = {**request, "seed": params.seed}  # a restart runs it again with the very same noise
        job = Job(job_id, "queued", int(time.time()), None, params.prompt, request, f"{params.width}x{params.height}",
                  self.seconds_of(params), 0, None)  # fmt: skip
        handle = self.submit(params)
        self.store.add(job)
        self._track(job_id, handle)
        return job

    def _run_job(self, job_id: str, params: SamplingParams) -> None:
        self._track(job_id, self.engine.submit(params))

    def _track(self, job_id: str, handle: RequestHandle) -> None:
        self.live[job_id] = handle
        started = time.monotonic()

        def changed(h: RequestHandle, event: ProgressEvent | None) -> None:
            if h is not self.live.get(job_id):
                return
            if h.status is RequestStatus.RUNNING and event is None:
                self.store.update(job_id, "in_progress")
            elif h.done():
                if h.status is RequestStatus.COMPLETED:
                    self.store.update(job_id, "in_progress", progress=99)  # until its MP4 is written
                self.live.pop(job_id)
                self.finished("videos", h, started)
                assert self.loop is not None  # start() has run
                self.loop.create_task(self._finish_job(job_id, h))

        self.watch(handle, changed)

    async def _finish_job(self, job_id: str, handle: RequestHandle) -> None:
        if handle.status is RequestStatus.CANCELLED:
            self.store.update(job_id, "cancelled")
            return
        try:
            result: GenerationResult = handle.result()
            assert result.videos is not None  # a video model's
            video = result.videos[0]
            metadata = output_metadata(result.params, 0, **self.about, loras=self.engine.lora_record(result.params))
            path = self.store.video_path(job_id)
            await asyncio.to_thread(save_mp4, video, path, result.fps or DEFAULT_FPS, metadata)
        except Exception as exc:  # noqa: BLE001 - the job failed: its record says why
            self.store.update(job_id, "failed", error={"code": "generation_failed", "message": str(exc)})
            return
        if self.store.get(job_id) is None:  # deleted while its MP4 was being written
            path.unlink(missing_ok=True)
            return
        self.store.update(job_id, "completed", progress=100)

    def cancel_job(self, job_id: str) -> bool:
        """Cancel a queued or running job (the GPU is free after the step in hand); False if none."""
        handle = self.live.get(job_id)
        if handle is None:
            return False
        handle.cancel()
        return True

    def progress(self, job: Job) -> tuple[int, int | None, int | None]:
        """(percent, denoising steps done, steps in all) of a job; a live one's from its handle."""
        handle = self.live.get(job.id)
        if handle is None:
            return job.progress, None, None
        steps = handle.progress
        if steps is None:
            return 0, 0 if handle.status is RequestStatus.RUNNING else None, None
        done, total = steps
        return min(99, 100 * done // total), done, total  # 100 once the MP4 is written

    def seconds_of(self, params: SamplingParams) -> str:
        frames = asdict(params).get("num_frames") or 1
        fps = self.family.fps(params) or DEFAULT_FPS
        return f"{(frames - 1) / fps:g}"

    def video_object(self, job: Job) -> dict[str, Any]:
        percent, done, total = self.progress(job)
        status = job.status
        handle = self.live.get(job.id)
        if handle is not None:
            status = "in_progress" if handle.status is RequestStatus.RUNNING else "queued"
        return {
            "id": job.id,
            "object": "video",
            "model": self.model_id,
            "status": status,
            "progress": percent,
            "created_at": job.created_at,
            "completed_at": job.completed_at,
            "expires_at": None,
            "prompt": job.prompt,
            "size": job.size,
            "seconds": job.seconds,
            "remixed_from_video_id": None,
            "error": job.error,
            "seed": job.request.get("seed"),  # sgdiff's extras: the seed the job runs with, ...
            "denoising_step": done,  # ... and denoising steps done so far, of denoising_steps
            "denoising_steps": total,
        }

    def _gpu_memory(self) -> float:
        import torch

        device = self.engine.runner.device
        if device.type != "cuda" or not torch.cuda.is_initialized():
            return 0.0
        return float(torch.cuda.memory_allocated(device))

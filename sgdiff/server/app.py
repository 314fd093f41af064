"""The HTTP routes (FastAPI): OpenAI's Images and Videos APIs, /v1/models, /v1/loras, /health and /metrics.
Every route but /health asks for the API key when one is set."""

from __future__ import annotations

import asyncio
import hmac
import io
import re
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from starlette.datastructures import UploadFile

from sgdiff import __version__
from sgdiff.sampling import field_kinds, sampling_fields
from sgdiff.server.core import ServerCore
from sgdiff.server.errors import ApiError, install_error_handlers
from sgdiff.server.jobs import new_id, valid_id
from sgdiff.server.protocol import Body, Upload, parse_json, take_int

IMAGE_FIELD = "image_path"  # the sampling field (of any family that has it) that takes an input image
IMAGE_FILE = re.compile(r"^img_[0-9a-f]{32}\.png$")
ENDPOINTS = {"/v1/images/generations": "images", "/v1/images/edits": "images", "/v1/videos": "videos"}
FORMS = ("multipart/form-data", "application/x-www-form-urlencoded")


def create_app(core: ServerCore, api_key: str | None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        core.start(asyncio.get_running_loop())
        yield

    app = FastAPI(title="sgdiff", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)  # fmt: skip
    install_error_handlers(app)

    @app.middleware("http")
    async def count_refusals(request: Request, call_next):
        """A refused request (4xx but 429, which the queue counts as rejected) is counted as invalid."""
        response = await call_next(request)
        endpoint = ENDPOINTS.get(request.url.path.rstrip("/"))
        if endpoint and request.method == "POST" and 400 <= response.status_code < 500 and response.status_code != 429:
            core.metrics.requests.labels(endpoint, "invalid").inc()
        return response

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>' with the "
                           "server's --api-key", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})  # fmt: skip

    api = APIRouter(dependencies=[Depends(authorized)])

    @app.get("/health")
    def health() -> JSONResponse:
        reason = core.engine.health()
        if reason is not None:
            return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ok", "model": core.model_id, "queue_depth": core.engine.pending()})

    @api.get("/metrics")
    def metrics() -> Response:
        return Response(core.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @api.get("/v1/models")
    def models() -> dict[str, Any]:
        card = {"id": core.model_id, "object": "model", "created": 0, "owned_by": "sgdiff", "output": core.output_kind,
                "revision": core.engine.revision, "commit": core.engine.model_commit}  # fmt: skip
        return {"object": "list", "data": [card]}

    @api.get("/v1/loras")
    def loras() -> dict[str, Any]:
        """The LoRA adapters loaded (--lora-path): what a request's `lora` or `loras` names."""
        return {"object": "list", "data": core.engine.loras()}

    @api.post("/v1/images/generations")
    async def generate_images(request: Request) -> JSONResponse:
        body = await read_request(request, core.limits.max_body_bytes, files=())
        return await run_images(request, body)

    @api.post("/v1/images/edits")
    async def edit_images(request: Request) -> JSONResponse:
        body = await read_request(request, core.limits.max_body_bytes, files=("image", "image[]"))
        if core.output_kind != "image" or not takes_image(core):
            where = "POST /v1/videos" if core.output_kind == "video" else "POST /v1/images/generations"
            raise ApiError(400, f"this server's model {core.model_id!r} does not edit images: it makes "
                           f"{core.output_kind}s from text ({where})", "model", "unsupported")  # fmt: skip
        images = [upload for upload in body.uploads if upload.name in ("image", "image[]")]
        several = field_kinds(core.family.sampling)[IMAGE_FIELD] is tuple  # type: ignore[arg-type]  # (a class)
        if not images or (len(images) > 1 and not several):
            wanted = "one or more `image[]` file parts" if several else "exactly one `image` file part"
            raise ApiError(400, f"give {wanted} (got {len(images)})", "image", "invalid_value")
        paths = [core.images_dir / f"input_{new_id()}.img" for _ in images]
        try:
            for path, image in zip(paths, images, strict=True):
                path.write_bytes(checked_image(image, "image"))
            return await run_images(request, body, [str(path) for path in paths])
        finally:
            for path in paths:
                path.unlink(missing_ok=True)

    async def run_images(request: Request, body: Body, images: list[str] | None = None) -> JSONResponse:
        """`images`: where the server put the uploaded images to edit."""
        prompt, renames = core.take(body, "image")
        renames.update(num_outputs_per_prompt="n")
        if images:
            body.fields[IMAGE_FIELD] = images[0] if len(images) == 1 else images
            renames[IMAGE_FIELD] = "image"
        response_format = body.fields.pop("response_format", None) or "b64_json"
        if response_format not in ("b64_json", "url"):
            raise ApiError(400, f"`response_format` must be \"b64_json\" or \"url\", got {response_format!r}",
                           "response_format", "invalid_value")  # fmt: skip
        if body.fields.get("output_format") not in (None, "png"):
            raise ApiError(400, "`output_format`: sgdiff writes png", "output_format", "unsupported")
        body.fields.pop("output_format", None)
        n = take_int(body, "n", 1, 1, core.limits.max_n, "the server's --max-n")
        body.fields["num_outputs_per_prompt"] = n
        params, _ = core.params(prompt, body, renames)
        return JSONResponse(await core.images(params, response_format, str(request.base_url)))

    @api.get("/v1/images/files/{name}")
    def image_file(name: str) -> FileResponse:
        path = core.images_dir / name
        if not IMAGE_FILE.match(name) or not path.is_file():
            raise ApiError(404, f"no image {name!r} here", "name", "not_found")
        return FileResponse(path, media_type="image/png")

    @api.post("/v1/videos")
    async def create_video(request: Request) -> dict[str, Any]:
        body = await read_request(request, core.limits.max_body_bytes, files=("input_reference",))
        prompt, rename = core.take(body, "video")
        job_id = new_id()
        references = [upload for upload in body.uploads if upload.name == "input_reference"]
        if "input_reference" in body.fields:
            raise ApiError(400, "send `input_reference` as a file part of a multipart/form-data request",
                           "input_reference", "invalid_value")  # fmt: skip
        if len(references) > 1:
            raise ApiError(400, "give one `input_reference` image", "input_reference", "invalid_value")
        if references:
            if not takes_image(core):
                raise ApiError(400, f"this server's model {core.model_id!r} makes videos from text only; leave "
                               "`input_reference` out", "input_reference", "unsupported")  # fmt: skip
            path = core.store.input_path(job_id)
            path.write_bytes(checked_image(references[0], "input_reference"))
            body.fields[IMAGE_FIELD] = str(path)
        rename[IMAGE_FIELD] = "input_reference"  # (an image-to-video model without one: its error names it)
        seconds = body.fields.pop("seconds", None)
        if seconds is not None:
            frames_for(core, prompt, body, rename, seconds)
        try:
            params, fields = core.params(prompt, body, rename)
            job = core.create_job(params, fields, job_id)
        except BaseException:
            core.store.input_path(job_id).unlink(missing_ok=True)
            raise
        return core.video_object(job)

    @api.get("/v1/videos")
    def list_videos(after: str | None = None, limit: int = 20, order: str = "desc") -> dict[str, Any]:
        if not 1 <= limit <= 100:
            raise ApiError(400, f"`limit` must be between 1 and 100, got {limit}", "limit", "invalid_value")
        if order not in ("asc", "desc"):
            raise ApiError(400, f'`order` must be "asc" or "desc", got {order!r}', "order", "invalid_value")
        jobs = core.store.list(after, limit + 1, order)
        data = [core.video_object(job) for job in jobs[:limit]]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": len(jobs) > limit}  # fmt: skip

    def job_or_404(video_id: str):
        job = core.store.get(video_id) if valid_id(video_id) else None
        if job is None:
            raise ApiError(404, f"no video job {video_id!r} (ids look like video_ and 32 hex digits)", "video_id",
                           "not_found")  # fmt: skip
        return job

    @api.get("/v1/videos/{video_id}")
    def retrieve_video(video_id: str) -> dict[str, Any]:
        return core.video_object(job_or_404(video_id))

    @api.get("/v1/videos/{video_id}/content")
    def video_content(video_id: str, variant: str = "video") -> FileResponse:
        job = job_or_404(video_id)
        if variant != "video":
            raise ApiError(400, f"`variant` {variant!r}: sgdiff makes the video only", "variant", "unsupported")
        path = core.store.video_path(job.id)
        if job.status != "completed" or not path.is_file():
            status = core.video_object(job)["status"]
            raise ApiError(400, f"video {job.id} is {status}, not completed: its content is there once it is",
                           "video_id", "video_not_ready")  # fmt: skip
        return FileResponse(path, media_type="video/mp4", filename=f"{job.id}.mp4")

    @api.delete("/v1/videos/{video_id}")
    def delete_video(video_id: str) -> dict[str, Any]:
        """A queued or running job is cancelled (its record stays, cancelled); a finished one is deleted."""
        job = job_or_404(video_id)
        if core.cancel_job(job.id):
            return {"id": job.id, "object": "video.deleted", "deleted": True, "status": "cancelled"}
        core.store.delete(job.id)
        return {"id": job.id, "object": "video.deleted", "deleted": True, "status": "deleted"}

    app.include_router(api)
    return app


def takes_image(core: ServerCore) -> bool:
    return IMAGE_FIELD in sampling_fields(core.family.sampling)


def frames_for(core: ServerCore, prompt: str, body: Body, rename: dict[str, str], seconds: Any) -> None:
    """OpenAI's `seconds` as a frame count at the request's fps: seconds * fps + 1."""
    if "num_frames" in body.fields:
        raise ApiError(400, "give `seconds` or `num_frames`, not both", "seconds", "invalid_value")
    text = str(seconds).strip()
    if isinstance(seconds, bool) or not text.isdigit() or not 1 <= int(text) <= 3600:
        raise ApiError(400, f"`seconds` must be a whole number of seconds, e.g. \"4\", got {seconds!r}", "seconds",
                       "invalid_value")  # fmt: skip
    probe = Body(dict(body.fields), from_form=body.from_form)
    params, _ = core.params(prompt, probe, rename)
    fps = core.family.fps(params) or 16
    body.fields["num_frames"] = int(text) * fps + 1
    rename["num_frames"] = "seconds"


def checked_image(upload: Upload, param: str) -> bytes:
    """The bytes of an uploaded image, refused (400) unless they decode as one."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(upload.content)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise ApiError(400, f"`{param}` ({upload.filename or 'the upload'}) is not an image PIL can read (PNG, "
                       "JPEG, WebP, ...)", param, "invalid_image") from None  # fmt: skip
    return upload.content


async def read_request(request: Request, limit: int, files: tuple[str, ...]) -> Body:
    """The body (at most `limit` bytes, else 413) as fields and file parts: JSON, or a form."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    raw = b"".join(chunks)
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind == "application/x-www-form-urlencoded" and raw.lstrip()[:1] in (b"{", b"["):
        kind = "application/json"  # curl -d '{...}' without -H 'Content-Type: application/json'
    if kind not in FORMS:
        if kind not in ("application/json", ""):
            raise ApiError(415, f"the body is {kind}: send application/json (or multipart/form-data)", None,
                           "unsupported_media_type")  # fmt: skip
        return parse_json(raw)

    async def replay() -> dict:
        return {"type": "http.request", "body": raw, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=16, max_fields=64)
    body = Body({}, from_form=True)
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name not in files:
                raise ApiError(400, f"unexpected file part `{name}`" + (f"; this endpoint takes {', '.join(files)}"
                               if files else ": this endpoint takes no files"), name, "invalid_value")  # fmt: skip
            body.uploads.append(Upload(name, value.filename, await value.read()))
        elif name in body.fields:
            raise ApiError(400, f"`{name}` is given twice", name, "invalid_value")
        else:
            body.fields[name] = value
    return body


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the body is over this server's limit of {limit} bytes (--max-body-mb)", None,
                    "body_too_large")  # fmt: skip

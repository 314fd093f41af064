"""`sgdiff generate --server URL`: the same flags and output files, but the model runs in a server
(`sgdiff serve`) that is already loaded, so a shell loop over prompts pays no load per call. Images
come back as PNGs (their metadata written by the server), videos as MP4 jobs polled to the end."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer

from sgdiff.cli.errors import FLAGS, fail, flag
from sgdiff.cli.prompts import PromptLine, fields_for_output
from sgdiff.cli.prompts import name_fields as names_of
from sgdiff.errors import UserError
from sgdiff.io.files import write_atomically
from sgdiff.io.image import OutputNamer, check_output_file_name
from sgdiff.io.outputs import OutputConfig, output_suffix

POLL_SECONDS = 0.25
API_FLAGS = {**FLAGS, "n": "--num-outputs-per-prompt", "input_reference": "--image-path", "size": "--height/--width",
             "loras": "--lora-path"}  # fmt: skip


@dataclass(frozen=True)
class RemoteRequest:
    server: str
    model_path: str | None
    prompts: list[str]
    sampling_flags: dict[str, Any]
    output: OutputConfig
    preset: str | None = None
    engine_flags: tuple[str, ...] | list[str] = ()
    prompt_lines: list[PromptLine] = field(default_factory=list)  # a JSON Lines file: each prompt's own fields
    revision: str | None = None
    # --lora-path NAME[:SCALE]: adapters the server loaded, by name (scale None: the server's own for it)
    loras: list[tuple[str, float | None]] = field(default_factory=list)


def api_flag(name: str) -> str:
    """How the CLI names a field of the server's API in an error."""
    return API_FLAGS.get(name, flag(name))


class ServerClient:
    def __init__(self, url: str):
        import httpx

        if not url.startswith(("http://", "https://")):
            fail(f"--server {url}: give the server's URL, e.g. http://127.0.0.1:30000")
        key = os.environ.get("SGDIFF_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(30.0, read=None))
        self.errors = (httpx.HTTPError,)

    def call(self, method: str, path: str, line: PromptLine | None = None, **kwargs) -> Any:
        """The answer's JSON (or bytes for content); a refusal ends the run with the server's message
        (naming `line`, the prompt file's line of the request, and its fields as the line spells them)."""
        try:
            response = self.http.request(method, path, **kwargs)
        except self.errors as exc:
            fail(f"cannot reach the server at {self.url} ({exc}): is `sgdiff serve` running there?", code=1)
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                spell = (lambda name: line.spell(name, api_flag)) if line is not None else api_flag
                message = UserError(error["message"]).render(spell)
            except (ValueError, KeyError, TypeError):
                message = f"HTTP {response.status_code}: {response.text[:200]}"
            where = f"{line.origin}: " if line is not None else ""
            fail(f"{where}the server refused: {message}", code=2 if response.status_code < 500 else 1)
        return response.content if response.headers.get("content-type", "").startswith("video/") else response.json()


def run_remote(request: RemoteRequest, quiet: bool) -> None:
    if request.engine_flags:
        fail(f"{request.engine_flags[0]} sets how a model runs here; with --server the server's own settings apply: "
             "leave it out (or restart the server with it)")  # fmt: skip
    if request.preset is not None:
        fail("--preset picks a model's defaults here; with --server the server's preset applies: leave it out")
    if request.revision is not None:
        fail("--revision picks the model's version here; with --server the server's model applies: leave it out "
             "(or restart the server with it)")  # fmt: skip
    client = ServerClient(request.server)
    card = client.call("GET", "/v1/models")["data"][0]
    if request.model_path is not None and request.model_path != card["id"]:
        fail(f"--model-path {request.model_path}, but the server at {client.url} serves {card['id']}")
    kind = card["output"]
    takes = fields_for_output(kind)
    for given in request.prompt_lines:  # the server checks the rest as each request comes
        if misfit := next((name for name in given.fields if name not in takes), None):
            fail(f'{given.origin}: "{misfit}" does not apply to the server\'s model, which makes {kind}s')
    out = request.output
    try:
        suffix = output_suffix(kind, out.output_format)
    except UserError as exc:
        fail(str(exc))
    if suffix == "":
        fail("--output-format png writes a video as PNG frames, which only a local run makes; with --server "
             "videos come as MP4: leave --output-format out")  # fmt: skip
    if out.output_file_name is not None and (problem := check_output_file_name(out.output_file_name, suffix)):
        fail(problem)
    flags = dict(request.sampling_flags)
    if request.loras:  # the request's `loras`: the server's adapters by name (GET /v1/loras)
        flags["loras"] = [{"name": name, **({"scale": scale} if scale is not None else {})}
                          for name, scale in request.loras]  # fmt: skip
    n = flags.pop("num_outputs_per_prompt", 1)
    if kind == "video" and n != 1:
        fail("--num-outputs-per-prompt: with --server each video is its own job; run the command once per video")
    namer = OutputNamer(out.output_path, out.output_file_name, n * len(request.prompts), suffix)
    start, reports = time.perf_counter(), []
    lines: Sequence[PromptLine | None] = request.prompt_lines or [None] * len(request.prompts)
    for prompt, line in zip(request.prompts, lines, strict=True):
        fields = {**flags, **line.fields} if line is not None else flags
        if kind == "image":
            outputs, report = remote_images(client, prompt, n, fields, line)
        else:
            outputs, report = remote_video(client, prompt, fields, quiet, line)
        reports.append(report)
        seed = report["request"]["seed"]
        for index, content in enumerate(outputs):
            fields = names_of(request.sampling_flags, line, card["id"], request.loras)
            path = namer.next_path(prompt, seed, index, n, fields)
            if out.save_output:  # (mypy cannot type a lambda with a default)
                write_atomically(path, lambda handle, content=content: handle.write(content))  # type: ignore[misc]
                typer.echo(str(path))
    total = time.perf_counter() - start
    if out.perf_dump_path is not None:
        dump = {"server": client.url, "model": card["id"], "model_revision": card.get("revision"),
                "model_commit": card.get("commit"), "loras": flags.get("loras", []), "total_seconds": total,
                "requests": reports}  # fmt: skip
        write_atomically(out.perf_dump_path, lambda handle: handle.write(json.dumps(dump, indent=2).encode()))
    if not quiet:
        count = n * len(request.prompts)
        typer.echo(f"generated {count} {kind}(s) in {total:.1f} s on {client.url}", err=True)


def remote_images(
    client: ServerClient, prompt: str, n: int, flags: dict[str, Any], line: PromptLine | None = None
) -> tuple[list[bytes], dict]:
    """--image-path: the images uploaded to the edits endpoint."""
    flags = dict(flags)
    images = uploads(flags.pop("image_path", None))
    body = {"prompt": prompt, "n": n, "response_format": "b64_json", **flags}
    if images:
        form = {name: form_value(value) for name, value in body.items()}
        answer = client.call("POST", "/v1/images/edits", line, data=form, files=[("image[]", i) for i in images])
    else:
        answer = client.call("POST", "/v1/images/generations", line, json=body)
    return [base64.b64decode(item["b64_json"]) for item in answer["data"]], answer["sgdiff"]


def form_value(value: Any) -> str:
    """A field of a multipart form: `loras` (a list) as JSON text, the rest as text."""
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def uploads(image_path: str | tuple[str, ...] | None) -> list[tuple[str, bytes]]:
    """(name, bytes) of each --image-path, read here: with --server the images are uploaded."""
    found = []
    for given in [image_path] if isinstance(image_path, str) else image_path or ():
        path = Path(given)
        if not path.is_file():
            fail(f"--image-path {given}: no such file (with --server the image is uploaded from here)")
        found.append((path.name, path.read_bytes()))
    return found


def remote_video(
    client: ServerClient, prompt: str, flags: dict[str, Any], quiet: bool, line: PromptLine | None = None
) -> tuple[list[bytes], dict]:
    flags = dict(flags)
    images = uploads(flags.pop("image_path", None))
    if len(images) > 1:
        fail(f"--image-path takes one image for a video model, got {len(images)}")
    if images:
        form = {name: form_value(value) for name, value in {"prompt": prompt, **flags}.items()}
        job = client.call("POST", "/v1/videos", line, data=form, files={"input_reference": images[0]})
    else:
        job = client.call("POST", "/v1/videos", line, json={"prompt": prompt, **flags})
    try:
        job = follow_job(client, job, quiet)
    except KeyboardInterrupt:
        client.call("DELETE", f"/v1/videos/{job['id']}")  # the server stops its GPU work too
        raise
    if job["status"] != "completed":
        error = (job.get("error") or {}).get("message", job["status"])
        fail(f"the server's job {job['id']} {job['status']}: {error}", code=1)
    content = client.call("GET", f"/v1/videos/{job['id']}/content")
    return [content], {"request": {"seed": job["seed"]}, "job": job}


def follow_job(client: ServerClient, job: dict, quiet: bool) -> dict:
    """Poll the job until it has finished, drawing its denoising steps."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=quiet) as progress:
        task = progress.add_task(f"{job['id']} queued", total=None)
        while job["status"] in ("queued", "in_progress"):
            time.sleep(POLL_SECONDS)
            job = client.call("GET", f"/v1/videos/{job['id']}")
            done, total = job.get("denoising_step"), job.get("denoising_steps")
            progress.update(task, description=f"{job['id']} {job['status']}", completed=done or 0, total=total)
    return job

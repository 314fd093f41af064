"""`sgdiff serve` with the embedded image model, driven by the real `openai` client and by plain HTTP:
the images equal `sgdiff generate`'s, b64 and url alike; 50 concurrent requests against a queue of 8
get 200 or 429 and every 200 is right; batching keeps each request's pixels; /health and /metrics."""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.testing.server import ServerProcess

KEY = "test-key"
FAST = {"num_inference_steps": 4}  # the demo model's 128x128 at 4 steps: about 0.1 s a request on 2 cores


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("image-server")
    args = ["--max-queue", "8", "--max-batch-size", "4", "--batching-delay-ms", "100"]
    with ServerProcess(args, folder / "state", folder / "log.txt", api_key=KEY) as running:
        yield running


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def generated_locally(tmp_path, prompt: str, seed: int, n: int = 1) -> list[np.ndarray]:
    """What `sgdiff generate` writes for the same request, in this process."""
    out = tmp_path / f"local-{seed}"
    args = ["generate", "--prompt", prompt, "--seed", str(seed), "--steps", "4", "--num-outputs-per-prompt", str(n),
            "--device", "cpu", "--output-path", str(out), "--output-file-name", "x", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    names = ["x.png"] if n == 1 else [f"x_{i}.png" for i in range(n)]
    return [decode((out / name).read_bytes()) for name in names]


def test_openai_client_b64_images_equal_generate(server, tmp_path):
    answer = server.openai().images.generate(
        model="sgdiff/demo-image", prompt="a red circle on a blue background", n=2, size="128x128",
        response_format="b64_json", extra_body={"seed": 11, **FAST},
    )  # fmt: skip
    images = [decode(base64.b64decode(item.b64_json)) for item in answer.data]
    expected = generated_locally(tmp_path, "a red circle on a blue background", 11, n=2)
    assert [image.shape for image in images] == [(128, 128, 3)] * 2
    for image, local in zip(images, expected, strict=True):
        assert np.array_equal(image, local)
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() > 50  # two draws, not one twice


def test_openai_client_url_images_are_served_behind_the_key(server):
    client = server.openai()
    answer = client.images.generate(prompt="a green square", response_format="url", extra_body={"seed": 3, **FAST})
    url = answer.data[0].url
    assert url.startswith(server.url) and "/v1/images/files/img_" in url
    assert httpx.get(url).status_code == 401
    served = decode(httpx.get(url, headers=server.headers).content)
    again = client.images.generate(prompt="a green square", response_format="b64_json", extra_body={"seed": 3, **FAST})
    assert np.array_equal(served, decode(base64.b64decode(again.data[0].b64_json)))
    other = client.images.generate(prompt="a red square", response_format="b64_json", extra_body={"seed": 3, **FAST})
    assert np.abs(served.astype(int) - decode(base64.b64decode(other.data[0].b64_json)).astype(int)).max() > 50


def test_image_edits_on_a_text_to_image_model_say_what_it_can_do(server, tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, format="PNG")
    with pytest.raises(openai.BadRequestError) as refused:
        server.openai().images.edit(image=("red.png", png.getvalue(), "image/png"), prompt="make it blue")
    error = refused.value.body
    assert error["param"] == "model" and "makes images from text" in error["message"]


def test_a_wrong_key_is_refused_and_health_needs_none(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.images.generate(prompt="a red circle")
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert httpx.get(f"{server.url}/metrics").status_code == 401


PROMPTS = [("a red circle", 1), ("a blue square", 2), ("a green triangle", 3), ("a yellow circle", 4)]


@pytest.fixture(scope="module")
def alone(server):
    """Each of PROMPTS run by itself (one request at a time: batches of one)."""
    with httpx.Client(headers=server.headers, timeout=120) as http:
        return {seed: image_of(http, server, prompt, seed) for prompt, seed in PROMPTS}


def image_of(http: httpx.Client, server: ServerProcess, prompt: str, seed: int) -> np.ndarray:
    response = post(http, server, prompt, seed)
    assert response.status_code == 200, response.text
    return decode(base64.b64decode(response.json()["data"][0]["b64_json"]))


def post(http: httpx.Client, server: ServerProcess, prompt: str, seed: int) -> httpx.Response:
    body = {"prompt": prompt, "seed": seed, **FAST}
    return http.post(f"{server.url}/v1/images/generations", json=body)


def test_fifty_concurrent_requests_get_200_or_429_and_every_200_is_right(server, alone):
    def one(index: int) -> tuple[int, httpx.Response]:
        prompt, seed = PROMPTS[index % len(PROMPTS)]
        with httpx.Client(headers=server.headers, timeout=120) as http:
            return seed, post(http, server, prompt, seed)

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(one, range(50)))
    codes = [response.status_code for _, response in answers]
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
    batch_sizes = set()
    for seed, response in answers:
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1
            assert response.json()["error"]["code"] == "queue_full"
            continue
        image = decode(base64.b64decode(response.json()["data"][0]["b64_json"]))
        assert np.abs(image.astype(int) - alone[seed].astype(int)).max() <= 2  # batched or not: its own pixels
        batch_sizes.add(response.json()["sgdiff"]["batch_size"])
    assert max(batch_sizes) > 1  # some ran together
    with httpx.Client(headers=server.headers, timeout=120) as http:  # and the server still answers
        assert np.array_equal(image_of(http, server, *PROMPTS[0]), alone[PROMPTS[0][1]])


def test_batched_requests_keep_their_own_pixels(server, alone):
    with ThreadPoolExecutor(4) as pool, httpx.Client(headers=server.headers, timeout=120) as http:
        answers = list(pool.map(lambda ps: post(http, server, *ps), PROMPTS))
    assert {answer.json()["sgdiff"]["batch_size"] for answer in answers} == {4}
    for (_, seed), answer in zip(PROMPTS, answers, strict=True):
        image = decode(base64.b64decode(answer.json()["data"][0]["b64_json"]))
        assert np.abs(image.astype(int) - alone[seed].astype(int)).max() <= 2


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=server.headers).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_metrics_count_requests_steps_and_the_queue(server, alone):
    completed = 'sgdiff_requests_total{endpoint="images",status="completed"}'
    invalid = 'sgdiff_requests_total{endpoint="images",status="invalid"}'
    before = metric(server, completed), metric(server, invalid), metric(server, "sgdiff_step_seconds_count")
    with httpx.Client(headers=server.headers, timeout=120) as http:
        image_of(http, server, *PROMPTS[1])
        assert http.post(f"{server.url}/v1/images/generations", json={"prompt": "x", "n": 0}).status_code == 400
    after = metric(server, completed), metric(server, invalid), metric(server, "sgdiff_step_seconds_count")
    assert after[0] == before[0] + 1 and after[1] == before[1] + 1 and after[2] == before[2] + 4
    assert metric(server, "sgdiff_queue_depth") == 0
    assert metric(server, 'sgdiff_request_latency_seconds_count{endpoint="images"}') >= 1

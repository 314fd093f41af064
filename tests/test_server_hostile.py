"""Malformed and hostile requests: each gets a 4xx in OpenAI's error shape naming the field at fault
(never a 500, never a traceback), and the server serves the next good request."""

from __future__ import annotations

import httpx
import pytest

from sgdiff.testing.server import ServerProcess

KEY = "hostile-key"
IMAGES = "/v1/images/generations"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    args = ["--max-body-mb", "0.05", "--max-n", "4", "--max-steps", "50"]  # a 52 kB body limit
    with ServerProcess(args, folder / "state", folder / "log.txt", api_key=KEY) as running:
        yield running


def body(**fields) -> dict:
    return {"json": {"prompt": "a red circle", "num_inference_steps": 2, **fields}}


AUTH = {"Authorization": f"Bearer {KEY}"}
# (name, method, path, request, status, param)
CASES = [
    ("bad JSON", "POST", IMAGES, {"content": b'{"prompt":', "headers": {"content-type": "application/json"}}, 400,
     None),
    ("a list, not an object", "POST", IMAGES, {"json": ["a red circle"]}, 400, None),
    ("no body", "POST", IMAGES, {"content": b""}, 400, None),
    ("missing prompt", "POST", IMAGES, {"json": {"n": 1}}, 400, "prompt"),
    ("prompt a number", "POST", IMAGES, {"json": {"prompt": 5}}, 400, "prompt"),
    ("prompt blank", "POST", IMAGES, {"json": {"prompt": "   "}}, 400, "prompt"),
    ("prompt a lone surrogate", "POST", IMAGES, {"content": b'{"prompt": "a red \\udcff circle"}'}, 400, "prompt"),
    ("negative prompt a lone surrogate", "POST", IMAGES,
     {"content": b'{"prompt": "x", "negative_prompt": "\\ud800"}'}, 400, "negative_prompt"),
    ("huge n", "POST", IMAGES, body(n=1000), 400, "n"),
    ("n zero", "POST", IMAGES, body(n=0), 400, "n"),
    ("n a word", "POST", IMAGES, body(n="two"), 400, "n"),
    ("n a boolean", "POST", IMAGES, body(n=True), 400, "n"),
    ("huge size", "POST", IMAGES, body(size="99999x99999"), 400, "size"),
    ("size a word", "POST", IMAGES, body(size="big"), 400, "size"),
    ("size off the grid", "POST", IMAGES, body(size="100x100"), 400, "size"),
    ("NaN", "POST", IMAGES, {"content": b'{"prompt": "x", "guidance_scale": NaN}'}, 400, "guidance_scale"),
    ("Infinity", "POST", IMAGES, {"content": b'{"prompt": "x", "true_cfg_scale": Infinity}'}, 400, "true_cfg_scale"),
    ("negative seed", "POST", IMAGES, body(seed=-1), 400, "seed"),
    ("seed a string", "POST", IMAGES, body(seed="5"), 400, "seed"),
    ("seed over 64 bits", "POST", IMAGES, body(seed=2**70), 400, "seed"),
    ("steps over the limit", "POST", IMAGES, body(num_inference_steps=100000), 400, "num_inference_steps"),
    ("zero steps", "POST", IMAGES, body(num_inference_steps=0), 400, "num_inference_steps"),
    ("unknown field", "POST", IMAGES, body(bogus=1), 400, "bogus"),
    ("a video field on an image model", "POST", IMAGES, body(num_frames=9), 400, "num_frames"),
    ("a server path to read", "POST", IMAGES, body(image_path="/etc/passwd"), 400, "image_path"),
    ("a URL to fetch", "POST", IMAGES, body(image_path="http://169.254.169.254/"), 400, "image_path"),
    ("unknown model", "POST", IMAGES, body(model="dall-e-3"), 404, "model"),
    ("bad response_format", "POST", IMAGES, body(response_format="xml"), 400, "response_format"),
    ("unsupported quality", "POST", IMAGES, body(quality="hd"), 400, "quality"),
    ("too many tokens", "POST", IMAGES, body(max_sequence_length=100000), 400, "max_sequence_length"),
    ("negative prompt a number", "POST", IMAGES, body(negative_prompt=3), 400, "negative_prompt"),
    ("a nested object", "POST", IMAGES, body(guidance_scale={"$gt": 1}), 400, "guidance_scale"),
    ("no such generator", "POST", IMAGES, body(generator_device="tpu"), 400, "generator_device"),
    ("oversized body", "POST", IMAGES, {"json": {"prompt": "x" * 100_000}}, 413, None),
    ("text/plain", "POST", IMAGES, {"content": b"a red circle", "headers": {"content-type": "text/plain"}}, 415, None),
    ("a file where none is taken", "POST", IMAGES, {"data": {"prompt": "x"}, "files": {"f": ("a.txt", b"hi")}}, 400,
     "f"),
    ("a form field twice", "POST", IMAGES, {"files": [("prompt", (None, "a")), ("prompt", (None, "b"))]}, 400,
     "prompt"),
    ("a video on an image model", "POST", "/v1/videos", body(), 400, "model"),
    ("edits on a text-to-image model", "POST", "/v1/images/edits",
     {"data": {"prompt": "x"}, "files": {"image": ("a.png", b"not a png")}}, 400, "model"),
    ("a path-like video id", "GET", "/v1/videos/video_..", {}, 404, "video_id"),
    ("a path-like content id", "GET", "/v1/videos/..%2Fjobs.sqlite3/content", {}, 404, None),
    ("a path-like image file", "GET", "/v1/images/files/..%2Fjobs.sqlite3", {}, 404, None),
    ("an unknown image file", "GET", "/v1/images/files/img_" + "0" * 32 + ".png", {}, 404, "name"),
    ("a list limit too big", "GET", "/v1/videos?limit=1000", {}, 400, "limit"),
    ("a list limit a word", "GET", "/v1/videos?limit=many", {}, 400, "limit"),
    ("a wrong method", "DELETE", IMAGES, {}, 405, None),
    ("no such endpoint", "GET", "/v1/chat/completions", {}, 404, None),
]  # fmt: skip


@pytest.mark.parametrize("name, method, path, sent, status, param", CASES, ids=[case[0] for case in CASES])
def test_a_bad_request_gets_a_4xx_naming_its_field(server, name, method, path, sent, status, param):
    kwargs = dict(sent)
    kwargs["headers"] = {**AUTH, **kwargs.get("headers", {})}
    response = httpx.request(method, server.url + path, timeout=60, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"] and "Traceback" not in response.text
    good = httpx.post(server.url + IMAGES, json={"prompt": "a red circle", "num_inference_steps": 2}, headers=AUTH)
    assert good.status_code == 200 and good.json()["data"][0]["b64_json"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_a_missing_or_wrong_key_is_a_401_on_every_endpoint_but_health(server, headers):
    for method, path in [("POST", IMAGES), ("GET", "/v1/models"), ("GET", "/v1/videos"), ("GET", "/metrics")]:
        response = httpx.request(method, server.url + path, headers=headers, json={"prompt": "x"})
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.url + "/health", headers=headers).status_code == 200


def test_the_log_has_no_traceback(server):
    assert "Traceback" not in server.log.read_text()

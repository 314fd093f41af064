"""`sgdiff generate --server URL` writes what a local run writes (names, pixels, metadata) with the
model loaded once in a server; `sgdiff serve` shares generate's engine flags and fails clearly."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import typer.main
from PIL import Image
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.io.image import read_png_parameters
from sgdiff.testing.server import ServerProcess

runner = CliRunner()
KEY = "cli-key"
FLAGS = ["--steps", "4", "--seed", "9", "--quiet"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-server")
    with ServerProcess([], folder / "state", folder / "log.txt", api_key=KEY) as running:
        yield running


def generate(*args: str, key: str | None = KEY):
    return runner.invoke(app, ["generate", *args], env={"SGDIFF_API_KEY": key} if key else {})


def test_generate_with_a_server_writes_what_a_local_run_writes(server, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    remote = generate("--server", server.url, "--prompt-file", str(prompts), "--num-outputs-per-prompt", "2",
                      "--output-path", str(tmp_path / "remote"), *FLAGS)  # fmt: skip
    local = generate("--device", "cpu", "--prompt-file", str(prompts), "--num-outputs-per-prompt", "2",
                     "--output-path", str(tmp_path / "local"), *FLAGS)  # fmt: skip
    assert remote.exit_code == 0 and local.exit_code == 0, remote.output + local.output
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert len(names) == 4 and sorted(p.name for p in (tmp_path / "remote").iterdir()) == names
    assert remote.stdout.split() == [str(tmp_path / "remote" / name) for name in local_order(local.stdout)]
    for name in names:
        here, there = tmp_path / "local" / name, tmp_path / "remote" / name
        assert np.array_equal(np.asarray(Image.open(here)), np.asarray(Image.open(there)))
        assert read_png_parameters(here) == read_png_parameters(there)


def test_generate_with_a_server_honours_each_line_of_a_json_lines_file(server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle", "seed": 3, "height": 64, "width": 32}\n'
                       '{"prompt": "a red circle", "num_inference_steps": 2}\n')  # fmt: skip
    remote = generate("--server", server.url, "--prompt-file", str(prompts), "--output-path", str(tmp_path / "remote"),
                      *FLAGS)  # fmt: skip
    local = generate("--device", "cpu", "--prompt-file", str(prompts), "--output-path", str(tmp_path / "local"),
                     *FLAGS)  # fmt: skip
    assert remote.exit_code == 0 and local.exit_code == 0, remote.output + local.output
    assert remote.stdout.split() == [str(tmp_path / "remote" / name) for name in local_order(local.stdout)]
    names = local_order(local.stdout)
    assert len(set(names)) == 2
    for name in names:
        here, there = tmp_path / "local" / name, tmp_path / "remote" / name
        assert np.array_equal(np.asarray(Image.open(here)), np.asarray(Image.open(there)))
        assert read_png_parameters(here) == read_png_parameters(there)
    first, second = (read_png_parameters(tmp_path / "local" / name) for name in names)
    assert (first["seed"], first["height"], first["width"], first["num_inference_steps"]) == (3, 64, 32, 4)
    assert (second["seed"], second["num_inference_steps"]) == (9, 2)


def test_generate_with_a_server_names_the_line_it_cannot_honour(server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a dot"}\n{"prompt": "a dot", "num_frames": 9}\n')
    result = generate("--server", server.url, "--prompt-file", str(prompts), "--output-path", str(tmp_path), *FLAGS)
    assert result.exit_code == 2 and not list(tmp_path.glob("*.png"))
    assert (
        result.stderr == f'error: {prompts}:2: "num_frames" does not apply to the server\'s model, which makes images\n'
    )
    prompts.write_text('{"prompt": "a dot", "num_inference_steps": 300}\n')
    result = generate("--server", server.url, "--prompt-file", str(prompts), "--output-path", str(tmp_path), *FLAGS)
    assert result.exit_code == 2 and result.stderr.startswith(f'error: {prompts}:1: the server refused: "num_inference')


def local_order(stdout: str) -> list[str]:
    return [line.rsplit("/", 1)[-1] for line in stdout.split()]


def test_a_perf_dump_records_the_servers_timings(server, tmp_path):
    dump = tmp_path / "perf.json"
    result = generate("--server", server.url, "--prompt", "a red circle", "--perf-dump-path", str(dump),
                      "--output-path", str(tmp_path), *FLAGS)  # fmt: skip
    assert result.exit_code == 0, result.output
    import json

    report = json.loads(dump.read_text())["requests"][0]
    assert len(report["step_seconds"]) == 4 and report["request"]["seed"] == 9


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dtype", "bf16"], "--dtype sets how a model runs here"),
        (["--num-gpus", "2"], "--num-gpus sets how a model runs here"),
        (["--preset", "demo-image"], "--preset picks a model's defaults here"),
        (["--revision", "main"], "--revision picks the model's version here"),
        (["--model-path", "black-forest-labs/FLUX.1-dev"], "serves sgdiff/demo-image"),
        (["--steps", "0"], "--num-inference-steps must be between 1 and 10000"),
        (["--num-frames", "9"], "--num-frames does not apply"),
        (["--output-format", "mp4"], "--output-format mp4 is for video models"),
    ],
)
def test_generate_with_a_server_refuses_what_it_cannot_honour(server, tmp_path, args, message):
    result = generate("--server", server.url, "--prompt", "x", "--output-path", str(tmp_path), *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and not list(tmp_path.iterdir())


def test_generate_with_a_server_needs_the_key_and_a_server(server, tmp_path):
    wrong = generate("--server", server.url, "--prompt", "x", "--output-path", str(tmp_path), key="nope")
    assert wrong.exit_code == 2 and "API key" in wrong.output
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once it is closed
    gone = generate("--server", f"http://127.0.0.1:{port}", "--prompt", "x", "--output-path", str(tmp_path))
    assert gone.exit_code == 1 and "cannot reach the server" in gone.output
    assert not list(tmp_path.iterdir())


def test_generate_with_a_video_server_writes_generates_mp4(tmp_path):
    folder = tmp_path / "server"
    with ServerProcess(["--model-path", "sgdiff/demo-video"], folder / "state", folder / "log.txt") as server:
        remote = generate("--server", server.url, "--prompt", "a red ball", "--output-path", str(tmp_path / "r"),
                          *FLAGS, key=None)  # fmt: skip
    local = generate("--model-path", "sgdiff/demo-video", "--device", "cpu", "--prompt", "a red ball",
                     "--output-path", str(tmp_path / "l"), *FLAGS, key=None)  # fmt: skip
    assert remote.exit_code == 0 and local.exit_code == 0, remote.output + local.output
    [name] = [p.name for p in (tmp_path / "l").iterdir()]
    assert name.endswith(".mp4") and (tmp_path / "r" / name).read_bytes() == (tmp_path / "l" / name).read_bytes()


def engine_flags(command: str) -> dict[str, tuple]:
    click_command = typer.main.get_command(app).commands[command]
    panels = ("Runtime", "Parallelism", "Speed", "Memory", "LoRA")
    return {
        p.name: (tuple(p.opts), p.default, p.help)
        for p in click_command.params
        if getattr(p, "rich_help_panel", None) in panels
    }


def test_serve_takes_every_engine_flag_of_generate():
    flags = engine_flags("generate")
    assert (
        len(flags) == 27 and engine_flags("serve") == flags
    )  # (--vae-tiling, --dit-precision, memory, --cache*, --lora*, --torch-compile-mode)


def test_serve_on_a_busy_port_says_so_before_loading(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["serve", "--port", str(port), "--state-dir", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output
    assert "--port" in result.output


def test_serve_refuses_an_empty_api_key(tmp_path):
    result = runner.invoke(app, ["serve", "--api-key", " ", "--state-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--api-key is empty" in result.output

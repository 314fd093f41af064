"""A JSON Lines --prompt-file (a name ending in .jsonl): each line's own seed, size, steps, ... override
the flags for its prompt alone, and give what separate runs with those flags give; every bad line is
refused before any weight loads, naming the file, the line and the field."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from sgdiff.cli import main as cli
from sgdiff.io.image import OutputNamer, read_png_parameters

runner = CliRunner()


@pytest.fixture
def received(monkeypatch):
    """Capture the BatchRequest instead of running it."""
    calls = []
    monkeypatch.setattr(cli, "run", lambda request, quiet: calls.append(request))
    return calls


def invoke(*args: str):
    return runner.invoke(cli.app, ["generate", *args])


def write_lines(path, *lines: str):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_each_line_reaches_the_library_with_its_own_fields(received, tmp_path):
    prompts = write_lines(
        tmp_path / "p.jsonl",
        '{"prompt": "a red cube", "seed": 7, "height": 64, "width": 32}',
        "",
        '  {"prompt": "a blue cone", "negative_prompt": "blurry", "guidance_scale": 2, "num_inference_steps": 3}\r',
        '{"prompt": " a cat ", "num_frames": 9}',
    )
    result = invoke("--model-path", "m", "--prompt-file", str(prompts), "--seed", "1", "--steps", "2")
    assert result.exit_code == 0, result.output
    [request] = received
    assert request.prompts == ["a red cube", "a blue cone", " a cat "]  # JSON strings are kept as written
    assert request.sampling_flags == {"seed": 1, "num_inference_steps": 2}
    assert [(line.origin, line.fields) for line in request.prompt_lines] == [
        (f"{prompts}:1", {"seed": 7, "height": 64, "width": 32}),
        (f"{prompts}:3", {"negative_prompt": "blurry", "guidance_scale": 2, "num_inference_steps": 3}),
        (f"{prompts}:4", {"num_frames": 9}),
    ]


def test_a_plain_prompt_file_has_no_lines_of_fields(received, tmp_path):
    prompts = write_lines(tmp_path / "p.txt", '{"prompt": "a red cube", "seed": 7}')
    assert invoke("--model-path", "m", "--prompt-file", str(prompts)).exit_code == 0
    assert received[0].prompts == ['{"prompt": "a red cube", "seed": 7}'] and received[0].prompt_lines == []


KNOWN = (
    '"prompt" and "seed", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale", "num_frames"'
)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "x",}', "not valid JSON (Expecting property name enclosed in double quotes at column 16)"),
        ("a red cube", "not valid JSON (Expecting value at column 1)"),
        ('{"prompt": "x", "prompt": "y"}', 'not valid JSON ("prompt" is given twice)'),
        ("[1" * 100_000, "not valid JSON"),
        ('"a red cube"', 'each line is an object such as {"prompt": "a red cube", "seed": 7}, not a string'),
        ("[]", "not a list"),
        ('{"seed": 1}', 'no "prompt"'),
        ('{"prompt": ""}', '"prompt" is empty'),
        ('{"prompt": "  "}', '"prompt" is empty'),
        ('{"prompt": 3}', '"prompt" must be a string, not a number'),
        ('{"prompt": null}', '"prompt" must be a string, not null'),
        ('{"prompt": "x\\ud800"}', '"prompt" is not valid UTF-8: U+D800 at character 2'),
        ('{"prompt": "x", "fps": 8}', f'unknown field "fps"; a line takes {KNOWN}'),
        ('{"prompt": "x", "Seed": 8}', 'unknown field "Seed"'),
        ('{"prompt": "x", "seed": "7"}', "\"seed\" must be an integer, got '7'"),
        ('{"prompt": "x", "seed": true}', '"seed" must be an integer, got True'),
        ('{"prompt": "x", "seed": 1.5}', '"seed" must be an integer, got 1.5'),
        ('{"prompt": "x", "seed": null}', '"seed" must be an integer, not null'),
        ('{"prompt": "x", "seed": -1}', '"seed" must be between 0 and 18446744073709551615, got -1'),
        ('{"prompt": "x", "seed": 18446744073709551616}', '"seed" must be between 0 and 18446744073709551615'),
        ('{"prompt": "x", "seed": 1' + "0" * 5000 + "}", "not valid JSON (Exceeds the limit"),
        ('{"prompt": "x", "height": 1000}', '"height" must be a positive multiple of 16 up to 8192, got 1000'),
        ('{"prompt": "x", "width": 0}', '"width" must be a positive multiple of 16 up to 8192, got 0'),
        ('{"prompt": "x", "num_inference_steps": 0}', '"num_inference_steps" must be between 1 and 10000, got 0'),
        (
            '{"prompt": "x", "guidance_scale": NaN}',
            '"guidance_scale" must be a finite number (a 32-bit float), got nan',
        ),
        ('{"prompt": "x", "guidance_scale": 1e999}', '"guidance_scale" must be a finite number'),
        ('{"prompt": "x", "guidance_scale": "high"}', "\"guidance_scale\" must be a number, got 'high'"),
        ('{"prompt": "x", "negative_prompt": 1}', '"negative_prompt" must be a string, got 1'),
        ('{"prompt": "x", "num_frames": 0}', '"num_frames" must be between 1 and 1001, got 0'),
    ],
)
def test_a_bad_line_is_one_line_naming_file_line_and_field(received, tmp_path, line, message):
    prompts = write_lines(tmp_path / "p.jsonl", '{"prompt": "a good line"}', "", line)
    result = invoke("--model-path", "m", "--prompt-file", str(prompts))
    assert result.exit_code == 2 and not received
    assert result.stderr.startswith(f"error: {prompts}:3: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_a_line_that_is_not_utf8_is_named(received, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_bytes('{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    result = invoke("--model-path", "m", "--prompt-file", str(prompts))
    assert result.exit_code == 2 and not received
    assert result.stderr == f"error: {prompts}:2: not UTF-8 text (byte 0xe9 at column 16)\n"


def test_json_lines_files_keep_the_prompt_file_rules(received, tmp_path):
    bom = tmp_path / "bom.JSONL"
    bom.write_text('{"prompt": "a red cube"}\n', encoding="utf-8-sig")
    assert invoke("--model-path", "m", "--prompt-file", str(bom)).exit_code == 0
    assert received[0].prompts == ["a red cube"]
    empty = write_lines(tmp_path / "empty.jsonl", "", "  ")
    result = invoke("--model-path", "m", "--prompt-file", str(empty))
    assert result.exit_code == 2 and "has no prompts" in result.stderr
    many = write_lines(tmp_path / "many.jsonl", *['{"prompt": "a"}'] * (cli.MAX_PROMPTS + 1))
    result = invoke("--model-path", "m", "--prompt-file", str(many))
    assert result.exit_code == 2 and f"has {cli.MAX_PROMPTS + 1} prompts; a run takes at most" in result.stderr
    assert len(received) == 1


def test_a_field_the_model_does_not_take_names_its_line_before_loading(tmp_path):
    prompts = write_lines(tmp_path / "p.jsonl", '{"prompt": "a red circle"}', '{"prompt": "a dot", "num_frames": 9}')
    result = invoke("--model-path", "sgdiff/demo-image", "--prompt-file", str(prompts), "--output-path",
                    str(tmp_path / "out"))  # fmt: skip
    assert result.exit_code == 2, result.output
    assert result.stderr == f'error: {prompts}:2: "num_frames" does not apply to FluxPipeline (an image model)\n'
    assert "loaded" not in result.output and not (tmp_path / "out").exists()
    # a rule that joins a line's field and a flag names both as the user wrote them
    prompts = write_lines(tmp_path / "q.jsonl", '{"prompt": "a red circle", "negative_prompt": "blurry"}')
    result = invoke("--prompt-file", str(prompts), "--output-path", str(tmp_path / "out"))
    assert result.exit_code == 2 and result.stderr.startswith(f'error: {prompts}:1: "negative_prompt" is used only')
    assert "--true-cfg-scale" in result.stderr


SMALL = ["--steps", "2", "--height", "32", "--width", "32", "--device", "cpu", "-q"]


def test_lines_give_what_separate_runs_with_their_flags_give(tmp_path):
    prompts = write_lines(
        tmp_path / "p.jsonl",
        '{"prompt": "a red circle", "seed": 3, "height": 16, "width": 48}',
        '{"prompt": "a blue square", "seed": 5, "num_inference_steps": 1}',
        '{"prompt": "a red circle", "seed": 3}',  # the first line's prompt and seed at the flags' size
    )
    perf = tmp_path / "perf.json"
    result = invoke("--prompt-file", str(prompts), "--output-path", str(tmp_path / "lines"), *SMALL,
                    "--perf-dump-path", str(perf))  # fmt: skip
    assert result.exit_code == 0, result.output
    written = result.stdout.split()
    assert len(set(written)) == 3  # the same prompt and seed at another size: a file of its own
    separate = [
        ["--prompt", "a red circle", "--seed", "3", "--height", "16", "--width", "48"],
        ["--prompt", "a blue square", "--seed", "5", "--steps", "1"],
        ["--prompt", "a red circle", "--seed", "3"],
    ]
    for index, (path, flags) in enumerate(zip(written, separate, strict=True)):
        out = tmp_path / f"run-{index}"
        alone = invoke(*SMALL, *flags, "--output-path", str(out))
        assert alone.exit_code == 0, alone.output
        [expected] = alone.stdout.split()
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(expected)))
        assert read_png_parameters(path) == read_png_parameters(expected)
    assert Image.open(written[0]).size == (48, 16) and read_png_parameters(written[1])["num_inference_steps"] == 1
    assert written[2].rsplit("/", 1)[1] == expected.rsplit("/", 1)[1]  # no fields of its own: --prompt's name
    requests = json.loads(perf.read_text())["requests"]
    assert [(r["seed"], r["height"], r["width"], r["num_inference_steps"]) for r in requests] == [
        (3, 16, 48, 2), (5, 32, 32, 1), (3, 32, 32, 2)
    ]  # fmt: skip


def test_a_line_that_asks_for_frames_picks_the_demo_video_model(tmp_path):
    prompts = write_lines(tmp_path / "p.jsonl", '{"prompt": "a red ball", "num_frames": 5}', '{"prompt": "a dot"}')
    perf = tmp_path / "perf.json"
    result = invoke("--prompt-file", str(prompts), "--no-save-output", "--perf-dump-path", str(perf), *SMALL)
    assert result.exit_code == 0, result.output
    dump = json.loads(perf.read_text())
    assert dump["model"] == "sgdiff/demo-video" and [r["num_frames"] for r in dump["requests"]] == [5, 9]


def test_default_names_tell_lines_of_the_same_prompt_and_seed_apart(tmp_path):
    namer = OutputNamer(tmp_path, None, total_outputs=4)
    plain = namer.next_path("a cat", 7, 0, 1)
    assert namer.next_path("a cat", 7, 0, 1, {}) == plain
    small, large = namer.next_path("a cat", 7, 0, 1, {"height": 32}), namer.next_path("a cat", 7, 0, 1, {"height": 64})
    assert len({plain, small, large}) == 3 and small.name.startswith("a-cat-") and small.name.endswith("_7.png")
    assert namer.next_path("a cat", 7, 0, 1, {"height": 32}) == small  # deterministic

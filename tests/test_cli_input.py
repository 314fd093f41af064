"""The CLI as a translation layer: what the library receives, and one-line errors for bad input."""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgdiff import __version__
from sgdiff.cli import main as cli
from sgdiff.cli.options import TorchCompileModeChoice
from sgdiff.config import COMPILE_MODES, SpeedConfig
from sgdiff.errors import UserError

runner = CliRunner()


@pytest.fixture
def received(monkeypatch):
    """Capture the BatchRequest instead of running it."""
    calls = []
    monkeypatch.setattr(cli, "run", lambda request, quiet: calls.append((request, quiet)))
    return calls


def invoke(*args: str):
    return runner.invoke(cli.app, ["generate", *args])


def test_version():
    result = runner.invoke(cli.app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"sgdiff {__version__}"


def test_only_explicit_flags_reach_the_library(received):
    result = invoke("--model-path", "m", "--prompt", "a cat", "--steps", "7", "--seed", "42", "--height", "512")
    assert result.exit_code == 0, result.output
    request, quiet = received[0]
    # --seed 42 equals the default but was given, so it is passed on explicitly
    assert request.sampling_flags == {"num_inference_steps": 7, "seed": 42, "height": 512}
    assert request.prompts == ["a cat"] and request.model_path == "m" and quiet is False
    assert request.output.save_output is True and request.output.output_path == Path("outputs")


def test_every_flag_maps_to_the_request(received, tmp_path):
    flags = (
        "--model-path owner/model --prompt p --negative-prompt blurry --width 768 --num-inference-steps 3 "
        "--guidance-scale 0 --true-cfg-scale 4 --generator-device cuda --num-outputs-per-prompt 2 "
        "--max-sequence-length 128 --preset flux.1-schnell --no-save-output --output-file-name x --quiet "
        "--dtype bf16 --device cpu"
    ).split()
    result = invoke(*flags, "--output-path", str(tmp_path), "--perf-dump-path", str(tmp_path / "perf.json"))
    assert result.exit_code == 0, result.output
    request, quiet = received[0]
    assert request.sampling_flags == {
        "negative_prompt": "blurry",
        "width": 768,
        "num_inference_steps": 3,
        "guidance_scale": 0.0,
        "true_cfg_scale": 4.0,
        "generator_device": "cuda",
        "num_outputs_per_prompt": 2,
        "max_sequence_length": 128,
    }
    assert request.preset == "flux.1-schnell" and quiet is True
    assert (request.runtime.dtype, request.runtime.device) == ("bf16", "cpu")
    out = request.output
    assert (out.save_output, out.output_path, out.output_file_name) == (False, tmp_path, "x")
    assert out.perf_dump_path == tmp_path / "perf.json"


def test_speed_flags_map_to_the_speed_config(received):
    result = invoke("--model-path", "m", "--prompt", "p")
    assert result.exit_code == 0, result.output
    assert received[0][0].runtime.speed == SpeedConfig()
    flags = "--attention-backend flex --enable-fused-projections --enable-fused-gelu --enable-fused-norms "
    flags += "--enable-torch-compile --enable-cuda-graph"
    result = invoke("--model-path", "m", "--prompt", "p", *flags.split())
    assert result.exit_code == 0, result.output
    assert received[1][0].runtime.speed == SpeedConfig("flex", True, True, True, True, True)
    flags = "--disable-fused-projections --disable-fused-gelu --disable-fused-norms"
    result = invoke("--model-path", "m", "--prompt", "p", *flags.split())
    assert result.exit_code == 0, result.output
    assert received[2][0].runtime.speed == SpeedConfig(fused_projections=False, fused_gelu=False, fused_norms=False)
    result = invoke("--model-path", "m", "--prompt", "p", "--dit-precision", "fp8")
    assert result.exit_code == 0, result.output
    assert received[3][0].runtime.speed == SpeedConfig(dit_precision="fp8")
    flags = "--enable-torch-compile --torch-compile-mode just-in-time"
    result = invoke("--model-path", "m", "--prompt", "p", *flags.split())
    assert result.exit_code == 0, result.output
    assert received[4][0].runtime.speed == SpeedConfig(torch_compile=True, torch_compile_mode="just-in-time")


def test_a_compile_mode_without_compile_is_refused_in_one_line(received):
    result = invoke("--model-path", "m", "--prompt", "p", "--torch-compile-mode", "ahead")
    assert result.exit_code == 2 and not received
    assert result.output == (
        "error: --torch-compile-mode ahead says how blocks are compiled: give --enable-torch-compile too\n"
    )
    assert tuple(choice.value for choice in TorchCompileModeChoice) == COMPILE_MODES
    with pytest.raises(UserError, match="torch_compile_mode 'later' is not one of ahead, just-in-time"):
        SpeedConfig(torch_compile=True, torch_compile_mode="later")


def test_prompt_file_gives_one_prompt_per_non_blank_line(received, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\n  a blue sphere  \n")
    result = invoke("--model-path", "m", "--prompt-file", str(prompts))
    assert result.exit_code == 0, result.output
    assert received[0][0].prompts == ["a red cube", "a blue sphere"]


NO_CONTROL = "{} must not hold line breaks or control characters (found {})"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "p", "--height", "1000"], "--height must be a positive multiple of 16 up to 8192, got 1000"),
        (["--prompt", "p", "--width", "-16"], "--width must be a positive multiple of 16 up to 8192, got -16"),
        (["--prompt", "p", "--width", "160000"], "--width must be a positive multiple of 16 up to 8192"),
        (["--prompt", "p", "--seed", "-1"], "--seed must be between 0 and 18446744073709551615"),
        (["--prompt", "p", "--seed", "99999999999999999999"], "--seed must be between 0 and"),
        (
            ["--prompt", "p", "--max-sequence-length", "2000"],
            "--max-sequence-length must be between 1 and 512 for flux, hunyuan_video and wan models; must be "
            "between 1 and 1000 for hunyuan_video15 models; must be between 1 and 1024 for qwen_image models; got 2000",
        ),
        (["--prompt", "p", "--num-frames", "100001"], "--num-frames must be between 1 and 1001"),
        (["--prompt", "p", "--num-frames", "0"], "--num-frames must be between 1 and 1001"),
        (["--prompt", "p", "--fps", "0"], "--fps must be between 1 and 240"),
        (["--prompt", "p", "--output-file-name", ".png"], "--output-file-name needs a name before the extension"),
        (["--prompt", "p", "--output-file-name", " "], "--output-file-name needs a name before the extension"),
        (["--prompt", "p", "--output-file-name", "x" * 300], "--output-file-name is too long"),
        (["--prompt-file", "."], "--prompt-file . is a folder"),
        (["--prompt", "p", "--steps", "0"], "--num-inference-steps must be between 1 and 10000, got 0"),
        (["--prompt", "p", "--num-outputs-per-prompt", "0"], "--num-outputs-per-prompt must be between 1 and 64"),
        (["--prompt", "p", "--steps", "1000000000000"], "--num-inference-steps must be between 1 and 10000"),
        (["--prompt", "p", "--num-outputs-per-prompt", "100000"], "--num-outputs-per-prompt must be between 1 and 64"),
        (["--prompt", "p", "--true-cfg-scale", "0.5"], "--true-cfg-scale must be >= 1"),
        (
            ["--prompt", "p", "--guidance-scale", "inf"],
            "--guidance-scale must be a finite number (a 32-bit float), got inf",
        ),
        (
            ["--prompt", "p", "--true-cfg-scale", "-inf"],
            "--true-cfg-scale must be a finite number (a 32-bit float), got -inf",
        ),
        (["--prompt", "p", "--guidance-scale", "1e308"], "--guidance-scale must be a finite number (a 32-bit float)"),
        (["--prompt", "p", "--flow-shift", "nan"], "--flow-shift must be a finite number (a 32-bit float), got nan"),
        (["--prompt", "p", "--generator-device", "gpu"], "--generator-device must be 'cpu' or 'cuda'"),
        (["--prompt", "  "], "--prompt is empty"),
        ([], "pass --prompt TEXT or --prompt-file FILE"),
        (["--prompt", "p", "--prompt-file", "x.txt"], "give --prompt or --prompt-file, not both"),
        (["--prompt-file", "does-not-exist.txt"], "--prompt-file does-not-exist.txt does not exist"),
        (["--prompt", "p", "--output-file-name", "a/b.png"], "--output-file-name takes a plain file name"),
        # one path per line on stdout: a line break or control character in a name would break it
        (["--prompt", "p", "--output-file-name", "a\nb.png"], NO_CONTROL.format("--output-file-name", r"'\n'")),
        (["--prompt", "p", "--output-file-name", "a\tb"], NO_CONTROL.format("--output-file-name", r"'\t'")),
        (["--prompt", "p", "--output-file-name", "\x1b[31mred"], NO_CONTROL.format("--output-file-name", r"'\x1b'")),
        (["--prompt", "p", "--output-file-name", "a\u2028b"], NO_CONTROL.format("--output-file-name", r"'\u2028'")),
        (["--prompt", "p", "--output-path", "out\rdir"], NO_CONTROL.format("--output-path", r"'\r'")),
    ],
)
def test_bad_input_is_one_line_with_exit_code_2(received, args, message):
    result = invoke("--model-path", "m", *args)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert not received  # nothing ran


def test_empty_prompt_file_is_refused(received, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    result = invoke("--model-path", "m", "--prompt-file", str(empty))
    assert result.exit_code == 2 and "has no prompts" in result.stderr


def test_output_places_are_checked_before_anything_runs(received, tmp_path):
    file = tmp_path / "f"
    file.write_text("")
    cases = [
        (["--output-path", str(file)], "is a file; give a folder"),
        (["--output-path", str(file / "sub")], f"{file} is a file, not a folder"),
        (["--perf-dump-path", str(tmp_path)], "is a folder; give a file path"),
        (["--perf-dump-path", str(file / "perf.json")], f"{file} is a file, not a folder"),
    ]
    for args, message in cases:
        result = invoke("--model-path", "m", "--prompt", "p", *args)
        assert result.exit_code == 2 and message in result.stderr, args
    assert not received
    # without saving, the output folder is never written, so it is not checked
    assert invoke("--model-path", "m", "--prompt", "p", "--no-save-output", "--output-path", str(file)).exit_code == 0


def one_line_usage_error(result, pattern: str) -> None:
    assert result.exit_code == 2, result.output
    assert re.fullmatch(f"error: {pattern}\n", result.stderr), result.stderr
    assert result.stdout == "" and "Traceback" not in result.output


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_output_places_are_probed_before_loading(received, tmp_path):
    """Each place is tried (a temp file made and removed there) before the model loads: a place the
    checks of names and types pass but the file system refuses ends the run up front, exit 2."""
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    broken = tmp_path / "broken"
    nowhere = tmp_path / "nowhere"
    broken.symlink_to(nowhere)
    long_name = "p" * 300
    cases = [
        (
            ["--output-path", "/proc/x"],
            r"--output-path /proc/x: (cannot create the folder /proc/x|/proc is not writable)",
        ),
        (["--output-path", "/proc"], r"--output-path /proc(: cannot create files in /proc| is not writable)"),
        (
            ["--perf-dump-path", "/proc/p.json"],
            r"--perf-dump-path /proc/p.json: (cannot create files in /proc|/proc is not writable)",
        ),
        (["--output-path", str(loop)], f"--output-path {re.escape(str(loop))} is a symbolic link loop"),
        (
            ["--output-path", str(loop / "sub")],
            f"--output-path {re.escape(str(loop / 'sub'))}: {re.escape(str(loop))} is a symbolic link loop",
        ),
        (
            ["--perf-dump-path", str(loop / "p.json")],
            f"--perf-dump-path {re.escape(str(loop / 'p.json'))}: {re.escape(str(loop))} is a symbolic link loop",
        ),
        (
            ["--output-path", str(broken)],
            f"--output-path {re.escape(str(broken))} is a broken symbolic link \\(to {re.escape(str(nowhere))}\\)",
        ),
        (
            ["--perf-dump-path", str(tmp_path / f"{long_name}.json")],
            r"--perf-dump-path: the file name is too long \(at most 200 bytes\)",
        ),
        (
            ["--output-path", str(tmp_path / long_name)],
            f"--output-path {re.escape(str(tmp_path / long_name))}: the path or a name in it is too long",
        ),
    ]
    for args, pattern in cases:
        one_line_usage_error(invoke("--model-path", "m", "--prompt", "p", *args), pattern)
    assert not received
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "loop"]  # nothing made, nothing left


def test_probing_output_places_leaves_nothing(received, tmp_path):
    """Folders that do not exist yet are made to be tried, then removed: the run makes them when it writes."""
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "old.png").write_bytes(b"old")
    for out, perf in [(tmp_path / "a" / "b" / "c", tmp_path / "p" / "q" / "perf.json"), (tmp_path / "kept", None)]:
        perf_args = ["--perf-dump-path", str(perf)] if perf else []
        result = invoke("--model-path", "m", "--prompt", "p", "--output-path", str(out), *perf_args)
        assert result.exit_code == 0, result.output
    assert len(received) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["old.png"]


def test_prompt_file_may_be_a_pipe(received, tmp_path):
    """Shell scripts pass prompts as --prompt-file <(grep cat prompts.txt) or /dev/stdin: a FIFO."""
    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("a red cube\n\na blue cone\n"))
    writer.start()
    result = invoke("--model-path", "m", "--prompt-file", str(fifo))
    writer.join()
    assert result.exit_code == 0, result.output
    assert received[0][0].prompts == ["a red cube", "a blue cone"]
    result = invoke("--model-path", "m", "--prompt-file", os.devnull)
    assert result.exit_code == 2 and "has no prompts" in result.stderr


def test_prompt_file_byte_order_mark_is_dropped(received, tmp_path):
    prompts = tmp_path / "bom.txt"
    prompts.write_text("a red cube\n", encoding="utf-8-sig")
    assert invoke("--model-path", "m", "--prompt-file", str(prompts)).exit_code == 0
    assert received[0][0].prompts == ["a red cube"]


def test_prompt_file_that_is_not_utf8(received, tmp_path):
    prompts = tmp_path / "latin1.txt"
    prompts.write_bytes("caf\xe9".encode("latin-1"))
    result = invoke("--model-path", "m", "--prompt-file", str(prompts))
    assert result.exit_code == 2 and "is not UTF-8 text" in result.stderr


def test_missing_local_model_path_says_so(tmp_path):
    missing = tmp_path / "nope"
    result = invoke("--model-path", str(missing), "--prompt", "p")
    assert result.exit_code == 2
    assert f"--model-path {missing} does not exist" in result.stderr
    assert "Traceback" not in result.output


def test_folder_without_model_index_is_refused(tmp_path):
    result = invoke("--model-path", str(tmp_path), "--prompt", "p")
    assert result.exit_code == 2 and "has no model_index.json" in result.stderr


def test_unsupported_pipeline_is_named(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    result = invoke("--model-path", str(tmp_path), "--prompt", "p")
    assert result.exit_code == 2
    assert "pipeline 'StableDiffusionPipeline'" in result.stderr and "FluxPipeline" in result.stderr


def test_debug_variable_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("SGDIFF_DEBUG", "1")
    result = invoke("--model-path", str(tmp_path / "nope"), "--prompt", "p")
    assert result.exit_code == 2  # still bad input: the same exit code as without the variable
    assert "Traceback (most recent call last)" in result.stderr and "sgdiff.errors.UserError" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")


def test_a_prompt_file_over_the_limit_is_refused_before_planning(received, tmp_path):
    prompts = tmp_path / "many.txt"
    prompts.write_text("a red circle\n" * (cli.MAX_PROMPTS + 1))
    result = invoke("--prompt-file", str(prompts))
    assert result.exit_code == 2 and not received
    assert result.output.strip() == (
        f"error: --prompt-file {prompts} has {cli.MAX_PROMPTS + 1} prompts; a run takes at most {cli.MAX_PROMPTS}: "
        "split it"
    )


def test_a_value_one_family_takes_waits_for_the_model_s_own_check(tiny_flux_dev, tmp_path):
    """--max-sequence-length 600: more than FLUX's T5 takes, within Qwen-Image's 1024. Not refused before
    the model is known; refused for a FLUX checkpoint, before any weight loads, in one line."""
    from sgdiff.pipeline.registry import check_given_values

    check_given_values({"max_sequence_length": 600})
    result = invoke("--model-path", str(tiny_flux_dev), "--prompt", "p", "--max-sequence-length", "600",
                    "--output-path", str(tmp_path))  # fmt: skip
    assert result.exit_code == 2 and "max-sequence-length must be between 1 and 512, got 600" in result.stderr
    assert list(tmp_path.iterdir()) == []

"""A multi-process run ends cleanly: a killed worker, a worker's exception or Ctrl-C stops every
process within seconds with one clear line; bad parallel flags fail before anything starts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.config import ParallelConfig
from sgdiff.errors import UserError
from sgdiff.parallel.plans import check_heads

runner = CliRunner()
SMALL = ["--height", "32", "--width", "32", "--device", "cpu", "--quiet"]


# A terminal starts a command with Ctrl-C's default action; a test run started in the background of a
# script (`pytest &`, nohup) inherits SIGINT ignored, and Python then leaves it ignored: restore the default.
AS_A_TERMINAL_STARTS_IT = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)"


def sgdiff_process(*args: str, env: dict | None = None) -> subprocess.Popen:
    """`sgdiff generate` in a process group of its own (as a terminal runs it: Ctrl-C reaches the group)."""
    command = [sys.executable, "-c", f"{AS_A_TERMINAL_STARTS_IT}; from sgdiff.cli.main import main; main()",
               "generate", *args]  # fmt: skip
    env = {**os.environ, "SGDIFF_DEBUG": "", **(env or {})}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )


def started_workers(process: subprocess.Popen, count: int = 1, timeout: float = 60) -> list[psutil.Process]:
    """The front's worker processes as soon as `count` of them exist (still starting up)."""
    parent = psutil.Process(process.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = [p for p in parent.children() if "spawn_main" in " ".join(p.cmdline())]
        if len(workers) >= count:
            return workers
        time.sleep(0.05)
    raise AssertionError("the workers did not start")


def all_ended(workers: list[psutil.Process]) -> bool:
    return not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def wait_for_workers(process: subprocess.Popen, count: int, timeout: float = 60) -> list[psutil.Process]:
    """The front's worker processes, once `count` of them run the denoising loop (a few seconds in)."""
    parent = psutil.Process(process.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = [p for p in parent.children() if "spawn_main" in " ".join(p.cmdline())]
        if len(workers) >= count:
            time.sleep(8)  # past start-up and loading: the ranks are inside collectives
            return workers
        time.sleep(0.2)
    raise AssertionError("the workers did not start")


def ended_within(process: subprocess.Popen, seconds: float) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=seconds)
    return process.returncode, stderr


@pytest.fixture
def long_run(tiny_flux_dev, tmp_path):
    """A 2-process run long enough to interrupt (many steps)."""
    (tmp_path / "tmp").mkdir()
    out = tmp_path / "out"
    process = sgdiff_process(
        "--model-path", str(tiny_flux_dev), "--prompt", "a red cube", *SMALL, "--steps", "5000",
        "--num-gpus", "2", "--output-path", str(out), env={"TMPDIR": str(tmp_path / "tmp")},
    )  # fmt: skip
    out.mkdir(exist_ok=True)
    yield process, out
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.mark.slow
def test_a_killed_worker_ends_the_run(long_run):
    process, out = long_run
    workers = wait_for_workers(process, 2)
    workers[1].send_signal(signal.SIGKILL)
    code, stderr = ended_within(process, 15)
    assert code == 1
    assert re.fullmatch(r"error: worker [01] was killed by SIGKILL; every worker was stopped\n", stderr), stderr
    assert "Traceback" not in stderr
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert list(out.iterdir()) == []  # nothing half-written


@pytest.mark.slow
def test_ctrl_c_ends_every_process(long_run):
    process, out = long_run
    workers = wait_for_workers(process, 2)
    process.send_signal(signal.SIGINT)
    code, stderr = ended_within(process, 15)
    assert code == 130 and stderr.strip().splitlines()[-1] == "interrupted"
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert list(out.iterdir()) == []


def two_process_run(model, out, sitecustomize: str) -> subprocess.Popen:
    """A 2-step, 2-process run whose processes (front and workers) first run `sitecustomize`
    (Python imports it at start-up from PYTHONPATH): a way to slow one moment down."""
    site = out.parent / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(sitecustomize)
    return sgdiff_process(
        "--model-path", str(model), "--prompt", "a red cube", *SMALL, "--steps", "2", "--num-gpus", "2",
        "--output-path", str(out), env={"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])},
    )  # fmt: skip


def test_ctrl_c_while_the_workers_start_shows_no_traceback(tiny_flux_dev, tmp_path):
    """A terminal's Ctrl-C reaches every process of the group, the workers too, while they still start
    up (made slow here: 3 s in each worker's sitecustomize, where Python already turns SIGINT into
    KeyboardInterrupt)."""
    out = tmp_path / "out"
    slow_start = "import time\nif b'spawn_main' in open('/proc/self/cmdline', 'rb').read():\n    time.sleep(3)\n"
    process = two_process_run(tiny_flux_dev, out, sitecustomize=slow_start)
    try:
        workers = started_workers(process, 2)
        time.sleep(1)  # inside the slow start-up
        os.killpg(process.pid, signal.SIGINT)
        code, stderr = ended_within(process, 15)
    finally:
        process.kill()
        process.wait()
    assert code == 130 and stderr.strip().splitlines() == ["interrupted"], stderr
    assert all_ended(workers) and not out.exists()


@pytest.mark.slow
def test_sigterm_ends_every_process_and_leaves_nothing(long_run, tmp_path):
    process, out = long_run
    workers = wait_for_workers(process, 2)
    process.send_signal(signal.SIGTERM)
    code, stderr = ended_within(process, 15)
    assert code == 143 and stderr.strip().splitlines()[-1] == "terminated", stderr
    assert all_ended(workers) and list(out.iterdir()) == []
    assert list((tmp_path / "tmp").iterdir()) == []  # the workers' rendezvous folder is gone too


@pytest.mark.slow
def test_a_worker_dying_at_start_with_a_big_prompt_file_ends_the_run(tiny_flux_dev, tmp_path):
    """A worker dying while the pool starts ends the run at once, with 20000 prompts (~0.4 MB) queued."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(20000)))
    process = sgdiff_process(
        "--model-path", str(tiny_flux_dev), "--prompt-file", str(prompts), *SMALL, "--steps", "2",
        "--num-gpus", "2", "--output-path", str(tmp_path / "out"),
    )  # fmt: skip
    try:
        started_workers(process, 1)[0].send_signal(signal.SIGKILL)
        code, stderr = ended_within(process, 30)
    finally:
        process.kill()
        process.wait()
    assert code == 1 and re.fullmatch(r"error: worker [01] was killed by SIGKILL; every worker was stopped\n", stderr)


@pytest.mark.slow
def test_ctrl_c_while_rank_0_saves_leaves_no_partial_file(tiny_flux_dev, tmp_path):
    """The front process writes the outputs: interrupted inside a save (made slow here), it removes
    its partial file on the way out and stops its workers by SIGTERM."""
    out = tmp_path / "out"
    slow_save = (
        "import time\nfrom PIL import Image\nsave = Image.Image.save\n"
        "def slow_save(self, *args, **kwargs):\n    save(self, *args, **kwargs)\n    time.sleep(60)\n"
        "Image.Image.save = slow_save\n"
    )
    process = two_process_run(tiny_flux_dev, out, sitecustomize=slow_save)
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and list(out.glob(".sgdiff-*.part.png"))) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(out.glob(".sgdiff-*.part.png")), "rank 0 never started to save"
        workers = started_workers(process, 2)
        process.send_signal(signal.SIGINT)
        code, stderr = ended_within(process, 15)
    finally:
        process.kill()
        process.wait()
    assert code == 130 and stderr.strip().splitlines()[-1] == "interrupted", stderr
    assert all_ended(workers) and not out.exists()  # nor the folder the save made


def test_an_exception_in_the_workers_is_one_line(tiny_flux_dev, tmp_path):
    """Weights that do not fit the model are found only while the workers load them."""
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(tiny_flux_dev), str(broken)], check=True)
    shard = sorted((broken / "transformer").glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].flatten()[:-1]  # a wrong shape
    save_file(tensors, shard, metadata={"format": "pt"})
    process = sgdiff_process(
        "--model-path", str(broken), "--prompt", "a red cube", *SMALL, "--steps", "2", "--num-gpus", "2",
        "--output-path", str(tmp_path / "out"),
    )  # fmt: skip
    code, stderr = ended_within(process, 60)
    assert code in (1, 2)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], stderr


@pytest.mark.parametrize(
    "config, message",
    [
        (ParallelConfig(3, enable_cfg_parallel=True), "needs an even num_gpus"),
        (ParallelConfig(4, ulysses_degree=3), "must divide num_gpus 4 = 4 sequence-parallel ranks"),
        (ParallelConfig(4, ring_degree=8), "must divide num_gpus"),
        (ParallelConfig(8, ulysses_degree=2, ring_degree=2), "multiply to num_gpus"),
        (ParallelConfig(4, ulysses_degree=0), "must be at least 1"),
        (ParallelConfig(8, ulysses_degree=2, ring_degree=2, enable_cfg_parallel=True), None),
    ],
)
def test_parallel_degrees_must_multiply_to_the_process_count(config, message):
    if message is None:
        resolved = config.resolved()
        assert (resolved.ulysses_degree, resolved.ring_degree, resolved.cfg_degree) == (2, 2, 2)
        return
    with pytest.raises(UserError, match=message):
        config.resolved()


@pytest.mark.parametrize(
    "heads, ulysses, ring, advice",
    [
        (5, 2, 1, "pass ring_degree 2 ("),
        (6, 4, 1, "pass ulysses_degree 2 ring_degree 2"),
        (6, 4, 2, "pass ulysses_degree 2 ring_degree 4"),
    ],
)
def test_heads_error_names_a_split_that_fits(heads, ulysses, ring, advice):
    with pytest.raises(UserError, match=f"must divide the model's {heads} attention heads") as caught:
        check_heads(heads, ulysses, ring)
    assert advice in str(caught.value)
    check_heads(heads, 1, ulysses * ring)  # the ring alone always fits


def test_degrees_default_as_sglang():
    assert ParallelConfig(4).resolved() == ParallelConfig(4, 4, 1, False)
    assert ParallelConfig(4, enable_cfg_parallel=True).resolved() == ParallelConfig(4, 2, 1, True)
    assert ParallelConfig(4, ring_degree=2).resolved() == ParallelConfig(4, 2, 2, False)
    assert ParallelConfig(4, ulysses_degree=2).resolved() == ParallelConfig(4, 2, 2, False)


@pytest.mark.parametrize(
    "flags, message",
    [
        # tiny FLUX has 4 heads: the error names the Ulysses x ring split of 6 ranks that fits them
        (
            ["--num-gpus", "6"],
            "must divide the model's 4 attention heads; for 6 sequence-parallel ranks pass "
            "--ulysses-degree 2 --ring-degree 3",
        ),
        (["--num-gpus", "2", "--enable-cfg-parallel"], "runs without CFG"),
        (["--num-gpus", "2", "--ring-degree", "3"], "must divide --num-gpus 2"),
        (
            ["--num-gpus", "4"],  # (usable_cores is 2 here): four copies of the model on two cores
            "--num-gpus 4 CPU processes, but this machine gives sgdiff 2 cores: each process holds a copy of the "
            "model and they wait on each other at every step; give at most 2 (or set "
            "SGDIFF_ALLOW_MORE_PROCESSES_THAN_CORES=1 to start them anyway)",
        ),
    ],
)
def test_bad_parallel_requests_fail_before_starting(tiny_flux_dev, tmp_path, flags, message, monkeypatch):
    monkeypatch.setattr("sgdiff.engine.service.usable_cores", lambda: 2)
    monkeypatch.delenv("SGDIFF_ALLOW_MORE_PROCESSES_THAN_CORES", raising=False)
    model = ["--model-path", str(tiny_flux_dev)]
    before = {child.pid for child in psutil.Process().children()}  # (multiprocessing's resource tracker stays)
    result = runner.invoke(app, ["generate", *model, "--prompt", "p", *SMALL, *flags, "--output-path", str(tmp_path)])
    assert result.exit_code == 2 and message in result.output, result.output
    assert {child.pid for child in psutil.Process().children()} <= before  # no worker was started


SIGTERM_IN_A_FINALISER = """
import signal, sys, time
from sgdiff.errors import Terminated, raise_on_sigterm
raise_on_sigterm()

class Finalised:
    def __del__(self):
        signal.raise_signal(signal.SIGTERM)  # the handler runs inside this finaliser
        sum(range(1000))

try:
    finalised = Finalised()
    del finalised
    time.sleep(10)  # the process goes on working; the SIGTERM comes again meanwhile
    print("went on")
except Terminated:
    print("terminated")
"""


def test_a_sigterm_that_lands_in_a_finaliser_still_ends_the_process_quietly():
    """Python swallows an exception raised inside `__del__` (printing 'Exception ignored in ...'): a
    SIGTERM whose handler ran there must still end the process, without that text on stderr."""
    done = subprocess.run([sys.executable, "-c", SIGTERM_IN_A_FINALISER], capture_output=True, text=True, timeout=60)
    assert (done.stdout, done.stderr) == ("terminated\n", "")


@pytest.mark.slow
@pytest.mark.parametrize("when", ["while the workers start", "while they denoise"])
def test_a_killed_front_takes_its_workers_and_their_rendezvous_along(long_run, tmp_path, when):
    """SIGKILL leaves the front no say: its workers see it gone (whatever they are doing, however early)
    and end within seconds, removing the rendezvous file (none is made by workers that end before it)."""
    process, _ = long_run
    workers = started_workers(process, 2) if when == "while the workers start" else wait_for_workers(process, 2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)  # (not its pipes: the workers hold them until they end)
    deadline = time.monotonic() + 60  # a worker still importing torch on a busy machine sees it once imported
    while not all_ended(workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all_ended(workers), [w.pid for w in workers if w.is_running()]
    deadline = time.monotonic() + 10  # removed just after the last worker ended (by a child it left)
    while list((tmp_path / "tmp").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.slow
def test_sigterm_inside_one_long_kernel_ends_the_run_at_once(tmp_path):
    """One process, its engine thread inside a single step that takes minutes (the demo model at 4096²
    on the CPU): SIGTERM ends the run within seconds, 143 and 'terminated', without waiting for the step
    and without C++'s 'terminate called without an active exception' abort (exit 134) on the way out."""
    out = tmp_path / "out"
    process = sgdiff_process(
        "--prompt", "a red cube", "--height", "4096", "--width", "4096", "--steps", "1", "--device", "cpu",
        "--output-path", str(out),
    )  # fmt: skip
    try:
        time.sleep(10)  # start-up and loading take ~3 s here; then the one step runs for over a minute
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGTERM)
        code, stderr = ended_within(process, 6)
    finally:
        process.kill()
        process.wait()
    assert code == 143 and stderr.strip().splitlines()[-1] == "terminated", stderr
    assert "terminate called" not in stderr
    assert not out.exists() or list(out.iterdir()) == []

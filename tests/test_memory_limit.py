"""--gpu-memory-limit: a size as people write it, refused where there is no GPU to cap, applied as torch's
per-process memory fraction before the first weight loads; and the bench's memory flags (--e2e passes them
to `sgdiff generate`)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from sgdiff.cli.main import app
from sgdiff.config import RuntimeConfig
from sgdiff.engine.memory import cap_gpu_memory, parse_size
from sgdiff.engine.runner import ModelRunner
from sgdiff.errors import UserError

runner = CliRunner()


@pytest.mark.parametrize(
    "text, expected",
    [("24GiB", 24 * 2**30), ("24G", 24 * 2**30), ("24GB", 24 * 10**9), (" 500 MiB ", 500 * 2**20),
     ("1.5gib", 3 * 2**29), ("800MB", 800 * 10**6)],
)  # fmt: skip
def test_sizes_read_as_people_write_them(text, expected):
    assert parse_size(text, "gpu_memory_limit") == expected


@pytest.mark.parametrize("text", ["24", "GiB", "24 TB", "-3GiB", "0GiB", "24GiBs"])
def test_a_size_without_a_known_unit_is_refused_by_name(text):
    with pytest.raises(UserError, match=r"gpu_memory_limit takes a size such as 24GiB, 24GB or 500MiB, got"):
        parse_size(text, "gpu_memory_limit")


@pytest.mark.parametrize(
    "value, message",
    [("24", "error: --gpu-memory-limit takes a size such as 24GiB, 24GB or 500MiB, got '24'"),
     ("24GiB", "error: --gpu-memory-limit caps a CUDA GPU's memory, but this run is on the cpu: drop it")],
)  # fmt: skip
def test_generate_refuses_a_cap_it_cannot_apply_in_one_line(tmp_path, value, message):
    out = tmp_path / "out"
    args = ["generate", "--prompt", "a red cube", "--device", "cpu", "--gpu-memory-limit", value,
            "--output-path", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.output.strip() == message, result.output
    assert not out.exists()


def fraction_set(calls: list):
    """torch.cuda.set_per_process_memory_fraction's stand-in: its own check of the device (an index, or a
    device that names one: a bare "cuda" is refused, as on a GPU), then the call recorded."""

    def set_fraction(fraction, device):
        calls.append((fraction, torch.cuda._utils._get_device_index(device)))

    return set_fraction


@pytest.mark.parametrize("gpu, index", [(torch.device("cuda"), 0), (torch.device("cuda", 1), 1)])
def test_the_cap_is_the_limit_as_a_share_of_the_gpu(monkeypatch, gpu, index):
    """torch caps a process by a fraction of the device's memory: limit / total, on the GPU the run uses (a
    bare "cuda": the current one); a cap above the card's memory is refused."""
    calls: list = []
    total = 80 * 2**30
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": total}))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", fraction_set(calls))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert cap_gpu_memory(gpu, 24 * 2**30) == 24 * 2**30 and calls == [(0.3, index)]
    assert cap_gpu_memory(gpu, None) is None and len(calls) == 1
    with pytest.raises(UserError, match=r"gpu_memory_limit 96.0 GiB is more than the GPU's 80.0 GiB"):
        cap_gpu_memory(gpu, 96 * 2**30)


def test_the_cap_is_applied_before_the_first_weight_loads(tiny_flux_dev, monkeypatch):
    model = ModelRunner(str(tiny_flux_dev), runtime=RuntimeConfig(device="cpu"))
    model.gpu_memory_limit = 2**30  # (a CPU run refuses a cap: as a GPU run would hold it)
    seen = []
    monkeypatch.setattr("sgdiff.engine.runner.cap_gpu_memory", lambda device, limit: seen.append(model.pipeline))
    model.load()
    assert seen == [None] and model.pipeline is not None


def test_bench_passes_the_memory_flags_to_sgdiff_generate_under_e2e(monkeypatch, tmp_path):
    given = {}
    monkeypatch.setattr("sgdiff.bench.end_to_end.run_end_to_end", lambda *a, **kw: given.update(kw) or {})
    monkeypatch.setattr("sgdiff.bench.end_to_end.render_end_to_end", lambda result: "")
    args = ["bench", "--model", "flux.1-dev", "--e2e", "--tiny", "--checkpoint-dir", str(tmp_path), "--vae-tiling",
            "--cpu-offload", "layers", "--offload-prefetch", "2", "--gpu-memory-limit", "12GiB"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert given["speed_flags"] == ["--vae-tiling", "--cpu-offload", "layers", "--offload-prefetch", "2",
                                    "--gpu-memory-limit", "12GiB"]  # fmt: skip


def test_bench_without_e2e_refuses_offload_and_tiling():
    result = runner.invoke(app, ["bench", "--model", "flux.1-dev", "--tiny", "--cpu-offload", "components"])
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: --vae-tiling and --cpu-offload run with --e2e (`sgdiff generate` applies them); the per-forward "
        "bench builds sgdiff's transformer on diffusers' weights, on the GPU"
    )

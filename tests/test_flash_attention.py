"""`--attention-backend fa` and `auto`'s measured choice (sgdiff/speed/flash_attention.py, auto_attention.py),
on the CPU: FlashAttention's packages are stand-ins put in sys.modules, the GPU's compute capability is
monkeypatched, and the timer is made up."""

from __future__ import annotations

import importlib.machinery
import json
import logging
import os
import sys
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sgdiff.cache import cache_root
from sgdiff.errors import UserError
from sgdiff.models.attention import sdpa_attention
from sgdiff.speed import auto_attention, flash_attention
from sgdiff.speed.attention_backends import attention_backend
from sgdiff.speed.attention_picks import PickStore
from sgdiff.speed.auto_attention import MeasuredAttention, measured_winner
from sgdiff.speed.compile import CONSTANTS
from sgdiff.speed.wave_split import wave_split_attention

CUDA, BF16 = torch.device("cuda"), torch.bfloat16
PACKAGES = {  # kernel -> (module with flash_attn_func, the marker module found to say it is installed)
    "fa4": ("flash_attn.cute", "flash_attn.cute"),
    "fa3": ("flash_attn_interface", "flash_attn_interface"),
    "fa2": ("flash_attn", "flash_attn_2_cuda"),
}


class FakeFlash:
    """Stand-ins for the FlashAttention packages: each records its calls and returns a tensor of its own
    (FA4 as (out, lse), as flash_attn.cute's flash_attn_func does)."""

    def __init__(self, monkeypatch, *kernels: str):
        self.calls: list[tuple[str, tuple, ...]] = []
        self.outputs: dict[str, torch.Tensor] = {}
        for kernel in kernels:
            module, marker = PACKAGES[kernel]
            monkeypatch.setitem(sys.modules, module, self.module(module, kernel))
            if marker != module:
                monkeypatch.setitem(sys.modules, marker, self.module(marker, None))

    def module(self, name: str, kernel: str | None) -> types.ModuleType:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        if kernel is not None:

            def flash_attn_func(q, k, v):
                self.calls.append((kernel, q.shape, k.shape, v.shape))
                out = self.outputs[kernel] = torch.full_like(q, float(len(self.calls)))
                return (out, None) if kernel == "fa4" else out

            module.flash_attn_func = flash_attn_func
        return module


def on_gpu(monkeypatch, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


@pytest.mark.parametrize(
    ("installed", "capability", "expected"),
    [
        (("fa4", "fa3", "fa2"), (9, 0), "fa4"),  # Hopper
        (("fa4", "fa3", "fa2"), (10, 0), "fa4"),  # Blackwell
        (("fa4", "fa3", "fa2"), (8, 6), "fa2"),  # Ampere: neither FA4 nor FA3
        (("fa3", "fa2"), (9, 0), "fa3"),
        (("fa3", "fa2"), (10, 0), "fa2"),
        (("fa2",), (9, 0), "fa2"),
    ],
)
def test_fa_runs_the_newest_flash_attention_for_the_gpu(monkeypatch, installed, capability, expected):
    fake = FakeFlash(monkeypatch, *installed)
    on_gpu(monkeypatch, capability)
    impl = attention_backend("fa", CUDA, BF16)
    q, k = torch.randn(2, 16, 3, 8), torch.randn(2, 24, 3, 8)  # [B, S, H, D]: handed over as they are
    out = impl(q, k, k)
    assert fake.calls == [(expected, q.shape, k.shape, k.shape)]
    assert out is fake.outputs[expected]  # FA4's (out, lse) unwrapped
    assert impl.__name__ == expected and attention_backend("fa", CUDA, BF16) is impl  # one function per kernel


def test_fa_in_a_compiled_graph_is_one_op(monkeypatch):
    fake = FakeFlash(monkeypatch, "fa4")
    on_gpu(monkeypatch, (9, 0))
    impl = attention_backend("fa", CUDA, BF16)
    q = torch.randn(1, 8, 2, 4)
    torch._dynamo.reset()
    out = torch.compile(lambda q: impl(q, q, q) * 2, backend="eager", fullgraph=True)(q)
    assert [call[0] for call in fake.calls] == ["fa4"] and torch.equal(out, fake.outputs["fa4"] * 2)


@pytest.mark.parametrize(
    ("installed", "device", "dtype", "capability", "message"),
    [
        ((), CUDA, BF16, (9, 0), "fa needs FlashAttention, which is not installed: pip install 'sgdiff[flash]'"),
        (("fa4",), torch.device("cpu"), BF16, (9, 0), "fa runs FlashAttention (fa4) on CUDA GPUs; the model runs on"),
        (("fa4",), CUDA, torch.float32, (9, 0), "fa runs in float16 or bfloat16; the model runs in float32"),
        (("fa4", "fa3"), CUDA, BF16, (8, 6), "fa has no FlashAttention for this GPU (compute capability 8.6) in fa4"),
    ],
)
def test_fa_that_cannot_run_here_is_a_one_line_error(monkeypatch, installed, device, dtype, capability, message):
    FakeFlash(monkeypatch, *installed)
    on_gpu(monkeypatch, capability)
    with pytest.raises(UserError) as caught:
        attention_backend("fa", device, dtype)
    assert str(caught.value).startswith(f"attention_backend {message}"), str(caught.value)
    assert caught.value.field == "attention_backend" and "\n" not in str(caught.value)


def test_fa_found_but_broken_says_so(monkeypatch):
    """A package whose import fails (FA4 without cutlass.cute was one): named, with the reason."""
    FakeFlash(monkeypatch, "fa2")
    monkeypatch.delitem(sys.modules, "flash_attn")  # FA2's compiled part is there, its Python package is not
    on_gpu(monkeypatch, (8, 0))
    with pytest.raises(UserError, match=r"^attention_backend fa found fa2, which cannot be imported \(No module named"):
        attention_backend("fa", CUDA, BF16)


def test_auto_measures_flash_attention_only_where_one_is_installed(monkeypatch):
    assert attention_backend("auto", torch.device("cpu"), BF16) is sdpa_attention
    assert attention_backend("auto", CUDA, BF16) is wave_split_attention  # nothing installed: as before, no cost
    FakeFlash(monkeypatch, "fa4")
    on_gpu(monkeypatch, (9, 0))
    auto = attention_backend("auto", CUDA, BF16)
    assert isinstance(auto, MeasuredAttention) and list(auto.candidates) == ["cudnn", "fa4"]
    assert auto.candidates["cudnn"] is wave_split_attention
    assert attention_backend("auto", CUDA, torch.float32) is wave_split_attention
    on_gpu(monkeypatch, (8, 6))  # FA4 does not run there
    assert attention_backend("auto", CUDA, BF16) is wave_split_attention


class Timed:
    """Two kernels that say when they run, and a timer that reads their made-up ms per call by sequence length."""

    def __init__(self, ms: dict[tuple[str, int], float]):
        self.ms, self.ran, self.timed = ms, [], 0

    def kernel(self, name: str):
        def impl(q, k, v):
            self.ran.append(name)
            return q + (1.0 if name == "fa4" else 0.0)

        return impl

    def timer(self, fn) -> float:
        self.timed += 1
        before = len(self.ran)
        fn()
        (name,) = self.ran[before:]
        return self.ms[(name, self.seq)]

    def attention(self) -> MeasuredAttention:
        return MeasuredAttention({"cudnn": self.kernel("cudnn"), "fa4": self.kernel("fa4")}, timer=self.timer)

    def call(self, attention, seq: int):
        self.seq = seq
        q = torch.randn(1, seq, 2, 4)
        return attention(q, q, q), q


def test_auto_takes_the_faster_kernel_per_shape_and_remembers_it():
    timed = Timed({("cudnn", 8): 1.0, ("fa4", 8): 0.5, ("cudnn", 16): 1.0, ("fa4", 16): 2.0,
                   ("cudnn", 32): 1.0, ("fa4", 32): 0.98})  # fmt: skip
    auto = timed.attention()
    out, q = timed.call(auto, 8)
    assert torch.equal(out, q + 1) and timed.timed == 2 * auto_attention.ROUNDS
    timed.ran.clear()
    out, q = timed.call(auto, 8)  # the same shape again: no timing, FA4 straight away
    assert timed.ran == ["fa4"] and timed.timed == 2 * auto_attention.ROUNDS and torch.equal(out, q + 1)
    out, q = timed.call(auto, 16)  # a new shape is measured: cuDNN wins there
    assert torch.equal(out, q) and timed.timed == 4 * auto_attention.ROUNDS
    out, q = timed.call(auto, 32)  # 2% faster is within the margin: cuDNN stays
    assert torch.equal(out, q)
    assert [(c["q"], c["kernel"]) for c in auto.choices()] == [([1, 8, 2, 4], "fa4"), ([1, 16, 2, 4], "cudnn"),
                                                               ([1, 32, 2, 4], "cudnn")]  # fmt: skip
    assert auto.choices()[0]["ms"] == {"cudnn": 1.0, "fa4": 0.5}


def test_auto_runs_cudnn_where_it_cannot_time_and_measures_later(monkeypatch):
    timed = Timed({("cudnn", 8): 1.0, ("fa4", 8): 0.5})
    auto = timed.attention()
    monkeypatch.delattr(measured_winner, "_dynamo_marked_constant", raising=False)  # (compile_blocks' mark)
    for blocked in ("capture", "compile", "dispatch mode"):
        with monkeypatch.context() as patch:
            if blocked == "capture":
                patch.setattr(torch.cuda, "is_available", lambda: True)
                patch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
            if blocked == "compile":
                patch.setattr(torch.compiler, "is_compiling", lambda: True)
            with FlopCounterMode(display=False) if blocked == "dispatch mode" else torch.no_grad():
                out, q = timed.call(auto, 8)
        assert torch.equal(out, q) and timed.timed == 0 and auto.winners == {}, blocked
    out, q = timed.call(auto, 8)  # eagerly, with nothing in the way
    assert torch.equal(out, q + 1) and timed.timed > 0


def test_auto_in_a_compiled_block_measures_at_trace_time(monkeypatch):
    """speed/compile.py's compile_blocks marks the choice a constant: it is measured while the block is
    traced and the graph holds the winner, unbroken; traced without the mark, cuDNN (nothing timed)."""
    assert measured_winner in CONSTANTS  # what compile_blocks marks
    timed = Timed({("cudnn", 8): 1.0, ("fa4", 8): 0.5})
    auto = timed.attention()
    torch._dynamo.reset()
    monkeypatch.delattr(measured_winner, "_dynamo_marked_constant", raising=False)
    timed.seq = 8
    q = torch.randn(1, 8, 2, 4)
    assert torch.equal(torch.compile(auto, backend="eager", fullgraph=True)(q, q, q), q)
    assert timed.timed == 0 and auto.winners == {}
    torch._dynamo.reset()
    monkeypatch.setattr(measured_winner, "_dynamo_marked_constant", True, raising=False)
    assert torch.equal(torch.compile(auto, backend="eager", fullgraph=True)(q, q, q), q + 1)
    assert timed.timed == 2 * auto_attention.ROUNDS and [c["kernel"] for c in auto.choices()] == ["fa4"]
    torch._dynamo.reset()
    monkeypatch.delattr(measured_winner, "_dynamo_marked_constant")  # traced without the mark: what is known
    assert torch.equal(torch.compile(auto, backend="eager", fullgraph=True)(q, q, q), q + 1)
    assert timed.timed == 2 * auto_attention.ROUNDS
    torch._dynamo.reset()


def test_auto_leaves_out_a_flash_attention_that_fails(caplog):
    def broken(q, k, v):
        raise ImportError("No module named 'cutlass.cute'")

    timed = Timed({("cudnn", 8): 1.0})
    auto = MeasuredAttention({"cudnn": timed.kernel("cudnn"), "fa4": broken}, timer=timed.timer)
    with caplog.at_level(logging.WARNING, logger="sgdiff.speed.auto_attention"):
        out, q = timed.call(auto, 8)
    assert torch.equal(out, q) and list(auto.candidates) == ["cudnn"]
    assert "fa4 cannot run (No module named 'cutlass.cute')" in caplog.text


def test_auto_measures_with_its_own_random_numbers():
    """The measuring draws its inputs from a generator of its own: the run's random numbers stay as they were."""
    timed = Timed({("cudnn", 8): 1.0, ("fa4", 8): 0.5})
    torch.manual_seed(3)
    torch.randn(1, 8, 2, 4)  # what timed.call draws
    expected = torch.rand(4)
    torch.manual_seed(3)
    timed.call(timed.attention(), 8)
    assert timed.timed > 0 and torch.equal(torch.rand(4), expected)


def stored(timed: Timed, path, software: str = "H100 | torch x | cudnn y | flash-attn-4 z") -> MeasuredAttention:
    """A chooser over timed's kernels whose picks are kept in `path`, as auto's are on a GPU."""
    store = PickStore(path, lambda: software)
    return MeasuredAttention({"cudnn": timed.kernel("cudnn"), "fa4": timed.kernel("fa4")}, timer=timed.timer,
                             store=store)  # fmt: skip


def test_auto_keeps_its_picks_on_disk_for_the_next_process(tmp_path):
    """A second chooser (a later process) takes the first one's picks without timing; where cuDNN won it never
    calls FlashAttention (whose import and compile cost seconds); other software measures again."""
    path = tmp_path / "picks.json"
    timed = Timed({("cudnn", 8): 1.0, ("fa4", 8): 0.5, ("cudnn", 16): 1.0, ("fa4", 16): 2.0})
    first = stored(timed, path)
    timed.call(first, 8), timed.call(first, 16)
    assert timed.timed == 4 * auto_attention.ROUNDS and path.is_file()
    timed.ran.clear()
    later = stored(timed, path)
    out, q = timed.call(later, 16)
    assert torch.equal(out, q) and timed.ran == ["cudnn"] and timed.timed == 4 * auto_attention.ROUNDS
    out, q = timed.call(later, 8)  # FA4's pick: checked to run once, then run
    assert torch.equal(out, q + 1) and timed.ran == ["cudnn", "fa4", "fa4"]
    assert [(c["q"][1], c["kernel"], c["ms"]) for c in later.choices()] == [
        (16, "cudnn", {"cudnn": 1.0, "fa4": 2.0}), (8, "fa4", {"cudnn": 1.0, "fa4": 0.5})]  # fmt: skip
    timed.call(stored(timed, path, "H200 | torch x | cudnn y | flash-attn-4 z"), 8)  # another GPU: measured
    assert timed.timed == 6 * auto_attention.ROUNDS
    kept = json.loads(path.read_text())
    assert len(kept) == 3 and all(entry.startswith(("H100 | ", "H200 | ")) for entry in kept)


def test_a_kept_pick_that_no_longer_runs_is_measured_again(tmp_path, caplog):
    path = tmp_path / "picks.json"
    timed = Timed({("cudnn", 8): 1.0, ("fa4", 8): 0.5})
    timed.call(stored(timed, path), 8)

    def broken(q, k, v):
        raise ImportError("No module named 'cutlass.cute'")

    later = MeasuredAttention({"cudnn": timed.kernel("cudnn"), "fa4": broken}, timer=timed.timer,
                              store=PickStore(path, lambda: "H100 | torch x | cudnn y | flash-attn-4 z"))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="sgdiff.speed.auto_attention"):
        out, q = timed.call(later, 8)
    assert torch.equal(out, q) and list(later.candidates) == ["cudnn"]
    assert "fa4 cannot run (No module named 'cutlass.cute')" in caplog.text
    entry = later.store.entry(next(iter(later.winners)), ["cudnn", "fa4"])
    assert json.loads(path.read_text())[entry]["kernel"] == "cudnn"  # measured again and kept


@pytest.mark.parametrize("content", ["not json {", "[1, 2]", '{"H100 | torch x | cudnn y | flash-attn-4 z | cudnn/fa4 '
                                     '| q [1, 8, 2, 4] k [1, 8, 2, 4] float32": {"kernel": "fa9"}}'])  # fmt: skip
def test_an_unreadable_or_foreign_picks_file_is_measured_over(tmp_path, content):
    path = tmp_path / "picks.json"
    path.write_text(content)
    timed = Timed({("cudnn", 8): 1.0, ("fa4", 8): 0.5})
    out, q = timed.call(stored(timed, path), 8)
    assert torch.equal(out, q + 1) and timed.timed == 2 * auto_attention.ROUNDS
    assert [value["kernel"] for value in json.loads(path.read_text()).values()][-1] == "fa4"


def test_auto_on_a_gpu_keys_its_picks_by_the_gpu_and_versions(monkeypatch):
    FakeFlash(monkeypatch, "fa4")
    on_gpu(monkeypatch, (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    auto = attention_backend("auto", CUDA, BF16)
    assert auto.store.path == cache_root() / "attention-picks.json"
    software = auto.store.software
    assert software.startswith(f"NVIDIA H100 80GB HBM3 | torch {torch.__version__} | cudnn ")
    assert software.endswith("| flash-attn-4 unknown")  # (the stand-in is no installed distribution)


def test_fa4_keeps_its_compiled_kernels_in_the_users_cache(monkeypatch):
    """FA4 reads its cache settings when flash_attn.cute is imported: sgdiff sets them first, unless the user did."""
    seen = []
    monkeypatch.setattr(flash_attention.importlib, "import_module",
                        lambda name: seen.append((name, os.environ.get("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"),
                                                  os.environ.get("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"))))  # fmt: skip
    for name in ("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delitem(sys.modules, "flash_attn.cute", raising=False)
    flash_attention.import_kernel("flash_attn")  # FA2: nothing of FA4's set
    assert seen == [("flash_attn", None, None)]
    flash_attention.import_kernel("flash_attn.cute")
    assert seen[1] == ("flash_attn.cute", "1", str(cache_root() / "flash-attention-cute"))
    monkeypatch.setenv("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", "/elsewhere")  # the user's choice stays
    flash_attention.import_kernel("flash_attn.cute")
    assert seen[2] == ("flash_attn.cute", "1", "/elsewhere")

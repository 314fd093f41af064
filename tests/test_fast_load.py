"""Safetensors read by sgdiff's own parallel reader (models/fast_load.py) give exactly what the
safetensors library gives: every dtype, shape and byte, also at unaligned offsets and across chunk
and reader boundaries; a truncated or foreign file is refused in one line."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from sgdiff.errors import UserError
from sgdiff.models import fast_load
from sgdiff.models.fast_load import Reader, read_safetensors
from sgdiff.models.loading import load_state_dict


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "a.odd_bytes": torch.randint(0, 255, (3,), dtype=torch.uint8, generator=generator),  # the next ones unaligned
        "b.weight": torch.randn(37, 5, generator=generator).to(torch.bfloat16),
        "c.bias": torch.randn(11, generator=generator),
        "d.half": torch.randn(2, 3, 4, generator=generator).half(),
        "e.index": torch.arange(7, dtype=torch.int64),
        "f.flag": torch.tensor([True, False, True]),
        "g.scalar": torch.tensor(2.5),
        "h.empty": torch.zeros(0, 4),
    }


@pytest.mark.parametrize("chunk", [fast_load.CHUNK_BYTES, 64])  # one read, and many small ones
def test_the_reader_gives_what_safetensors_gives(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(fast_load, "CHUNK_BYTES", chunk)
    path = tmp_path / "model.safetensors"
    save_file(tensors(), path, metadata={"format": "pt"})
    with Reader(torch.device("cpu")) as reader:
        ours = read_safetensors(path, reader)
    theirs = load_file(path)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape
        assert torch.equal(ours[name], tensor), name


@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])  # chunks cutting tensors anywhere, and one for all
def test_the_gpu_path_puts_every_byte_of_every_chunk_where_it_belongs(tmp_path, chunk):
    """The CUDA path's plan (Layout.chunk_copies), carried out here on the CPU: each staged chunk's bytes,
    copied where the plan says, rebuild every tensor exactly."""
    path = tmp_path / "model.safetensors"
    save_file(tensors(), path)
    start, entries = fast_load.read_header(path)
    data = path.read_bytes()[start:]
    layout = fast_load.Layout(entries)
    ours = {name: torch.zeros(shape, dtype=dtype) for name, (dtype, shape, _, _) in entries.items()}
    for offset in range(0, layout.size, chunk):
        staged = torch.frombuffer(bytearray(data[offset : offset + chunk]), dtype=torch.uint8)
        for name, low, high, at in layout.chunk_copies(offset, min(chunk, layout.size - offset)):
            fast_load.raw_bytes(ours[name])[low:high].copy_(staged[at : at + high - low])
    for name, tensor in load_file(path).items():
        assert torch.equal(ours[name], tensor), name


def test_every_tensor_read_has_memory_of_its_own(tmp_path):
    """No tensor keeps another's bytes alive: a weight later cast or fused frees what it replaced."""
    path = tmp_path / "model.safetensors"
    save_file(tensors(), path)
    with Reader(torch.device("cpu")) as reader:
        ours = read_safetensors(path, reader)
    for tensor in ours.values():
        assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()


def test_load_state_dict_casts_and_keeps_fp32_where_asked(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file({"blocks.0.norm1.weight": torch.ones(4), "blocks.0.proj.weight": torch.full((2, 2), 1.5)},
              folder / "diffusion_pytorch_model.safetensors")  # fmt: skip
    state = load_state_dict(folder, torch.bfloat16, "cpu", keep_fp32=("norm1",))
    assert state["blocks.0.norm1.weight"].dtype == torch.float32
    assert state["blocks.0.proj.weight"].dtype == torch.bfloat16 and state["blocks.0.proj.weight"][0, 0] == 1.5


def test_a_truncated_or_foreign_file_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(tensors(), path)
    path.write_bytes(path.read_bytes()[:-10])
    with Reader(torch.device("cpu")) as reader:
        with pytest.raises(UserError, match="is truncated"):
            read_safetensors(path, reader)
        path.write_bytes(b"\x00" * 64)
        with pytest.raises(UserError, match="is not a safetensors file"):
            read_safetensors(path, reader)


def test_a_tensor_at_an_unaligned_offset_is_read_right(tmp_path):
    """safetensors' own writer aligns its tensors; a file written otherwise is still read right."""
    import json

    odd = bytes([1, 2, 3])
    halves = torch.tensor([1.5, -2.25], dtype=torch.bfloat16)
    header = {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "b": {"dtype": "BF16", "shape": [2], "data_offsets": [3, 7]}}  # fmt: skip
    raw = json.dumps(header).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + odd + halves.view(torch.uint8).numpy().tobytes())
    with Reader(torch.device("cpu")) as reader:
        ours = read_safetensors(path, reader)
    assert ours["a"].tolist() == [1, 2, 3] and torch.equal(ours["b"], halves)


LIBRARY_PARTS = [  # (checkpoint, folder, class): every library model a family loads
    ("flux", "text_encoder", "transformers.CLIPTextModel"),
    ("flux", "text_encoder_2", "transformers.T5EncoderModel"),
    ("flux", "vae", "diffusers.AutoencoderKL"),
    ("wan-i2v", "text_encoder", "transformers.UMT5EncoderModel"),
    ("wan-i2v", "vae", "diffusers.AutoencoderKLWan"),
    ("wan-i2v", "image_encoder", "transformers.CLIPVisionModelWithProjection"),
]


@pytest.mark.parametrize(("checkpoint", "folder", "class_path"), LIBRARY_PARTS)
def test_library_models_read_by_sgdiff_equal_the_librarys_own_load(tiny_flux_dev, tiny_wan, checkpoint, folder,
                                                                   class_path):  # fmt: skip
    """Text encoders, VAEs and the image encoder built with their parameters on meta and given the
    tensors sgdiff read: the same parameters and dtypes (bf16; at float16 T5's `wo` stays float32), the
    same buffers the checkpoint does not hold (CLIP's position ids), the same ties as the library's
    from_pretrained."""
    import importlib

    from sgdiff.pipeline.components import read_library_model

    module, name = class_path.split(".")
    cls = getattr(importlib.import_module(module), name)
    path = (tiny_flux_dev if checkpoint == "flux" else tiny_wan("i2v")) / folder
    dtype = torch.float16 if name == "T5EncoderModel" else torch.bfloat16
    ours = read_library_model(cls, path, dtype, torch.device("cpu"))
    assert ours is not None, "sgdiff's reader should take this checkpoint"
    theirs = cls.from_pretrained(path, dtype=dtype, use_safetensors=True)
    for kind in ("named_parameters", "named_buffers"):
        ours_, theirs_ = dict(getattr(ours, kind)()), dict(getattr(theirs, kind)())
        assert ours_.keys() == theirs_.keys(), kind
        for key, tensor in theirs_.items():
            assert ours_[key].dtype == tensor.dtype and torch.equal(ours_[key], tensor), key
    if name == "T5EncoderModel":
        assert ours.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
        assert ours.encoder.embed_tokens.weight is ours.shared.weight or torch.equal(
            ours.encoder.embed_tokens.weight, ours.shared.weight
        )


def test_a_checkpoint_with_other_names_goes_through_the_librarys_loader(tiny_flux_dev, tmp_path):
    """Names the model does not have (an older layout the library would rename): sgdiff's reader
    declines, and the library's from_pretrained loads it."""
    import shutil

    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    from sgdiff.pipeline.components import load_library_model, read_library_model

    folder = tmp_path / "text_encoder"
    shutil.copytree(tiny_flux_dev / "text_encoder", folder)
    (weights,) = folder.glob("*.safetensors")
    state = load_file(weights)
    state["text_model.extra.weight"] = torch.zeros(2)
    save_file(state, weights)
    assert read_library_model(CLIPTextModel, folder, torch.float32, torch.device("cpu")) is None
    model = load_library_model(CLIPTextModel, folder, torch.float32, torch.device("cpu"))
    reference = CLIPTextModel.from_pretrained(tiny_flux_dev / "text_encoder")
    ids = torch.tensor([[1, 5, 9, 2]])
    assert torch.equal(model(ids).pooler_output, reference(ids).pooler_output)


def test_parts_load_side_by_side_and_a_failure_surfaces_after_all_stopped():
    """Each part on its own thread, each timed as 'load <name>'; a part that fails raises its own error,
    once the others have finished (none is left loading in the background)."""
    import threading
    import time

    from sgdiff.pipeline.components import load_side_by_side

    class Recorder:
        def __init__(self):
            self.finished: list[str] = []

        def stage_started(self, name):
            pass

        def stage_finished(self, name, seconds):
            self.finished.append(name)

        def step_finished(self, index, total, seconds):
            pass

    both_running = threading.Barrier(2, timeout=10)  # passes only if the two parts run at once
    events = Recorder()
    parts = load_side_by_side(events, torch.device("cpu"), {
        "a": lambda: (both_running.wait(), "A")[1], "b": lambda: (both_running.wait(), "B")[1], "c": None,
    })  # fmt: skip
    assert parts == {"a": "A", "b": "B", "c": None} and sorted(events.finished) == ["load a", "load b"]

    def slow() -> str:
        time.sleep(0.3)
        return "done"

    def broken() -> None:
        raise UserError("the vae folder is broken")

    events = Recorder()
    with pytest.raises(UserError, match="the vae folder is broken"):
        load_side_by_side(events, torch.device("cpu"), {"transformer": slow, "vae": broken})
    assert events.finished == ["load transformer"]  # it had finished when the error came


def test_a_part_given_its_weights_while_another_is_built_keeps_them(tiny_flux_dev):
    """Building a library model puts its parameters on meta; a model another thread gives its weights
    at that moment keeps real ones."""
    import threading

    from transformers import CLIPTextModel

    from sgdiff.pipeline.components import parameters_on_meta

    inside, done = threading.Event(), threading.Event()

    def build() -> None:
        with parameters_on_meta():
            inside.set()
            done.wait(10)

    builder = threading.Thread(target=build)
    builder.start()
    inside.wait(10)
    try:
        model = CLIPTextModel.from_pretrained(tiny_flux_dev / "text_encoder")
        layer = torch.nn.Linear(2, 2)
    finally:
        done.set()
        builder.join()
    assert not any(p.is_meta for p in (*model.parameters(), *layer.parameters()))


def test_builds_on_several_threads_leave_register_parameter_as_it_was():
    import threading

    from sgdiff.pipeline.components import parameters_on_meta

    original = torch.nn.Module.register_parameter

    def build() -> None:
        for _ in range(50):
            with parameters_on_meta():
                assert torch.nn.Linear(2, 2).weight.is_meta

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.nn.Module.register_parameter is original and not torch.nn.Linear(2, 2).weight.is_meta


def test_when_a_part_fails_the_others_stop_reading(tmp_path, monkeypatch):
    """A broken part ends the load at once: the part still reading gives up at its next chunk instead of
    reading its whole file first, and the broken part's own error is what the user sees."""
    from sgdiff.pipeline.components import load_side_by_side

    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file({f"w{i}": torch.zeros(16, 1024) for i in range(64)}, folder / "model.safetensors")  # 4 MB
    monkeypatch.setattr(fast_load, "CHUNK_BYTES", 4096)  # 1024 pieces
    pieces, started = [], threading.Event()
    read = fast_load.read_range

    def slow_read(fd, into, offset):
        started.set()
        time.sleep(0.005)
        pieces.append(offset)
        read(fd, into, offset)

    monkeypatch.setattr(fast_load, "read_range", slow_read)

    def broken() -> None:
        started.wait(10)  # fail once the other part reads
        raise UserError("the vae folder is broken")

    class Events:
        def __init__(self):
            self.finished = []

        def stage_started(self, name):
            pass

        def stage_finished(self, name, seconds):
            self.finished.append(name)

        def step_finished(self, index, total, seconds):
            pass

    events = Events()
    with pytest.raises(UserError, match="the vae folder is broken"):
        load_side_by_side(events, torch.device("cpu"), {
            "transformer": lambda: load_state_dict(folder, torch.float32), "vae": broken,
        })  # fmt: skip
    assert events.finished == [] and 0 < len(pieces) < 1024 // 4  # gave up long before the end


def test_quiet_libraries_is_one_silence_shared_by_threads_and_gives_back_the_callers_settings():
    """Parts loading side by side each silence transformers: the first to leave must not bring its advice
    back while another still loads; the last puts back what the caller had."""
    import logging

    import transformers.utils.logging as transformers_logging

    from sgdiff.pipeline.components import quiet_libraries

    transformers_logging.set_verbosity_info()
    transformers_logging.enable_progress_bar()
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = []

    def first() -> None:
        with quiet_libraries():
            first_in.set()
            second_in.wait(10)
        first_out.set()

    def second() -> None:
        first_in.wait(10)
        with quiet_libraries():
            second_in.set()
            first_out.wait(10)
            seen.append((transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()))

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert seen == [(logging.ERROR, False)]  # still silent after the first left
        assert transformers_logging.get_verbosity() == logging.INFO and transformers_logging.is_progress_bar_enabled()
    finally:
        transformers_logging.set_verbosity_warning()


def test_quiet_libraries_imports_no_library():
    """Silencing transformers would import it (about 1 s): a FLUX load never needs its modelling code."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom sgdiff.pipeline.components import quiet_libraries\n"
        "with quiet_libraries(): pass\nprint(sorted(m for m in ('transformers', 'diffusers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]"]


def test_tensors_not_wanted_are_not_read(tmp_path, monkeypatch):
    """A VAE's encoder (never run) stays on disk: its bytes are not read, its tensors not made."""
    path = tmp_path / "model.safetensors"
    save_file(tensors(), path)
    start, entries = fast_load.read_header(path)
    unwanted = entries["b.weight"]
    reads = []
    read = fast_load.read_range
    monkeypatch.setattr(
        fast_load, "read_range", lambda fd, into, at: (reads.append((at, at + into.numel())), read(fd, into, at))
    )
    with Reader(torch.device("cpu")) as reader:
        ours = read_safetensors(path, reader, wanted=lambda name: name != "b.weight")
    assert set(ours) == set(tensors()) - {"b.weight"}
    theirs = load_file(path)
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    low, high = start + unwanted[2], start + unwanted[3]
    assert not any(a < high and low < b for a, b in reads)  # no read touched its bytes


def test_qwen_text_encoder_in_transformers_4_names_is_read_by_sgdiff_without_its_unused_parts(tmp_path):
    """Qwen2.5-VL checkpoints (Qwen-Image's text_encoder/) store transformers-4 names, which transformers 5
    renames as it loads (`model.layers` -> `model.language_model.layers`, `visual` -> `model.visual`):
    sgdiff's reader renames alike and takes the checkpoint; the vision tower and the language-model head
    text to image never runs are left unread, and the hidden states are the library's."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from sgdiff.families.qwen_image.text import text_encoder_unused
    from sgdiff.models.loading import stored_tensors
    from sgdiff.pipeline.components import read_library_model
    from sgdiff.testing.tiny_qwen_image import build_tiny_qwen_image

    folder = build_tiny_qwen_image(tmp_path / "qwen") / "text_encoder"
    stored = stored_tensors(folder)
    assert "model.layers.0.mlp.up_proj.weight" in stored and any(n.startswith("visual.") for n in stored)
    cls, cpu = Qwen2_5_VLForConditionalGeneration, torch.device("cpu")
    whole = read_library_model(cls, folder, torch.bfloat16, cpu)
    assert whole is not None, "sgdiff's reader should take the renamed checkpoint"
    theirs = cls.from_pretrained(folder, dtype=torch.bfloat16, use_safetensors=True)
    ours_, theirs_ = dict(whole.named_parameters()), dict(theirs.named_parameters())
    assert ours_.keys() == theirs_.keys()
    assert all(ours_[k].dtype == t.dtype and torch.equal(ours_[k], t) for k, t in theirs_.items())

    text_only = read_library_model(cls, folder, torch.float32, cpu, text_encoder_unused(reads_images=False))
    assert text_only is not None
    left = {name.split(".")[0] + "." + name.split(".")[1] for name, _ in text_only.named_parameters()}
    assert left == {"model.language_model"}  # neither model.visual nor lm_head
    ids = torch.tensor([[3, 17, 40, 9, 25]])
    reference = cls.from_pretrained(folder, dtype=torch.float32).model
    expected = reference(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert torch.equal(text_only.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state, expected)

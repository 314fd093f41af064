"""Safetensors read by sgdiff's own parallel reader (models/fast_load.py) give exactly what the
safetensors library gives: every dtype, shape and byte, also at unaligned offsets and across chunk
and reader boundaries; a truncated or foreign file is refused in one line."""

from __future__ import annotations

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

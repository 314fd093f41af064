"""sgdiff's cached tokenizers (pipeline/tokenizers.py) encode exactly as transformers' own: the same ids
and masks, padded, truncated or neither; a later process reads them without importing transformers;
an edited folder is built again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sgdiff.pipeline.components import build_tokenizer, load_tokenizer
from sgdiff.pipeline.tokenizers import CachedTokenizer, cached_tokenizer_path
from sgdiff.testing.tiny_flux import make_clip_tokenizer, make_t5_tokenizer

PROMPTS = [
    "a red cube on a blue table",
    "A  Red   CUBE\ton a\nblue table, in the style of van Gogh!",
    "",
    "   ",
    "naïve café — déjà vu, 東京 🙂 <|endoftext|> </s> <pad>",
    "a cat " * 100,  # longer than CLIP's 77 tokens and the short T5 length below
    "it's the cat's toy; they'll've done it",
]


def clip_from_vocab_and_merges(folder, tokenizer) -> None:
    """The layout of FLUX.1's `tokenizer/` on the Hub: vocab.json and merges.txt, no tokenizer.json."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(backend["vocab"]))
    merges = [" ".join(m) if isinstance(m, list) else m for m in backend["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
              "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    make_clip_tokenizer().save_pretrained(root / "clip")
    make_t5_tokenizer().save_pretrained(root / "t5")
    clip_from_vocab_and_merges(root / "clip-vocab-merges", make_clip_tokenizer())
    return root


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.parametrize("name", ["clip", "t5", "clip-vocab-merges"])
def test_the_cached_tokenizer_encodes_as_transformers_does(tokenizer_folders, cache, name):
    folder = tokenizer_folders / name
    built = load_tokenizer(folder)  # the first load builds it with transformers and keeps it
    assert not isinstance(built, CachedTokenizer)
    assert cached_tokenizer_path(folder).is_file()
    cached = load_tokenizer(folder)
    assert isinstance(cached, CachedTokenizer) and cached.name == type(built).__name__
    assert cached.model_max_length == built.model_max_length
    for max_length in (8, 77, 512):
        want = built(PROMPTS, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        got = cached(PROMPTS, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        assert torch.equal(got.input_ids, want.input_ids), (name, max_length)
        assert torch.equal(got.attention_mask, want.attention_mask), (name, max_length)
    assert cached(PROMPTS).input_ids == built(PROMPTS).input_ids  # unpadded, untruncated: the full lengths
    # a prompt of different words gets different ids (the comparison above is not between empty outputs)
    one, other = (cached([p], padding="max_length", max_length=16, truncation=True).input_ids for p in PROMPTS[::6])
    assert one != other


def test_the_cache_is_rebuilt_when_the_folder_changes(tokenizer_folders, cache, tmp_path):
    folder = tmp_path / "t5"
    folder.mkdir()
    for path in (tokenizer_folders / "t5").iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    load_tokenizer(folder)
    first = cached_tokenizer_path(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["model_max_length"] = 128
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert cached_tokenizer_path(folder) != first
    rebuilt = load_tokenizer(folder)
    assert not isinstance(rebuilt, CachedTokenizer) and rebuilt.model_max_length == 128
    assert load_tokenizer(folder).model_max_length == 128


def test_a_broken_cache_file_is_built_again(tokenizer_folders, cache):
    folder = tokenizer_folders / "clip"
    load_tokenizer(folder)
    cached_tokenizer_path(folder).write_text("{not json")
    again = load_tokenizer(folder)
    assert not isinstance(again, CachedTokenizer)
    assert isinstance(load_tokenizer(folder), CachedTokenizer)


def test_an_unwritable_cache_only_costs_the_build(tokenizer_folders, tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked))  # a file where the folder should be
    want = build_tokenizer(tokenizer_folders / "t5")(PROMPTS).input_ids
    assert load_tokenizer(tokenizer_folders / "t5")(PROMPTS).input_ids == want


LOAD_WITHOUT_TRANSFORMERS = """
import sys
from pathlib import Path
from sgdiff.pipeline.components import load_tokenizer
tokenizer = load_tokenizer(Path(sys.argv[1]))
print(type(tokenizer).__name__, "transformers" in sys.modules, tokenizer(["a red cube"]).input_ids)
"""


def test_a_later_process_does_not_import_transformers(tokenizer_folders, cache):
    folder = tokenizer_folders / "clip"
    want = load_tokenizer(folder)(["a red cube"]).input_ids
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    done = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_TRANSFORMERS, str(folder)], env=env,
                          capture_output=True, text=True, check=True)  # fmt: skip
    assert done.stdout.split(" ", 2)[:2] == ["CachedTokenizer", "False"], done.stdout + done.stderr
    assert done.stdout.split(" ", 2)[2].strip() == str(want)

"""The demo tokenizers: one token per caption word, and unknown words still tokenize."""

from __future__ import annotations

import numpy as np
import pytest

from sgdiff.demo.scenes import sample_clip_scene, sample_scene
from sgdiff.demo.vocabulary import DEMO_WORDS, make_demo_clip_tokenizer, make_demo_t5_tokenizer


@pytest.fixture(scope="module")
def tokenizers():
    return make_demo_clip_tokenizer(), make_demo_t5_tokenizer()


def test_every_caption_word_is_one_token(tokenizers):
    clip, t5 = tokenizers
    for word in DEMO_WORDS:
        assert clip.tokenize(word) == [word + "</w>"], word
        assert t5.tokenize(word) == ["▁" + word], word
    rng = np.random.default_rng(0)
    for scene in [sample_scene(rng) for _ in range(50)] + [sample_clip_scene(rng) for _ in range(20)]:
        words = scene.caption().split()
        assert len(clip.tokenize(scene.caption())) == len(words) == len(t5.tokenize(scene.caption()))


def test_unknown_words_tokenize_without_unk(tokenizers):
    clip, t5 = tokenizers
    for text in ("a zebra under the moon!", "Ünïcödé text 123"):
        tokens = clip.tokenize(text)  # CLIP's unk is its end token, so look at the text's own tokens
        assert clip.unk_token not in tokens and len(tokens) > 3
    assert t5.unk_token_id not in t5("a zebra, quickly").input_ids
    assert len(t5.tokenize("zebra")) > 1  # spelled out


def test_tokenizers_survive_save_and_load(tokenizers, tmp_path):
    from transformers import AutoTokenizer

    for index, tokenizer in enumerate(tokenizers):
        tokenizer.save_pretrained(tmp_path / str(index))
        loaded = AutoTokenizer.from_pretrained(tmp_path / str(index))
        text = "a large orange square at the top on a green background"
        assert loaded(text).input_ids == tokenizer(text).input_ids

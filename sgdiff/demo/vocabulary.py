"""Tokenizers for the demo models, made in code over the demo vocabulary: every caption word is one
token, and any other text still tokenizes (into characters), never into <unk>."""

from __future__ import annotations

import json

from sgdiff.demo.scenes import COLOURS, MOTIONS, POSITIONS, SHAPES, SIZES


def byte_level_alphabet() -> list[str]:
    """GPT-2/CLIP byte-to-unicode table: one printable character per byte value."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


GLUE_WORDS = "a an on the at in and moving background".split()
DEMO_WORDS = sorted({*COLOURS, *SHAPES, *POSITIONS, *SIZES, *MOTIONS, *GLUE_WORDS})


def make_demo_clip_tokenizer():
    """Byte-level BPE (CLIP's scheme): merges learned on the demo words, so each is one token;
    every byte and byte + `</w>` is in the vocabulary, so nothing is unknown."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    chars = byte_level_alphabet()
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=10_000, end_of_word_suffix="</w>", initial_alphabet=chars, show_progress=False, min_frequency=1
    )
    bpe.train_from_iterator(DEMO_WORDS, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    for token in [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]  # (takes pairs)


def make_demo_t5_tokenizer():
    """Unigram (T5's scheme): `▁word` pieces for the demo words outscore spelling them out; single
    printable characters cover everything else."""
    from transformers import T5Tokenizer

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(chr(c), -6.0) for c in range(ord("!"), ord("~") + 1)]
    pieces += [("▁" + word, -1.0) for word in DEMO_WORDS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)

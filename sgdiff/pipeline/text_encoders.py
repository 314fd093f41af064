"""Prompt encoders over the text models, tokenising as diffusers' pipelines do, and the loading of sgdiff's
own text encoders (models/text/) from a checkpoint's folder.

The encoders call a model as transformers' text models are called (`model(ids)` or `model(ids, mask)`, reading
`.pooler_output` / `.last_hidden_state`), so transformers' models (the demo's training, Wan's UMT5) fit too."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from sgdiff.models.fast_load import read_header
from sgdiff.models.loading import build_on_meta, load_own_model, read_json, safetensors_files, with_empty_weights
from sgdiff.models.text import ClipTextConfig, ClipTextEncoder, T5Encoder, T5EncoderConfig
from sgdiff.pipeline.components import quiet_libraries, require_folder

log = logging.getLogger(__name__)

CLIP_UNUSED = ("position_ids",)  # a buffer older transformers saved (arange), recomputed in the forward
# the tied copy of `shared` (transformers' T5EncoderModel may save it too), and what a whole T5's file adds
T5_UNUSED = ("embed_tokens", "decoder", "lm_head")
TIED_COPY = "encoder.embed_tokens.weight"


def checkpoint_names(folder: Path) -> set[str]:
    """The tensor names in a component folder's safetensors files (their headers only)."""
    return {name for path in safetensors_files(folder) for name in read_header(path)[1]}


def load_clip_text_encoder(folder: Path, dtype: torch.dtype, device: torch.device) -> ClipTextEncoder:
    """sgdiff's CLIPTextModel from a `text_encoder/` folder. transformers 4 saved the weights under
    `text_model.` (FLUX.1's files), transformers 5 saves them without it: either loads."""
    config_path = require_folder(folder) / "config.json"
    model = build_on_meta(ClipTextEncoder, ClipTextConfig.from_dict(read_json(config_path), source=str(config_path)))
    prefixed = any(name.startswith("text_model.") for name in checkpoint_names(folder))
    load_own_model(model if prefixed else model.text_model, folder, dtype, device, ignored=CLIP_UNUSED)
    return model.eval().requires_grad_(False)


def load_t5_encoder(folder: Path, dtype: torch.dtype, device: torch.device) -> T5Encoder:
    """sgdiff's T5EncoderModel (UMT5EncoderModel for a "umt5" config) from a `text_encoder_2/`-like folder;
    the feed-forwards' `wo` stay float32 at float16, as transformers' from_pretrained keeps them."""
    config_path = require_folder(folder) / "config.json"
    model = build_on_meta(T5Encoder, T5EncoderConfig.from_dict(read_json(config_path), source=str(config_path)))
    keep = ("wo",) if dtype == torch.float16 else ()  # T5's _keep_in_fp32_modules (components.kept_in_fp32)
    names = checkpoint_names(folder)
    # a file that holds the embedding only as the encoder's copy: that copy is `shared`
    renamed = {TIED_COPY: "shared.weight"} if "shared.weight" not in names and TIED_COPY in names else None
    return load_own_model(model, folder, dtype, device, keep_fp32=keep, ignored=T5_UNUSED, renamed=renamed)


def tokenize_padded(tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    with quiet_libraries():  # transformers' own over-length advice; sgdiff says it once, below
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        full_length = max(len(x) for x in tokenizer(prompts).input_ids)
    if full_length > max_length:
        log.warning(
            "the prompt has %d tokens; %s keeps the first %d", full_length, tokenizer_name(tokenizer), max_length
        )
    return ids.input_ids


def tokenizer_name(tokenizer) -> str:
    """The transformers class a tokenizer is (or, from sgdiff's cache, stands for)."""
    return getattr(tokenizer, "name", None) or type(tokenizer).__name__


class ClipPooledEncoder:
    """CLIP text model -> pooled embedding [B, D] (prompt padded to the tokenizer's 77 tokens, causal mask only)."""

    # model: sgdiff's or transformers' text model (its `.device` is read), None on a rank that never encodes
    def __init__(self, tokenizer, model: Any):
        self.tokenizer = tokenizer
        self.model = model

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return self.encode(self.tokenize(prompts))

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return tokenize_padded(self.tokenizer, prompts, self.tokenizer.model_max_length)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids.to(self.model.device)).pooler_output


class T5SequenceEncoder:
    """T5 encoder -> last hidden states [B, max_length, D], padded, no attention mask."""

    def __init__(self, tokenizer, model: Any):  # as ClipPooledEncoder's
        self.tokenizer = tokenizer
        self.model = model

    def __call__(self, prompts: list[str], max_length: int) -> torch.Tensor:
        return self.encode(self.tokenize(prompts, max_length))

    def tokenize(self, prompts: list[str], max_length: int) -> torch.Tensor:
        return tokenize_padded(self.tokenizer, prompts, max_length)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids.to(self.model.device)).last_hidden_state


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: ftfy (when installed, as diffusers does), HTML entities, whitespace."""
    import html
    import re

    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5SequenceEncoder:
    """UMT5 encoder -> [B, max_length, D]: hidden states of the real tokens, zeros after them."""

    def __init__(self, tokenizer, model: Any):  # as ClipPooledEncoder's
        self.tokenizer = tokenizer
        self.model = model

    def __call__(self, prompts: list[str], max_length: int) -> torch.Tensor:
        return self.encode(*self.tokenize(prompts, max_length))

    def tokenize(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, both [B, max_length]."""
        prompts = [clean_prompt(p) for p in prompts]
        with quiet_libraries():
            tokens = self.tokenizer(
                prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
            )
        return tokens.input_ids, tokens.attention_mask

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ids, mask = ids.to(self.model.device), mask.to(self.model.device)
        hidden = self.model(ids, mask).last_hidden_state  # [B, L, D]
        keep = (torch.arange(ids.shape[1], device=hidden.device)[None, :] < mask.sum(dim=1)[:, None])[..., None]
        return torch.where(keep, hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))


def warm_up_clip_text_encoder(folder: Path, dtype: torch.dtype, device: torch.device, rows: int) -> None:
    """One forward of a one-layer copy of the folder's CLIP text encoder, uninitialised, at the length
    prompts are padded to: the kernels' warm-up (speed/warm_up.py)."""
    config_path = require_folder(folder) / "config.json"
    config = ClipTextConfig.from_dict(read_json(config_path), source=str(config_path))
    config = replace(config, num_hidden_layers=1)
    model = with_empty_weights(build_on_meta(ClipTextEncoder, config), dtype, device)
    model(torch.zeros(rows, config.max_position_embeddings, dtype=torch.long, device=device))


def warm_up_t5_encoder(folder: Path, dtype: torch.dtype, device: torch.device, rows: int, length: int,
                       masked: bool) -> None:  # fmt: skip
    """As warm_up_clip_text_encoder, for a T5 / UMT5 encoder at `length` tokens (`masked`: called with an
    attention mask, as UMT5SequenceEncoder calls it)."""
    config_path = require_folder(folder) / "config.json"
    config = T5EncoderConfig.from_dict(read_json(config_path), source=str(config_path))
    keep = ("wo",) if dtype == torch.float16 else ()  # as load_t5_encoder
    model = with_empty_weights(build_on_meta(T5Encoder, replace(config, num_layers=1)), dtype, device, keep)
    ids = torch.zeros(rows, length, dtype=torch.long, device=device)
    model(ids, torch.ones_like(ids) if masked else None)

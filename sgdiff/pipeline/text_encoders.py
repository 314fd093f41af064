"""Prompt encoders over transformers' text models, tokenising as diffusers' pipelines do."""

from __future__ import annotations

import logging

import torch

from sgdiff.pipeline.components import quiet_libraries

log = logging.getLogger(__name__)


def tokenize_padded(tokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    with quiet_libraries():  # transformers' own over-length advice; sgdiff says it once, below
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        full_length = max(len(x) for x in tokenizer(prompts).input_ids)
    if full_length > max_length:
        log.warning(
            "the prompt has %d tokens; %s keeps the first %d", full_length, type(tokenizer).__name__, max_length
        )
    return ids.input_ids


class ClipPooledEncoder:
    """CLIP text model -> pooled embedding [B, D] (prompt padded to the tokenizer's 77 tokens)."""

    def __init__(self, tokenizer, model: torch.nn.Module):
        self.tokenizer = tokenizer
        self.model = model

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        return self.encode(self.tokenize(prompts))

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return tokenize_padded(self.tokenizer, prompts, self.tokenizer.model_max_length)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids.to(self.model.device), output_hidden_states=False).pooler_output


class T5SequenceEncoder:
    """T5 encoder -> last hidden states [B, max_length, D], padded, no attention mask."""

    def __init__(self, tokenizer, model: torch.nn.Module):
        self.tokenizer = tokenizer
        self.model = model

    def __call__(self, prompts: list[str], max_length: int) -> torch.Tensor:
        return self.encode(self.tokenize(prompts, max_length))

    def tokenize(self, prompts: list[str], max_length: int) -> torch.Tensor:
        return tokenize_padded(self.tokenizer, prompts, max_length)

    def encode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids.to(self.model.device), output_hidden_states=False)[0]


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

    def __init__(self, tokenizer, model: torch.nn.Module):
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

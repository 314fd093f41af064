"""Qwen-Image's prompt encoding, as diffusers' QwenImagePipeline does it: the prompt inside a chat
template, Qwen2.5-VL's last hidden state (after its final norm), the template's system turn dropped
(its first 34 tokens), then at most `max_sequence_length` tokens. Each text keeps its own length: a
batch of texts of unequal lengths would need a padding mask, which the transformer refuses (see
models/qwen_image/transformer.py), so texts of unequal lengths are never stacked."""

from __future__ import annotations

import logging
from typing import Any

import torch

from sgdiff.errors import UserError
from sgdiff.families.qwen_image.sampling import MAX_TEXT_TOKENS, QwenImageSampling
from sgdiff.pipeline.components import quiet_libraries

log = logging.getLogger(__name__)

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_PREFIX_TOKENS = 34  # "<|im_start|>system ... background:<|im_end|>\n<|im_start|>user\n" in Qwen's tokenizer

# model_index.json's text encoder classes this family runs (transformers' names)
TEXT_ENCODERS = ("Qwen2_5_VLForConditionalGeneration",)


def text_encoder_class(model_index: dict[str, Any]) -> type:
    """The transformers class model_index.json names for `text_encoder`, refused unless supported."""
    entry = model_index.get("text_encoder")
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if name not in TEXT_ENCODERS:
        raise UserError(f"text encoder {name} is not supported for Qwen-Image (supported: {', '.join(TEXT_ENCODERS)})")
    import transformers

    return getattr(transformers, name)


def text_encoder_unused(reads_images: bool) -> tuple[str, ...]:
    """Qwen2.5-VL's parts the pipelines never run, left unread (load_library_model's `without`): its
    language-model head (diffusers reads hidden states, never logits), and its vision tower where no
    image is read (text to image). 1.1 GB and 1.3 GB of Qwen2.5-VL-7B's 16.6 GB in bf16."""
    return ("lm_head",) if reads_images else ("lm_head", "model.visual")


def last_hidden_state(model: Any, ids: torch.Tensor, mask: torch.Tensor, **vision: torch.Tensor) -> torch.Tensor:
    """[B, L, D]: what diffusers reads as `hidden_states[-1]` of the whole model's forward, from its
    base model alone (Qwen2_5_VLModel: no language-model head, whose logits diffusers never reads).
    `vision`: pixel_values and image_grid_thw of the images whose tokens the text holds (the Edit pipelines)."""
    base = getattr(model, "model", model)
    return base(input_ids=ids, attention_mask=mask, **vision).last_hidden_state


class QwenPromptEncoder:
    """Texts -> {"encoder_hidden_states": [B, S, D]}, S the texts' own token count (at most
    max_sequence_length); texts whose counts differ are refused (encode them one per call)."""

    def __init__(self, tokenizer: Any, text_encoder: Any, dtype: torch.dtype):
        self.tokenizer = tokenizer
        self.model = text_encoder  # None on a rank that never encodes
        self.dtype = dtype

    def __call__(self, prompts: list[str], params: QwenImageSampling) -> dict[str, torch.Tensor]:
        embeddings = [self.encode(prompt, params.max_sequence_length) for prompt in prompts]
        if len({e.shape[1] for e in embeddings}) > 1:
            raise ValueError("texts of unequal token counts cannot share a forward: encode them one per call")
        return {"encoder_hidden_states": torch.cat(embeddings)}

    def encode(self, prompt: str, max_sequence_length: int) -> torch.Tensor:
        """[1, S, D] of one text."""
        with quiet_libraries():
            tokens = self.tokenizer(
                [PROMPT_TEMPLATE.format(prompt)],
                max_length=MAX_TEXT_TOKENS + TEMPLATE_PREFIX_TOKENS,
                truncation=True,
                return_tensors="pt",
            )
        device = self.model.device
        hidden = last_hidden_state(self.model, tokens.input_ids.to(device), tokens.attention_mask.to(device))
        hidden = hidden[:, TEMPLATE_PREFIX_TOKENS:]  # [1, L, D] -> [1, L - 34, D]: the user turn on
        if hidden.shape[1] > max_sequence_length:
            log.warning(
                "the prompt has %d tokens with its template's end; Qwen-Image keeps the first %d",
                hidden.shape[1],
                max_sequence_length,
            )
        return hidden[:, :max_sequence_length].to(self.dtype)

"""HunyuanVideo's prompt encoding, as diffusers' HunyuanVideoPipeline does it: the prompt inside Llama 3's chat
template, the hidden state two layers before the last of a LlamaModel (llava-llama-3-8b's), the template's
system part dropped (its first 95 tokens, crop_start), at most `max_sequence_length` tokens after it; and
CLIP's pooled output of the prompt (77 tokens) beside it.

diffusers pads every prompt to crop_start + max_sequence_length tokens and masks the padding; the transformer
sees padded tokens only as masked keys, so each prompt here keeps its own tokens instead (sgdiff's transformer
takes no mask): the same video, without the padding's work. Texts of unequal lengths are never stacked."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from sgdiff.errors import UserError
from sgdiff.families.hunyuan_video.sampling import HunyuanVideoSampling
from sgdiff.models.loading import read_json
from sgdiff.pipeline.components import library_imports, load_library_model, load_tokenizer, quiet_libraries
from sgdiff.pipeline.text_encoders import ClipPooledEncoder

log = logging.getLogger(__name__)

# diffusers' DEFAULT_PROMPT_TEMPLATE of HunyuanVideoPipeline
PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
CROP_START = 95  # <|begin_of_text|> and the template up to the user turn's text, in Llama 3's tokenizer
HIDDEN_LAYERS_TO_SKIP = 2  # diffusers reads hidden_states[-(2 + 1)]: the output of the third layer from the end

TEXT_ENCODERS = ("LlamaModel",)  # model_index.json's text_encoder classes this family runs (transformers' names)


def load_llama_text_encoder(model_index: dict, folder: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """transformers' LlamaModel without the layers after the one diffusers reads, nor the final norm: its
    `last_hidden_state` is then diffusers' `hidden_states[-3]` (the checkpoint's last two layers and final
    norm are left unread)."""
    entry = model_index.get("text_encoder")
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if name not in TEXT_ENCODERS:
        supported = ", ".join(TEXT_ENCODERS)
        raise UserError(f"text encoder {name} is not supported for HunyuanVideo (supported: {supported})")
    with library_imports():  # (the VAE's diffusers imports alongside)
        from transformers import LlamaModel

    layers = int(read_json(folder / "config.json")["num_hidden_layers"])
    unread = tuple(f"layers.{i}" for i in range(layers - HIDDEN_LAYERS_TO_SKIP, layers)) + ("norm",)
    model: Any = load_library_model(LlamaModel, folder, dtype, device, without=unread)
    model.layers = model.layers[:-HIDDEN_LAYERS_TO_SKIP]
    model.norm = torch.nn.Identity()
    return model


def load_llama_tokenizer(folder: Path) -> Any:
    """The Llama tokenizer as its tokenizer_config.json names it (components.load_tokenizer); where that splits
    the template's system part into other than CROP_START tokens, as its tokenizer.json says (transformers'
    PreTrainedTokenizerFast): transformers 5 builds a class named `LlamaTokenizer(Fast)` anew with
    SentencePiece's pre-tokenizer, which does not split Llama 3's byte-level vocabulary as the file does.
    Refused where neither does: the crop would cut into the prompt or keep part of the template."""
    tokenizer = load_tokenizer(folder)
    if template_prefix_tokens(tokenizer) != CROP_START and (folder / "tokenizer.json").is_file():
        with library_imports():
            from transformers import PreTrainedTokenizerFast

        with quiet_libraries():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    prefix = template_prefix_tokens(tokenizer)
    if prefix != CROP_START:
        raise UserError(
            f"{folder}: the tokenizer splits HunyuanVideo's prompt template up to the prompt into {prefix} tokens, "
            f"not the {CROP_START} of Llama 3's tokenizer that the model was trained with: use the checkpoint's own "
            "tokenizer"
        )
    return tokenizer


def template_prefix_tokens(tokenizer: Any) -> int:
    """How many tokens the template up to the prompt is, <|begin_of_text|> included."""
    with quiet_libraries():
        return len(tokenizer([PROMPT_TEMPLATE.split("{}")[0]]).input_ids[0])


class LlamaPromptEncoder:
    """One text -> [1, S, D]: its tokens after the template's system part, S <= max_sequence_length."""

    def __init__(self, tokenizer: Any, model: Any):
        self.tokenizer = tokenizer
        self.model = model  # None on a rank that never encodes

    def __call__(self, prompt: str, max_sequence_length: int) -> torch.Tensor:
        text = PROMPT_TEMPLATE.format(prompt)
        with quiet_libraries():
            tokens = self.tokenizer(
                [text], max_length=CROP_START + max_sequence_length, truncation=True, return_tensors="pt"
            )
            full_length = len(self.tokenizer([text]).input_ids[0])
        if full_length > CROP_START + max_sequence_length:
            log.warning(
                "the prompt has %d tokens with its template's end; HunyuanVideo keeps the first %d",
                full_length - CROP_START,
                max_sequence_length,
            )
        device = self.model.device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return hidden[:, CROP_START:]  # [1, L, D] -> [1, L - 95, D]: the user turn's text on


class HunyuanPromptEncoder:
    """Texts -> {"encoder_hidden_states": [B, S, D], "pooled_projections": [B, D_clip]}; texts whose Llama
    token counts differ are refused (encode them one per call)."""

    def __init__(self, llama: LlamaPromptEncoder, clip: ClipPooledEncoder, dtype: torch.dtype):
        self.llama, self.clip, self.dtype = llama, clip, dtype

    def __call__(self, prompts: list[str], params: HunyuanVideoSampling) -> dict[str, torch.Tensor]:
        sequences = [self.llama(prompt, params.max_sequence_length) for prompt in prompts]
        if len({s.shape[1] for s in sequences}) > 1:
            raise ValueError("texts of unequal token counts cannot share a forward: encode them one per call")
        return {
            "encoder_hidden_states": torch.cat(sequences).to(self.dtype),
            "pooled_projections": self.clip(prompts).to(self.dtype),
        }

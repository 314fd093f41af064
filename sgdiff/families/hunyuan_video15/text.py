"""HunyuanVideo-1.5's prompt encoding, as diffusers' HunyuanVideo15Pipeline does it: the prompt (" " for an empty
one) as the user turn of Qwen2.5-VL's chat template under a fixed system message, the hidden state two layers
before the last of Qwen2.5-VL's text model, the first 108 tokens dropped (crop_start: the template up to the
prompt), at most `max_sequence_length` tokens after them; and the prompt's quoted texts ("..." or “...”), as
'Text "...". ' each, through ByT5 (at most 256 tokens), for the glyphs a video shows.

diffusers pads the Qwen tokens to 108 + 1000 and the ByT5 ones to 256 (all padding where nothing is quoted) and
passes both masks; sgdiff keeps each text's own tokens (none for ByT5 where nothing is quoted) and passes no
mask, which the transformer reads as the same video (models/hunyuan_video15/transformer.py's docstring), without
the padding's work. Texts of unequal lengths are never stacked."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from sgdiff.errors import UserError
from sgdiff.families.hunyuan_video15.sampling import HunyuanVideo15Sampling
from sgdiff.models.loading import read_json
from sgdiff.pipeline.components import load_library_model, quiet_libraries

log = logging.getLogger(__name__)

# diffusers' HunyuanVideo15Pipeline.system_message, its line continuations' indentation kept as they leave it
SYSTEM_MESSAGE = "You are a helpful assistant. Describe the video by detailing the following aspects:" + "".join(
    f"         {line}"
    for line in (
        "1. The main content and theme of the video.",
        "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects.",
        "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects.",
        "4. background environment, light, style and atmosphere.",
        "5. camera angles, movements, and transitions used in the video.",
    )
)
# Qwen2.5-VL's chat template over [system, user], with the generation prompt, as apply_chat_template renders it
PROMPT_TEMPLATE = (
    "<|im_start|>system\n" + SYSTEM_MESSAGE + "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
CROP_START = 108  # diffusers' prompt_template_encode_start_idx: the template up to the prompt in Qwen's tokenizer
HIDDEN_LAYERS_TO_SKIP = 2  # diffusers reads hidden_states[-(2 + 1)]: the output of the third layer from the end
GLYPH_TOKENS = 256  # diffusers' tokenizer_2_max_length
QUOTED = re.compile(r"\"(.*?)\"|“(.*?)”")

TEXT_ENCODERS = ("Qwen2_5_VLTextModel",)  # model_index.json's text_encoder classes this family runs


def text_encoder_class(model_index: dict) -> type:
    """The transformers class model_index.json names for `text_encoder`, refused unless supported (imported here,
    on the caller's thread: transformers' lazy imports race when loading threads import at once)."""
    entry = model_index.get("text_encoder")
    name = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if name not in TEXT_ENCODERS:
        supported = ", ".join(TEXT_ENCODERS)
        raise UserError(f"text encoder {name} is not supported for HunyuanVideo-1.5 (supported: {supported})")
    import transformers

    return getattr(transformers, name)


def load_qwen_text_encoder(cls: type, folder: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """transformers' Qwen2.5-VL text model (`cls`) without the layers after the one diffusers reads, nor the final
    norm: its `last_hidden_state` is then diffusers' `hidden_states[-3]` (the checkpoint's last two layers and
    final norm are left unread)."""
    layers = int(read_json(folder / "config.json")["num_hidden_layers"])
    unread = tuple(f"layers.{i}" for i in range(layers - HIDDEN_LAYERS_TO_SKIP, layers)) + ("norm",)
    model: Any = load_library_model(cls, folder, dtype, device, without=unread)
    model.layers = model.layers[:-HIDDEN_LAYERS_TO_SKIP]
    model.norm = torch.nn.Identity()
    return model


def glyph_text(prompt: str) -> str | None:
    """The prompt's quoted texts as diffusers' extract_glyph_texts joins them: 'Text "a". Text "b". ' (repeats
    dropped), or None where nothing is quoted."""
    quoted = [straight or curly for straight, curly in QUOTED.findall(prompt)]
    if not quoted:
        return None
    return ". ".join(f'Text "{text}"' for text in dict.fromkeys(quoted)) + ". "


class QwenPromptEncoder:
    """One text -> [1, S, D]: its Qwen2.5-VL tokens after the template's first CROP_START, S <= max_sequence_length."""

    def __init__(self, tokenizer: Any, model: Any):
        self.tokenizer = tokenizer
        self.model = model  # None on a rank that never encodes

    def __call__(self, prompt: str, max_sequence_length: int) -> torch.Tensor:
        text = PROMPT_TEMPLATE.format(prompt or " ")  # diffusers' format_text_input: " " for an empty text
        with quiet_libraries():
            tokens = self.tokenizer([text], max_length=CROP_START + max_sequence_length, truncation=True,
                                    return_tensors="pt")  # fmt: skip
            full_length = len(self.tokenizer([text]).input_ids[0])
        if full_length > CROP_START + max_sequence_length:
            log.warning(
                "the prompt has %d tokens with its template's end; HunyuanVideo-1.5 keeps the first %d",
                full_length - CROP_START,
                max_sequence_length,
            )
        device = self.model.device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        hidden = self.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        return hidden[:, CROP_START:]  # [1, L, D] -> [1, L - 108, D]: the user turn's text on


class GlyphEncoder:
    """One text -> [1, S2, D2]: ByT5's hidden states of its quoted texts (S2 <= 256; 0 where nothing is quoted)."""

    def __init__(self, tokenizer: Any, model: Any):
        self.tokenizer = tokenizer  # transformers' ByT5Tokenizer
        self.model = model  # transformers' T5EncoderModel; None on a rank that never encodes

    def __call__(self, prompt: str) -> torch.Tensor:
        text = glyph_text(prompt)
        if text is None:  # diffusers: 256 zero tokens, all masked
            return torch.zeros(1, 0, self.model.config.d_model, dtype=self.model.dtype, device=self.model.device)
        with quiet_libraries():
            tokens = self.tokenizer([text], max_length=GLYPH_TOKENS, truncation=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.model.device), tokens.attention_mask.to(self.model.device)
        return self.model(input_ids=ids, attention_mask=mask.float()).last_hidden_state  # [1, S2, D2]


class HunyuanVideo15PromptEncoder:
    """Texts -> {"encoder_hidden_states": [B, S, D], "encoder_hidden_states_2": [B, S2, D2]} in the transformer's
    dtype, the second left out where no text quotes anything (no tokens: nothing to send between ranks); texts
    whose token counts differ are refused (encode them one per call)."""

    def __init__(self, qwen: QwenPromptEncoder, glyphs: GlyphEncoder, dtype: torch.dtype):
        self.qwen, self.glyphs, self.dtype = qwen, glyphs, dtype

    def __call__(self, prompts: list[str], params: HunyuanVideo15Sampling) -> dict[str, torch.Tensor]:
        texts = [self.qwen(prompt, params.max_sequence_length) for prompt in prompts]
        glyphs = [self.glyphs(prompt) for prompt in prompts]
        if len({t.shape[1] for t in texts}) > 1 or len({g.shape[1] for g in glyphs}) > 1:
            raise ValueError("texts of unequal token counts cannot share a forward: encode them one per call")
        inputs = {"encoder_hidden_states": torch.cat(texts).to(self.dtype)}
        if glyphs[0].shape[1]:
            inputs["encoder_hidden_states_2"] = torch.cat(glyphs).to(self.dtype)
        return inputs

"""The Edit pipelines' prompt encoding, as diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline do it:
the input images inside the prompt (a vision placeholder each, "Picture 1: ..." numbered in Edit Plus),
the whole in the edit chat template, Qwen2.5-VL's last hidden state over text and image tokens (after its
final norm), the template's system turn dropped (its first 64 tokens). Nothing is cut at
max_sequence_length: the Edit pipelines keep every token.

The placeholders are expanded as transformers' Qwen2VLProcessor expands them (one image token per 2x2
merged patch of the image processor's grid), with the checkpoint's tokenizer and image processor: the
processor object itself needs a video processor, which transformers builds only with torchvision."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sgdiff.errors import UserError
from sgdiff.families.qwen_image.text import last_hidden_state
from sgdiff.models.loading import read_json
from sgdiff.pipeline.base import ParallelMode, Stage, State
from sgdiff.pipeline.components import quiet_libraries, require_folder
from sgdiff.pipeline.stages.text_encoding import CfgScaleOf, repeat_batch

EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_TEMPLATE_PREFIX_TOKENS = 64  # "<|im_start|>system ... appropriate.<|im_end|>\n<|im_start|>user\n" in Qwen's
IMAGE_TOKEN = "<|image_pad|>"
IMAGE_PLACEHOLDER = f"<|vision_start|>{IMAGE_TOKEN}<|vision_end|>"
# preprocessor_config.json's names of Qwen2-VL's image processor (transformers' backends)
IMAGE_PROCESSORS = ("Qwen2VLImageProcessor", "Qwen2VLImageProcessorFast", "Qwen2VLImageProcessorPil")


def load_image_processor(folder: Path) -> Any:
    """The checkpoint's Qwen2-VL image processor (processor/), as transformers builds it: its torchvision
    backend where torchvision is installed, else its PIL twin, as diffusers' Qwen2VLProcessor gets it."""
    raw = read_json(require_folder(folder) / "preprocessor_config.json")
    name = raw.get("image_processor_type", IMAGE_PROCESSORS[0])
    if name not in IMAGE_PROCESSORS:
        raise UserError(f"{folder}: image processor {name} is not supported (supported: {', '.join(IMAGE_PROCESSORS)})")
    import transformers

    with quiet_libraries():
        return transformers.Qwen2VLImageProcessor.from_pretrained(folder)


def edit_prompt(prompt: str, images: int, numbered: bool) -> str:
    """The templated text: the images' placeholders, then the prompt."""
    if numbered:
        placeholders = "".join(f"Picture {i}: {IMAGE_PLACEHOLDER}" for i in range(1, images + 1))
    else:
        placeholders = IMAGE_PLACEHOLDER
    return EDIT_TEMPLATE.format(placeholders + prompt)


def expand_image_tokens(text: str, image_grid_thw: torch.Tensor, merge_size: int) -> str:
    """Each image's one IMAGE_TOKEN repeated once per merged patch of its (t, h, w) grid, in order."""
    parts = text.split(IMAGE_TOKEN)
    if len(parts) != len(image_grid_thw) + 1:
        raise ValueError(f"{len(parts) - 1} image placeholders for {len(image_grid_thw)} images")
    counts = [int(grid.prod()) // merge_size**2 for grid in image_grid_thw]
    return parts[0] + "".join(IMAGE_TOKEN * count + part for count, part in zip(counts, parts[1:], strict=True))


class QwenEditPromptEncoder:
    """(text, images) -> [1, S, D]: S the text's tokens and its images' after the system turn."""

    def __init__(self, tokenizer: Any, image_processor: Any, text_encoder: Any, numbered: bool, dtype: torch.dtype):
        self.tokenizer = tokenizer
        self.image_processor = image_processor  # transformers' Qwen2VLImageProcessor (or its PIL twin)
        self.model = text_encoder
        self.numbered = numbered
        self.dtype = dtype

    def encode(self, prompt: str, images: list) -> torch.Tensor:
        """`images`: PIL images, already resized as the pipeline's variant resizes them for the text encoder."""
        device = self.model.device
        with quiet_libraries():
            vision = self.image_processor(images=images, return_tensors="pt")
            text = edit_prompt(prompt, len(images), self.numbered)
            text = expand_image_tokens(text, vision["image_grid_thw"], self.image_processor.merge_size)
            tokens = self.tokenizer([text], return_tensors="pt")
        hidden = last_hidden_state(
            self.model,
            tokens.input_ids.to(device),
            tokens.attention_mask.to(device),
            pixel_values=vision["pixel_values"].to(device),  # [patches, 3 * 2 * p * p]
            image_grid_thw=vision["image_grid_thw"].to(device),  # [images, 3]
        )
        return hidden[:, EDIT_TEMPLATE_PREFIX_TOKENS:].to(self.dtype)  # [1, L, D] -> [1, L - 64, D]


class QwenEditTextEncodingStage(Stage):
    """The prompt, and the negative prompt under true CFG, each encoded with the request's input images."""

    name = "text_encoding"
    parallel = ParallelMode.RANK0_ONLY
    shares = ("cond", "uncond", "cfg_scale")

    def __init__(self, encoder: QwenEditPromptEncoder, images: Any, cfg_scale_of: CfgScaleOf):
        self.encoder = encoder
        self.images = images  # EditImages (edit_images.py)
        self.cfg_scale_of = cfg_scale_of

    def run(self, state: State) -> None:
        params = state.params
        vl_images = [self.images.vl_image(item) for item in self.images.of(state)]
        copies = params.num_outputs_per_prompt
        state.cond = repeat_batch({"encoder_hidden_states": self.encoder.encode(params.prompt, vl_images)}, copies)
        scale = self.cfg_scale_of(params)
        if scale is not None:
            negative = self.encoder.encode(params.negative_prompt or "", vl_images)
            state.uncond = repeat_batch({"encoder_hidden_states": negative}, copies)
            state.cfg_scale = scale

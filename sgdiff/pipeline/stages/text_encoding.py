from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from sgdiff.pipeline.base import ParallelMode, Stage, State
from sgdiff.sampling import FamilyParams, SamplingParams

# encode(prompts, params) -> model inputs, each with a leading batch dim of len(prompts); what it reads of
# `params` besides the prompts is `max_sequence_length` alone (TextKey)
PromptEncoder = Callable[[list[str], FamilyParams], dict[str, torch.Tensor]]
# The classifier-free guidance scale this request asks for, or None when it runs without CFG.
CfgScaleOf = Callable[[FamilyParams], float | None]
TextKey = tuple[str, int]  # (a text, the max_sequence_length it was encoded at)
EncodedTexts = dict[TextKey, dict[str, torch.Tensor]]


def repeat_batch(inputs: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    """One copy of each prompt's inputs per output: [B, ...] -> [B*times, ...]."""
    return {k: v.repeat_interleave(times, dim=0) for k, v in inputs.items()}


def texts_of(params: SamplingParams, cfg_scale_of: CfgScaleOf) -> list[str]:
    """What a request encodes: its prompt, and its negative prompt when it uses CFG."""
    return [params.prompt] if cfg_scale_of(params) is None else [params.prompt, params.negative_prompt or ""]


def encode_ahead(encode: PromptEncoder, cfg_scale_of: CfgScaleOf, requests: Sequence[SamplingParams]) -> EncodedTexts:
    """The texts of requests to come, encoded one by one as TextEncodingStage encodes them (the same
    calls, so the same values): run while the transformer still loads, their first kernels' cost is
    paid there instead of in the request."""
    encoded: EncodedTexts = {}
    with torch.inference_mode():
        for params in requests:
            for text in texts_of(params, cfg_scale_of):
                key = (text, params.max_sequence_length)
                if key not in encoded:
                    encoded[key] = encode([text], params)
    return encoded


class TextEncodingStage(Stage):
    """Encode the prompt, and the negative prompt when the request uses CFG. With several ranks, rank 0
    encodes and sends the embeddings: the other GPUs hold no text encoder. `encoded`: texts already
    encoded while the model loaded (encode_ahead), each used once."""

    name = "text_encoding"
    parallel = ParallelMode.RANK0_ONLY
    shares = ("cond", "uncond", "cfg_scale")

    def __init__(self, encode: PromptEncoder, cfg_scale_of: CfgScaleOf, encoded: EncodedTexts | None = None):
        self.encode = encode
        self.cfg_scale_of = cfg_scale_of
        self.encoded = encoded if encoded is not None else {}

    def run(self, state: State) -> None:
        params = state.params
        copies = params.num_outputs_per_prompt
        state.cond = repeat_batch(self.encoded_text(params.prompt, params), copies)
        scale = self.cfg_scale_of(params)
        if scale is not None:  # (texts_of's second text)
            state.uncond = repeat_batch(self.encoded_text(params.negative_prompt or "", params), copies)
            state.cfg_scale = scale

    def encoded_text(self, text: str, params: SamplingParams) -> dict[str, torch.Tensor]:
        found = self.encoded.pop((text, params.max_sequence_length), None)
        return found if found is not None else self.encode([text], params)

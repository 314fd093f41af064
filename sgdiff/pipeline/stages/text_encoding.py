from __future__ import annotations

from collections.abc import Callable

import torch

from sgdiff.pipeline.base import ParallelMode, Stage, State
from sgdiff.sampling import FamilyParams

# encode(prompts, params) -> model inputs, each with a leading batch dim of len(prompts)
PromptEncoder = Callable[[list[str], FamilyParams], dict[str, torch.Tensor]]
# The classifier-free guidance scale this request asks for, or None when it runs without CFG.
CfgScaleOf = Callable[[FamilyParams], float | None]


def repeat_batch(inputs: dict[str, torch.Tensor], times: int) -> dict[str, torch.Tensor]:
    """One copy of each prompt's inputs per output: [B, ...] -> [B*times, ...]."""
    return {k: v.repeat_interleave(times, dim=0) for k, v in inputs.items()}


class TextEncodingStage(Stage):
    """Encode the prompt, and the negative prompt when the request uses CFG. With several ranks, rank 0
    encodes and sends the embeddings: the other GPUs hold no text encoder."""

    name = "text_encoding"
    parallel = ParallelMode.RANK0_ONLY
    shares = ("cond", "uncond", "cfg_scale")

    def __init__(self, encode: PromptEncoder, cfg_scale_of: CfgScaleOf):
        self.encode = encode
        self.cfg_scale_of = cfg_scale_of

    def run(self, state: State) -> None:
        params = state.params
        copies = params.num_outputs_per_prompt
        state.cond = repeat_batch(self.encode([params.prompt], params), copies)
        scale = self.cfg_scale_of(params)
        if scale is not None:
            state.uncond = repeat_batch(self.encode([params.negative_prompt or ""], params), copies)
            state.cfg_scale = scale

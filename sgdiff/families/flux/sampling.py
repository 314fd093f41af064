"""What a FLUX.1 request may carry beyond the shared fields, and the rules that refuse what FLUX
would silently ignore."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, replace

from sgdiff.errors import UserError
from sgdiff.pipeline.stages.validation import ValidationRule
from sgdiff.sampling import SamplingParams, checked


@dataclass(frozen=True)
class FluxSampling(SamplingParams):
    # true classifier-free guidance against the negative prompt, as diffusers' FluxPipeline does it
    true_cfg_scale: float = checked(1.0, lambda v: v >= 1, "must be >= 1")


def flux_rules(transformer_config: dict) -> list[ValidationRule]:
    def guidance_needs_embedding(params: FluxSampling) -> None:
        # the value may come from the caller or from a preset: the message says it is the value at fault
        if not transformer_config.get("guidance_embeds") and params.guidance_scale:
            raise UserError(
                f"guidance_scale is {params.guidance_scale:g}, but this FLUX model (schnell-like) has no guidance "
                "embedding: pass `guidance_scale` 0 or `preset` flux.1-schnell (true CFG: `negative_prompt` with "
                "`true_cfg_scale`)",
                field="guidance_scale",
            )

    def true_cfg_pairs(params: FluxSampling) -> None:
        if params.negative_prompt is not None and params.true_cfg_scale <= 1:
            raise UserError(
                "`negative_prompt` is used only with true CFG: add `true_cfg_scale` > 1 (e.g. 4)",
                field="negative_prompt",
            )
        if params.negative_prompt is None and params.true_cfg_scale > 1:
            raise UserError(
                "`true_cfg_scale` needs a `negative_prompt` (FLUX runs true CFG against it)", field="true_cfg_scale"
            )

    return [guidance_needs_embedding, true_cfg_pairs]


def true_cfg_scale_of(params: FluxSampling) -> float | None:
    return params.true_cfg_scale if params.negative_prompt is not None and params.true_cfg_scale > 1 else None


def flux_batch_key(params: FluxSampling) -> Hashable:
    """FLUX requests share a batch when all but their rows agree: the prompt, the negative prompt and
    the seed are each row's own; whether a negative prompt is given decides true CFG, so it is not."""
    return replace(params, prompt="", negative_prompt=None, seed=0), params.negative_prompt is not None

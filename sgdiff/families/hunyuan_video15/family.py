"""HunyuanVideo-1.5 (text to video, image to video) as a model family: what it loads, the fields its requests
carry, its rules, its schedule, its shard plan, the groups its transformer offers the speed toggles and its
blocks for the step caches."""

from __future__ import annotations

from typing import Any

from sgdiff.families.flux.family import flux_modulated_input
from sgdiff.families.hunyuan_video.sampling import hunyuan_video_adjust
from sgdiff.families.hunyuan_video15.sampling import (
    IMAGE_TO_VIDEO,
    TEXT_TO_VIDEO,
    HunyuanVideo15Sampling,
    guidance_cfg,
    hunyuan_video15_given_rules,
    hunyuan_video15_rules,
)
from sgdiff.families.hunyuan_video15.sizes import default_guidance, guider_config, output_size
from sgdiff.pipeline.family import CachePlan, FusableGroups, ModelFamily, imported_when_used


class HunyuanVideo15Family(ModelFamily):
    name = "hunyuan_video15"
    # one pipeline: the checkpoint's class decides whether an input image conditions the video
    pipeline_classes = (TEXT_TO_VIDEO, IMAGE_TO_VIDEO)
    output = "video"
    sampling = HunyuanVideo15Sampling
    text_encoders = frozenset({"text_encoder", "text_encoder_2"})
    # (HunyuanVideo's schedule: Euler over the same sigmas at the checkpoint's fixed shift)
    schedule = imported_when_used("sgdiff.families.hunyuan_video.schedule", "hunyuan_video_schedule")
    load = imported_when_used("sgdiff.families.hunyuan_video15.pipeline", "load_hunyuan_video15_pipeline")
    adjust = staticmethod(hunyuan_video_adjust)  # (the same frames rule)
    given_rules = staticmethod(hunyuan_video15_given_rules)
    cfg_scale_of = staticmethod(guidance_cfg)
    activation_floor = imported_when_used("sgdiff.families.hunyuan_video15.memory", "hunyuan_video15_activation_floor")
    shard = imported_when_used("sgdiff.families.hunyuan_video15.shard", "shard_hunyuan_video15")

    def rules(self, info) -> list:
        guider_config(info.model_dir)  # refused before any weight loads where it asks for more than plain CFG
        return hunyuan_video15_rules(info.pipeline_class, info.transformer_config, info.vae_config)

    def fill_unset(self, info, params: HunyuanVideo15Sampling, unset: frozenset[str]) -> HunyuanVideo15Sampling:
        """The guidance scale of the checkpoint's guider; the size from target_size (and the input image)."""
        return output_size(info, default_guidance(info, params, unset), unset)

    def input_images(self, params: HunyuanVideo15Sampling) -> list[str]:
        return [params.image_path] if params.image_path is not None else []

    def fps(self, params: HunyuanVideo15Sampling) -> int | None:
        return params.fps

    def fusable(self, model: Any) -> FusableGroups:  # a HunyuanVideo15Transformer (Any: its ModuleLists' items)
        """q/k/v of each block's video and context streams and of the text refiner's self-attention; the blocks'
        tanh-GELU MLP inputs (the refiner's MLP is SiLU: no GELU to fuse)."""
        projections: list[tuple] = []
        for block in model.context_embedder.token_refiner.refiner_blocks:
            projections.append((block.attn.to_q, block.attn.to_k, block.attn.to_v))
        for block in model.transformer_blocks:
            a = block.attn
            projections += [(a.to_q, a.to_k, a.to_v), (a.add_q_proj, a.add_k_proj, a.add_v_proj)]
        gelu = [ff.net[0].proj for block in model.transformer_blocks for ff in (block.ff, block.ff_context)]
        return FusableGroups(projections, gelu)

    def cache_plan(self, model: Any) -> CachePlan:
        """One stack of dual-stream blocks ((img, txt) in and out; a forward over rows of unequal context lengths
        runs it once per length, each run its own cache state). TeaCache's signal is FLUX's (the same norm1 and
        (img, txt, temb, ...)), the first block's modulated video stream; no polynomial has been fitted for
        HunyuanVideo-1.5 (HunyuanVideo's was fitted on another model), so its change is used as it is."""
        return CachePlan([list(model.transformer_blocks)], modulated_input=flux_modulated_input)

"""Wan 2.1 / 2.2 (T2V, I2V, TI2V, the A14B experts, FastWan's DMD sampling) as a model family."""

from __future__ import annotations

from typing import Any

from sgdiff.families.wan.magcache import MAX_SKIPS as MAGCACHE_MAX_SKIPS
from sgdiff.families.wan.magcache import wan_magnitude_ratios
from sgdiff.families.wan.sampling import (
    WanSampling,
    guidance_cfg,
    wan_adjust,
    wan_batch_key,
    wan_given_rules,
    wan_rules,
)
from sgdiff.pipeline.family import CachePlan, FusableGroups, ModelFamily, imported_when_used


class WanFamily(ModelFamily):
    name = "wan"
    # one pipeline: the checkpoint's parts decide what it does (image conditioning, experts)
    pipeline_classes = ("WanPipeline", "WanImageToVideoPipeline")
    output = "video"
    sampling = WanSampling
    schedule = imported_when_used("sgdiff.families.wan.pipeline", "WanSchedule.from_dict")
    load = imported_when_used("sgdiff.families.wan.pipeline", "load_wan_pipeline")
    adjust = staticmethod(wan_adjust)
    given_rules = staticmethod(wan_given_rules)
    cfg_scale_of = staticmethod(guidance_cfg)
    batch_key = staticmethod(wan_batch_key)
    shard = imported_when_used("sgdiff.families.wan.shard", "shard_wan")
    warm_up = imported_when_used("sgdiff.families.wan.warm_up", "warm_up_wan")
    activation_floor = imported_when_used("sgdiff.families.wan.memory", "wan_activation_floor")

    def rules(self, info) -> list:
        experts = ((info.model_dir / "transformer").is_dir(), (info.model_dir / "transformer_2").is_dir())
        return wan_rules(info.transformer_config, info.model_index, info.vae_config, experts)

    def input_images(self, params: WanSampling) -> list[str]:
        return [params.image_path] if params.image_path is not None else []

    def fps(self, params: WanSampling) -> int | None:
        return params.fps

    def fusable(self, model: Any) -> FusableGroups:  # a WanTransformer (its nn.ModuleList's items: typed Module)
        projections: list[tuple] = []
        for block in model.blocks:
            self_attention, cross_attention = block.attn1, block.attn2
            projections.append((self_attention.to_q, self_attention.to_k, self_attention.to_v))
            projections.append((cross_attention.to_k, cross_attention.to_v))
        return FusableGroups(projections, [block.ffn.net[0].proj for block in model.blocks])

    def cache_plan(self, model: Any) -> CachePlan:
        # no TeaCache polynomial fitted for this signal: TeaCache4Wan2.1's were fitted on the timestep
        # embedding, not on the modulated input, so the change is used as it is
        cond, uncond = wan_magnitude_ratios(model) or (None, None)
        return CachePlan([list(model.blocks)], modulated_input=wan_modulated_input, magnitude_ratios=cond,
                         magnitude_ratios_uncond=uncond, magcache_max_skips=MAGCACHE_MAX_SKIPS)  # fmt: skip


def wan_modulated_input(block: Any, args: tuple) -> Any:
    """A block's video stream after its first norm and timestep modulation (TeaCache's signal)."""
    x, modulation = args[0], args[3]
    shift, scale = (block.scale_shift_table + modulation.float()).unbind(2)[:2]
    return block.norm1.modulate(x, shift, scale)

"""FLUX.1 [dev] and [schnell] as a model family: what it loads, the fields its requests carry, its
rules, its schedule, its shard plan and the groups its transformer offers the speed toggles."""

from __future__ import annotations

from typing import Any

from sgdiff.families.flux.sampling import FluxSampling, flux_batch_key, flux_rules, true_cfg_scale_of
from sgdiff.pipeline.family import CachePlan, FusableGroups, ModelFamily, imported_when_used
from sgdiff.pipeline.schedule import FlowMatchSchedule


class FluxFamily(ModelFamily):
    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    output = "image"
    sampling = FluxSampling
    text_encoders = frozenset({"text_encoder", "text_encoder_2"})
    schedule = staticmethod(FlowMatchSchedule.from_dict)
    load = imported_when_used("sgdiff.families.flux.pipeline", "load_flux_pipeline")
    cfg_scale_of = staticmethod(true_cfg_scale_of)
    batch_key = staticmethod(flux_batch_key)
    shard = imported_when_used("sgdiff.families.flux.shard", "shard_flux")
    warm_up = imported_when_used("sgdiff.families.flux.warm_up", "warm_up_flux")
    activation_floor = imported_when_used("sgdiff.families.flux.memory", "flux_activation_floor")

    def rules(self, info) -> list:
        return flux_rules(info.transformer_config)

    def fusable(self, model: Any) -> FusableGroups:  # a FluxTransformer (its nn.ModuleLists' items: typed Module)
        projections: list[tuple] = []
        for block in model.transformer_blocks:
            a = block.attn
            projections += [(a.to_q, a.to_k, a.to_v), (a.add_q_proj, a.add_k_proj, a.add_v_proj)]
        for block in model.single_transformer_blocks:
            projections.append((block.attn.to_q, block.attn.to_k, block.attn.to_v))
        gelu = [ff.net[0].proj for block in model.transformer_blocks for ff in (block.ff, block.ff_context)]
        gelu += [block.proj_mlp for block in model.single_transformer_blocks]
        return FusableGroups(projections, gelu)

    def cache_plan(self, model: Any) -> CachePlan:
        return CachePlan(
            [list(model.transformer_blocks), list(model.single_transformer_blocks)],
            modulated_input=flux_modulated_input,
            rescale=TEACACHE_FLUX,
            magnitude_ratios=MAGCACHE_FLUX,
        )


# TeaCache's polynomial fitted for FLUX.1 (ali-vilab/TeaCache, TeaCache4FLUX), highest power first
TEACACHE_FLUX = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)

# MagCache's magnitude ratios calibrated for FLUX.1 [dev] over 28 steps (Ma et al. 2025, "Magnitude-aware
# Cache", github.com/Zehong-Ma/MagCache; diffusers' hooks/mag_cache.py FLUX_MAG_RATIOS)
MAGCACHE_FLUX = (
    1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125, 1.02344, 0.98047, 1.01562,
    1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0, 0.99609, 0.99609, 0.98047, 0.98828, 0.96484, 0.95703, 0.93359,
    0.89062,
)  # fmt: skip


def flux_modulated_input(block: Any, args: tuple) -> Any:
    """A double-stream block's image stream after its first adaLN norm and modulation (TeaCache's signal)."""
    img, _, temb = args[:3]
    shift, scale = block.norm1(temb)[:2]
    return block.norm1.modulate(img, shift, scale)

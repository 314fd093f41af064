"""Qwen-Image as a model family (text to image, and the Edit pipelines: one input image, or several):
what it loads, the fields its requests carry, its rules, its schedule and the groups its transformer
offers the speed toggles and the step caches."""

from __future__ import annotations

from typing import Any

from sgdiff.families.qwen_image.editing import EDIT_VARIANTS, edit_image_rules, output_size_from_image
from sgdiff.families.qwen_image.sampling import (
    QwenImageSampling,
    qwen_image_given_rules,
    qwen_image_rules,
    true_cfg_scale_of,
    vae_scale_factor,
)
from sgdiff.pipeline.family import CachePlan, FusableGroups, ModelFamily, imported_when_used
from sgdiff.pipeline.schedule import FlowMatchSchedule


class QwenImageFamily(ModelFamily):
    name = "qwen_image"
    pipeline_classes = ("QwenImagePipeline", *EDIT_VARIANTS)
    output = "image"
    sampling = QwenImageSampling
    schedule = staticmethod(FlowMatchSchedule.from_dict)
    load = imported_when_used("sgdiff.families.qwen_image.pipeline", "load_qwen_image_pipeline")
    given_rules = staticmethod(qwen_image_given_rules)
    cfg_scale_of = staticmethod(true_cfg_scale_of)
    activation_floor = imported_when_used("sgdiff.families.qwen_image.memory", "qwen_image_activation_floor")
    shard = imported_when_used("sgdiff.families.qwen_image.shard", "shard_qwen_image")

    def rules(self, info) -> list:
        # (the checkpoint's scheduler config; the pipeline checks again with the schedule it runs)
        rules = qwen_image_rules(vae_scale_factor(info.vae_config), info.scheduler_config.get("shift_terminal"))
        return rules + edit_image_rules(info.pipeline_class)

    def input_images(self, params: QwenImageSampling) -> list[str]:
        return list(params.image_path or ())

    def fill_unset(self, info, params: QwenImageSampling, unset: frozenset[str]) -> QwenImageSampling:
        """The Edit pipelines: an output size not given follows an input image's aspect ratio."""
        variant = EDIT_VARIANTS.get(info.pipeline_class)
        if variant is None:
            return params
        return output_size_from_image(variant, params, unset, 2 * vae_scale_factor(info.vae_config))

    def fusable(self, model: Any) -> FusableGroups:  # a QwenImageTransformer (its nn.ModuleList's items: typed Module)
        projections: list[tuple] = []
        for block in model.transformer_blocks:
            a = block.attn
            projections += [(a.to_q, a.to_k, a.to_v), (a.add_q_proj, a.add_k_proj, a.add_v_proj)]
        gelu = [mlp.net[0].proj for block in model.transformer_blocks for mlp in (block.img_mlp, block.txt_mlp)]
        return FusableGroups(projections, gelu)

    def cache_plan(self, model: Any) -> CachePlan:
        # one stack of dual-stream blocks, (img, txt) in and out; no TeaCache polynomial has been fitted for
        # Qwen-Image, so the signal's change is used as it is
        return CachePlan([list(model.transformer_blocks)], modulated_input=qwen_image_modulated_input)


def qwen_image_modulated_input(block: Any, args: tuple) -> Any:
    """A block's image stream after its first LayerNorm and modulation (TeaCache's signal); with zero_cond_t
    (Qwen-Image-Edit-2511) the edit images' tokens are modulated as at t = 0, as the block modulates them.
    The Edit pipelines' image tokens count too (as they do in fbcache's residual): their latents never change,
    so at one threshold an Edit request skips more steps than a text-to-image one."""
    img, _, temb, _, edit_tokens = args  # QwenImageBlock.forward's
    shift, scale = block.image_modulation(temb, edit_tokens).chunk(6, dim=-1)[:2]
    return block.img_mod.modulate(img, shift, scale)

"""Wan 2.1 / 2.2 (T2V, I2V, TI2V, the A14B experts, FastWan's DMD sampling) as a model family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sgdiff.families.wan.sampling import WanSampling, guidance_cfg, wan_adjust, wan_given_rules, wan_rules
from sgdiff.models.wan import WanTransformer
from sgdiff.pipeline.base import ComposedPipeline, PipelineEvents
from sgdiff.pipeline.family import FusableGroups, ModelFamily


class WanFamily(ModelFamily):
    name = "wan"
    # one pipeline: the checkpoint's parts decide what it does (image conditioning, experts)
    pipeline_classes = ("WanPipeline", "WanImageToVideoPipeline")
    output = "video"
    sampling = WanSampling

    def schedule(self, options: dict[str, Any]):
        from sgdiff.families.wan.pipeline import WanSchedule

        return WanSchedule.from_dict(options)

    def rules(self, info) -> list:
        experts = ((info.model_dir / "transformer").is_dir(), (info.model_dir / "transformer_2").is_dir())
        return wan_rules(info.transformer_config, info.model_index, info.vae_config, experts)

    def load(
        self,
        model_dir: Path,
        device: torch.device,
        dtype: torch.dtype,
        schedule: Any,
        events: PipelineEvents,
        skip: frozenset[str],
    ) -> ComposedPipeline:
        from sgdiff.families.wan.pipeline import load_wan_pipeline

        return load_wan_pipeline(model_dir, device, dtype, schedule, events, skip)

    def adjust(self, params: WanSampling) -> WanSampling:
        return wan_adjust(params)

    def given_rules(self, given: set[str], params: WanSampling) -> None:
        wan_given_rules(given, params)

    def cfg_scale_of(self, params: WanSampling) -> float | None:
        return guidance_cfg(params)

    def input_images(self, params: WanSampling) -> list[str]:
        return [params.image_path] if params.image_path is not None else []

    def fps(self, params: WanSampling) -> int | None:
        return params.fps

    def shard(self, model: WanTransformer, attention, groups) -> None:
        from sgdiff.families.wan.shard import shard_wan

        shard_wan(model, attention, groups)

    def fusable(self, model: WanTransformer) -> FusableGroups:
        projections = []
        for block in model.blocks:
            projections += [
                (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v),
                (block.attn2.to_k, block.attn2.to_v),
            ]
        return FusableGroups(projections, [block.ffn.net[0].proj for block in model.blocks])

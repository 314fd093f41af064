"""HunyuanVideo as a model family: what it loads, the fields its requests carry, its rules, its schedule, its
shard plan, the groups its transformer offers the speed toggles and its blocks for the step caches."""

from __future__ import annotations

from typing import Any

from sgdiff.families.flux.family import flux_modulated_input
from sgdiff.families.hunyuan_video.sampling import (
    HunyuanVideoSampling,
    hunyuan_video_adjust,
    hunyuan_video_rules,
    true_cfg_scale_of,
)
from sgdiff.pipeline.family import CachePlan, FusableGroups, ModelFamily, imported_when_used


class HunyuanVideoFamily(ModelFamily):
    name = "hunyuan_video"
    pipeline_classes = ("HunyuanVideoPipeline",)
    output = "video"
    sampling = HunyuanVideoSampling
    text_encoders = frozenset({"text_encoder", "text_encoder_2"})
    schedule = imported_when_used("sgdiff.families.hunyuan_video.schedule", "hunyuan_video_schedule")
    load = imported_when_used("sgdiff.families.hunyuan_video.pipeline", "load_hunyuan_video_pipeline")
    adjust = staticmethod(hunyuan_video_adjust)
    cfg_scale_of = staticmethod(true_cfg_scale_of)
    activation_floor = imported_when_used("sgdiff.families.hunyuan_video.memory", "hunyuan_video_activation_floor")
    shard = imported_when_used("sgdiff.families.hunyuan_video.shard", "shard_hunyuan_video")

    def rules(self, info) -> list:
        return hunyuan_video_rules(info.transformer_config, info.vae_config)

    def fps(self, params: HunyuanVideoSampling) -> int | None:
        return params.fps

    def fusable(self, model: Any) -> FusableGroups:  # a HunyuanVideoTransformer (Any: its ModuleLists' items)
        """FLUX's groups (q/k/v of each dual-stream block's video and text streams and of each single-stream
        block; the tanh-GELU MLP inputs: the dual-stream blocks' and the single-stream blocks' proj_mlp), and
        q/k/v of the text refiner's self-attention (its MLP is SiLU: no GELU to fuse)."""
        projections: list[tuple] = []
        for block in model.context_embedder.token_refiner.refiner_blocks:
            projections.append((block.attn.to_q, block.attn.to_k, block.attn.to_v))
        for block in model.transformer_blocks:
            a = block.attn
            projections += [(a.to_q, a.to_k, a.to_v), (a.add_q_proj, a.add_k_proj, a.add_v_proj)]
        for block in model.single_transformer_blocks:
            projections.append((block.attn.to_q, block.attn.to_k, block.attn.to_v))
        gelu = [ff.net[0].proj for block in model.transformer_blocks for ff in (block.ff, block.ff_context)]
        gelu += [block.proj_mlp for block in model.single_transformer_blocks]
        return FusableGroups(projections, gelu)

    def cache_plan(self, model: Any) -> CachePlan:
        """FLUX's plan: the dual-stream blocks ((img, txt) in and out), then the single-stream blocks (the joined
        stream); the text refiner runs before them on every step. TeaCache's signal is FLUX's (the same
        dual-stream block: norm1, then (img, txt, temb, ...)), the first block's modulated video stream, which
        is the one TeaCache4HunyuanVideo fitted its polynomial on."""
        return CachePlan(
            [list(model.transformer_blocks), list(model.single_transformer_blocks)],
            modulated_input=flux_modulated_input,
            rescale=TEACACHE_HUNYUAN_VIDEO,
        )


# TeaCache's polynomial fitted for HunyuanVideo (ali-vilab/TeaCache, TeaCache4HunyuanVideo/teacache_sample_video.py:
# `coefficients`), highest power first
TEACACHE_HUNYUAN_VIDEO = (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02)

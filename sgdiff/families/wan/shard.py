"""Wan's plan for sequence parallelism: the video tokens (and per-token modulation, Wan2.2 TI2V) are
split before the first block and joined after the last; cross-attention to the prompt runs on the
local queries with no communication."""

from __future__ import annotations

from sgdiff.models.wan import WanTransformer
from sgdiff.parallel.groups import ParallelGroups
from sgdiff.parallel.plans import ShardCache, check_heads
from sgdiff.parallel.sequence import SequenceParallelAttention, SequenceSplit, TokenLayout


def shard_wan(model: WanTransformer, attn: SequenceParallelAttention, groups: ParallelGroups) -> None:
    check_heads(model.config.num_attention_heads, groups.ulysses_degree, groups.ring_degree)
    cache = ShardCache()
    rank = groups.sp_rank

    def before_block(module, args):
        x, context, image_context, modulation, rope = args
        if attn.layout is None:  # the first block of a forward
            cache.shards.clear()
            video = SequenceSplit(x.shape[1], groups.sp_degree)
            attn.layout = TokenLayout((video,))
            x = video.shard(x, 1, rank)
        (video,) = attn.layout.segments
        if modulation.shape[1] != 1:  # one modulation per token (Wan2.2 TI2V): [B, S, 6, D]
            modulation = cache.get(modulation, lambda: video.shard(modulation, 1, rank))
        rope = cache.get(rope, lambda: video.shard(rope, 0, rank))
        return x, context, image_context, modulation, rope

    def after_last(module, args, output):
        assert attn.layout is not None  # set by before_block
        (video,), attn.layout = attn.layout.segments, None
        return video.gather(output, 1, groups.sp_group)

    def enter_cross(module, args):
        attn.local_depth += 1

    def leave_cross(module, args, output):
        attn.local_depth -= 1

    for block in model.blocks:
        attn.hooks.append(block.register_forward_pre_hook(before_block))
        # (nn.ModuleList's items are typed Module, whose unknown attributes are typed Tensor | Module)
        attn.hooks.append(block.attn2.register_forward_pre_hook(enter_cross))  # type: ignore[union-attr]
        attn.hooks.append(block.attn2.register_forward_hook(leave_cross))  # type: ignore[union-attr]
    attn.hooks.append(model.blocks[-1].register_forward_hook(after_last))

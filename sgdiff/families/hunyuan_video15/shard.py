"""HunyuanVideo-1.5's plan for sequence parallelism: HunyuanVideo's (families/hunyuan_video/shard.py) for a model
of dual-stream blocks only.

The joint sequence is [video; context] (models/hunyuan_video15: the context is [image tokens (I2V); ByT5 glyph
tokens; refined Qwen2.5-VL prompt tokens], each prompt cut to its valid tokens, with the identity rotation). The
text refiner, the image and glyph projections and the context's assembly run whole on every rank before the
blocks (the refiner's attention, over a prompt's valid tokens, is plain: no layout is set yet). Before the first block
the video tokens and the context tokens are each split (two segments, parallel/sequence.py, video first), the
rotary table with them, so a rank's local sequence is [video_loc; context_loc] in every block's joint
attention: the layout's order, which Ulysses' all-to-all and the ring's key blocks read.

The model runs one forward (`velocity`) per group of batch rows whose masks leave the same valid token counts
(models/hunyuan_video15/tokens.py); each is a forward of its own here: its first block makes the layout from
the token counts it gets, its last block ends it, and every rank, holding the same inputs, makes the same
groups in the same order.

After the last block each rank keeps its video tokens (the context is not used after it): the model's norm_out
and proj_out, token by token, run on them, and the video is joined after proj_out, whose output has
C_out * p * p * pt channels (32 in HunyuanVideo-1.5) where the stream has 2048: 1/64 of the gather, and 1/N of
the output layer per rank. The blocks' and norm_out's modulation Linears, which every rank would run on the
same temb, are split over the ranks (parallel/modulation.py; the refiner's gates read its own conditioning
and stay whole)."""

from __future__ import annotations

import torch

from sgdiff.models.hunyuan_video15 import HunyuanVideo15Transformer
from sgdiff.parallel.groups import ParallelGroups
from sgdiff.parallel.modulation import ShardedModulation
from sgdiff.parallel.plans import ShardCache, check_heads
from sgdiff.parallel.sequence import SequenceParallelAttention, SequenceSplit, TokenLayout


def shard_hunyuan_video15(
    model: HunyuanVideo15Transformer, attn: SequenceParallelAttention, groups: ParallelGroups
) -> None:
    check_heads(model.config.num_attention_heads, groups.ulysses_degree, groups.ring_degree)
    cache = ShardCache()
    rank, degree = groups.sp_rank, groups.sp_degree
    joined: list[SequenceSplit] = []  # the video split of the forward whose output proj_out gives (joined there)

    def before_block(module, args):
        img, txt, temb, rope = args  # HunyuanVideo15Block.forward's: [B, S_vid, D], [B, S_ctx, D], [B, D], [S, ..]
        if attn.layout is None:  # the first block of a forward (of one group of rows)
            cache.shards.clear()
            video, context = SequenceSplit(img.shape[1], degree), SequenceSplit(txt.shape[1], degree)
            attn.layout = TokenLayout((video, context))  # the local sequence: [video_loc; context_loc]
            img, txt = video.shard(img, 1, rank), context.shard(txt, 1, rank)
        video, context = attn.layout.segments
        # [S_vid + S_ctx, D_h/2, 2] -> [S_vid_loc + S_ctx_loc, D_h/2, 2]
        local = cache.get(
            rope,
            lambda: torch.cat([video.shard(rope[: video.full], 0, rank), context.shard(rope[video.full :], 0, rank)]),
        )
        return img, txt, temb, local

    def after_last(module, args, output):
        """The forward's blocks are done: this rank's video tokens, [B, S_vid_loc, D], go on to norm_out and
        proj_out (the context tokens are not read again)."""
        assert attn.layout is not None  # set by before_block
        (video, _), attn.layout = attn.layout.segments, None
        joined[:] = [video]
        return output

    def join_video(module, args, output: torch.Tensor) -> torch.Tensor:
        # [B, S_vid_loc, C] from every rank -> [B, S_vid, C], the padding dropped
        (video,) = joined
        joined.clear()
        return video.gather(output, 1, groups.sp_group)

    hooks: list = [block.register_forward_pre_hook(before_block) for block in model.transformer_blocks]
    hooks.append(model.transformer_blocks[-1].register_forward_hook(after_last))
    hooks.append(model.proj_out.register_forward_hook(join_video))
    hooks.append(ShardedModulation(model, model.time_embed, groups.sp_group, rank, degree))
    attn.hooks += hooks

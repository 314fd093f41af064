"""HunyuanVideo's plan for sequence parallelism: FLUX's (families/flux/shard.py) in HunyuanVideo's order.

The joint sequence is [video; text] (models/hunyuan_video: both in the blocks' joint attention and in the
single stream, [img; txt] joined). The video tokens and the text tokens are each split before the first
dual-stream block (two segments, parallel/sequence.py, video first), the rotary table with them, so a
rank's local sequence is [video_loc; text_loc] in the dual blocks' joint attention and in the single
stream alike: the layout's order, which Ulysses' all-to-all and the ring's key blocks read. The text
refiner (context_embedder) runs whole on every rank before the blocks (a few hundred tokens; its
attention is plain: no layout is set yet).

After the last block each rank keeps its video tokens (the text is not used after it): the model's
norm_out and proj_out, token by token, run on them, and the video is joined after proj_out, whose
output has C_out * p * p * pt channels (64 in HunyuanVideo) where the stream has 3072: 1/48 of the
gather, and 1/N of the output layer per rank. The modulation Linears, which every rank would run on
the same temb, are split over the ranks (parallel/modulation.py; the refiner's gates read its own
conditioning and stay whole)."""

from __future__ import annotations

import torch

from sgdiff.models.hunyuan_video import HunyuanVideoTransformer
from sgdiff.parallel.groups import ParallelGroups
from sgdiff.parallel.modulation import ShardedModulation
from sgdiff.parallel.plans import ShardCache, check_heads
from sgdiff.parallel.sequence import SequenceParallelAttention, SequenceSplit, TokenLayout


def shard_hunyuan_video(
    model: HunyuanVideoTransformer, attn: SequenceParallelAttention, groups: ParallelGroups
) -> None:
    check_heads(model.config.num_attention_heads, groups.ulysses_degree, groups.ring_degree)
    cache = ShardCache()
    rank, degree = groups.sp_rank, groups.sp_degree
    joined: list[SequenceSplit] = []  # the video split of the forward whose output proj_out gives (joined there)

    def local_rope(rope: torch.Tensor) -> torch.Tensor:  # [S_vid + S_txt, ...] -> [S_vid_loc + S_txt_loc, ...]
        assert attn.layout is not None  # set by before_dual
        video, text = attn.layout.segments
        return cache.get(
            rope, lambda: torch.cat([video.shard(rope[: video.full], 0, rank), text.shard(rope[video.full :], 0, rank)])
        )

    def before_dual(module, args):
        img, txt, temb, rope = args  # DualStreamBlock.forward's
        if attn.layout is None:  # the first block of a forward
            cache.shards.clear()
            video, text = SequenceSplit(img.shape[1], degree), SequenceSplit(txt.shape[1], degree)
            attn.layout = TokenLayout((video, text))  # the local sequence: [video_loc; text_loc]
            img, txt = video.shard(img, 1, rank), text.shard(txt, 1, rank)
        return img, txt, temb, local_rope(rope)

    def before_single(module, args):
        x, temb, rope = args  # SingleStreamBlock.forward's; x: [B, S_vid_loc + S_txt_loc, D]
        return x, temb, local_rope(rope)

    def after_last(module, args, output):
        """This rank's video tokens, [B, S_vid_loc, D]: the model keeps its first S_vid tokens (all of them)."""
        assert attn.layout is not None  # set by before_dual
        (video, _), attn.layout = attn.layout.segments, None
        joined[:] = [video]
        if isinstance(output, tuple):  # a dual-stream block (a model without single blocks): (img, txt)
            img, txt = output
            return img, txt[:, :0]  # the model joins [img; txt] and keeps the video: no text
        return output[:, : video.local]

    def join_video(module, args, output: torch.Tensor) -> torch.Tensor:
        # [B, S_vid_loc, C] from every rank -> [B, S_vid, C], the padding dropped
        (video,) = joined
        joined.clear()
        return video.gather(output, 1, groups.sp_group)

    hooks: list = [block.register_forward_pre_hook(before_dual) for block in model.transformer_blocks]
    hooks += [block.register_forward_pre_hook(before_single) for block in model.single_transformer_blocks]
    hooks.append([*model.transformer_blocks, *model.single_transformer_blocks][-1].register_forward_hook(after_last))
    hooks.append(model.proj_out.register_forward_hook(join_video))
    hooks.append(ShardedModulation(model, model.time_text_embed, groups.sp_group, rank, degree))
    attn.hooks += hooks

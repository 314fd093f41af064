"""FLUX's plan for sequence parallelism: the text tokens and the image tokens are each split before
the first double-stream block (two segments, parallel/sequence.py), the rotary table likewise; the
image tokens are joined after the last block (the text tokens are not used after it). The adaLN
modulation Linears, which every rank would run on the same temb, are split over the ranks
(parallel/modulation.py)."""

from __future__ import annotations

import torch

from sgdiff.models.flux import FluxTransformer
from sgdiff.parallel.groups import ParallelGroups
from sgdiff.parallel.modulation import ShardedModulation
from sgdiff.parallel.plans import ShardCache, check_heads
from sgdiff.parallel.sequence import SequenceParallelAttention, SequenceSplit, TokenLayout


def shard_flux(model: FluxTransformer, attn: SequenceParallelAttention, groups: ParallelGroups) -> None:
    check_heads(model.config.num_attention_heads, groups.ulysses_degree, groups.ring_degree)
    cache = ShardCache()
    rank, degree = groups.sp_rank, groups.sp_degree

    def local_rope(rope: torch.Tensor) -> torch.Tensor:  # [S_txt + S_img, ...] -> [S_txt_loc + S_img_loc, ...]
        assert attn.layout is not None  # set by before_double
        text, image = attn.layout.segments
        return cache.get(
            rope, lambda: torch.cat([text.shard(rope[: text.full], 0, rank), image.shard(rope[text.full :], 0, rank)])
        )

    def before_double(module, args):
        img, txt, temb, rope = args
        if attn.layout is None:  # the first block of a forward
            cache.shards.clear()
            text, image = SequenceSplit(txt.shape[1], degree), SequenceSplit(img.shape[1], degree)
            attn.layout = TokenLayout((text, image))
            img, txt = image.shard(img, 1, rank), text.shard(txt, 1, rank)
        return img, txt, temb, local_rope(rope)

    def before_single(module, args):
        x, temb, rope = args
        return x, temb, local_rope(rope)

    def after_last(module, args, output):
        assert attn.layout is not None  # set by before_double
        (text, image), attn.layout = attn.layout.segments, None
        if isinstance(output, tuple):  # a double-stream block: (img, txt)
            return image.gather(output[0], 1, groups.sp_group), text.gather(output[1], 1, groups.sp_group)
        # single stream [B, S_txt_loc + S_img_loc, D]: the model cuts its local text length off the front
        return torch.cat([output[:, : text.local], image.gather(output[:, text.local :], 1, groups.sp_group)], dim=1)

    hooks: list = [block.register_forward_pre_hook(before_double) for block in model.transformer_blocks]
    hooks += [block.register_forward_pre_hook(before_single) for block in model.single_transformer_blocks]
    hooks.append([*model.transformer_blocks, *model.single_transformer_blocks][-1].register_forward_hook(after_last))
    hooks.append(ShardedModulation(model, model.time_text_embed, groups.sp_group, rank, degree))
    attn.hooks += hooks

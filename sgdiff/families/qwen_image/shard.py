"""Qwen-Image's plan for sequence parallelism. Its blocks are FLUX's double-stream blocks: the text
tokens and the image tokens (the noise tokens, then any Edit input images' tokens) are each split
before the first block (two segments, parallel/sequence.py), the rotary table and zero_cond_t's
per-token choice of conditioning with them; the image tokens are joined after the last block (the
text is not used after it, so it stays split). The modulation Linears (Modulation, as diffusers lays
them out) run whole on every rank."""

from __future__ import annotations

import torch

from sgdiff.models.qwen_image import QwenImageTransformer
from sgdiff.parallel.groups import ParallelGroups
from sgdiff.parallel.plans import ShardCache, check_heads
from sgdiff.parallel.sequence import SequenceParallelAttention, SequenceSplit, TokenLayout


def shard_qwen_image(model: QwenImageTransformer, attn: SequenceParallelAttention, groups: ParallelGroups) -> None:
    check_heads(model.config.num_attention_heads, groups.ulysses_degree, groups.ring_degree)
    cache = ShardCache()
    rank, degree = groups.sp_rank, groups.sp_degree

    def before_block(module, args):
        img, txt, temb, rope, edit_tokens = args  # QwenImageBlock.forward's
        if attn.layout is None:  # the first block of a forward
            cache.shards.clear()
            text, image = SequenceSplit(txt.shape[1], degree), SequenceSplit(img.shape[1], degree)
            attn.layout = TokenLayout((text, image))
            img, txt = image.shard(img, 1, rank), text.shard(txt, 1, rank)
        text, image = attn.layout.segments
        # [S_txt + S_img, D/2, 2] -> [S_txt_loc + S_img_loc, D/2, 2], as the local sequence is laid out
        rope = cache.get(
            rope, lambda: torch.cat([text.shard(rope[: text.full], 0, rank), image.shard(rope[text.full :], 0, rank)])
        )
        if edit_tokens is not None:  # [S_img, 1] -> [S_img_loc, 1] (padding: False, the noise tokens' choice)
            edit_tokens = cache.get(edit_tokens, lambda: image.shard(edit_tokens, 0, rank))
        return img, txt, temb, rope, edit_tokens

    def after_last(module, args, output):
        assert attn.layout is not None  # set by before_block
        (_, image), attn.layout = attn.layout.segments, None
        img, txt = output
        return image.gather(img, 1, groups.sp_group), txt  # (this rank's text tokens: the model drops them)

    for block in model.transformer_blocks:
        attn.hooks.append(block.register_forward_pre_hook(before_block))
    attn.hooks.append(model.transformer_blocks[-1].register_forward_hook(after_last))

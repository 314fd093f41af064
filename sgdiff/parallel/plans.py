"""Where each model's tokens are split and joined for sequence parallelism, applied to a built
model with forward hooks on its blocks (the model code stays single-GPU math).

FLUX: the text tokens and the image tokens are each split before the first double-stream block
(two segments, parallel/sequence.py), the rotary table likewise; the image tokens are joined after
the last block (the text tokens are not used after it). The adaLN modulation Linears, which every
rank would run on the same temb, are split over the ranks (parallel/modulation.py). Wan: the video tokens
(and per-token modulation, Wan2.2 TI2V) are split before the first block and joined after the last;
cross-attention to the prompt runs on the local queries with no communication.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sgdiff.errors import UserError
from sgdiff.models.attention import AttentionImpl, sdpa_attention
from sgdiff.models.flux import FluxTransformer
from sgdiff.models.wan import WanTransformer
from sgdiff.parallel.groups import ParallelGroups
from sgdiff.parallel.modulation import ShardedModulation
from sgdiff.parallel.sequence import SequenceParallelAttention, SequenceSplit, TokenLayout


class ShardCache:
    """Shards of tensors every block receives whole (the rotary table, per-token modulation),
    made once per forward."""

    def __init__(self):
        self.shards: dict[int, torch.Tensor] = {}

    def get(self, tensor: torch.Tensor, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = id(tensor)
        if key not in self.shards:
            self.shards[key] = make()
        return self.shards[key]


def check_heads(heads: int, ulysses_degree: int, ring_degree: int = 1) -> None:
    """A clear error where Ulysses cannot split the model's heads evenly, naming the Ulysses x ring
    split of the same sequence-parallel ranks that can (a ring splits the sequence, not the heads)."""
    if heads % ulysses_degree:
        ranks = ulysses_degree * ring_degree
        fits = max(u for u in range(1, ranks + 1) if ranks % u == 0 and heads % u == 0)
        instead = f"--ring-degree {ranks}" if fits == 1 else f"--ulysses-degree {fits} --ring-degree {ranks // fits}"
        raise UserError(
            f"--ulysses-degree {ulysses_degree} must divide the model's {heads} attention heads; "
            f"for {ranks} sequence-parallel ranks pass {instead} (ring attention splits the sequence, not the heads)"
        )


def shard_flux(model: FluxTransformer, attn: SequenceParallelAttention, groups: ParallelGroups) -> None:
    check_heads(model.config.num_attention_heads, groups.config.ulysses_degree, groups.config.ring_degree)
    cache = ShardCache()
    rank, degree = groups.sp_rank, groups.sp_degree

    def local_rope(rope: torch.Tensor) -> torch.Tensor:  # [S_txt + S_img, ...] -> [S_txt_loc + S_img_loc, ...]
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
        (text, image), attn.layout = attn.layout.segments, None
        if isinstance(output, tuple):  # a double-stream block: (img, txt)
            return image.gather(output[0], 1, groups.sp_group), text.gather(output[1], 1, groups.sp_group)
        # single stream [B, S_txt_loc + S_img_loc, D]: the model cuts its local text length off the front
        return torch.cat([output[:, : text.local], image.gather(output[:, text.local :], 1, groups.sp_group)], dim=1)

    hooks = [block.register_forward_pre_hook(before_double) for block in model.transformer_blocks]
    hooks += [block.register_forward_pre_hook(before_single) for block in model.single_transformer_blocks]
    hooks.append([*model.transformer_blocks, *model.single_transformer_blocks][-1].register_forward_hook(after_last))
    hooks.append(ShardedModulation(model, model.time_text_embed, groups.sp_group, rank, degree))
    attn.hooks += hooks


def shard_wan(model: WanTransformer, attn: SequenceParallelAttention, groups: ParallelGroups) -> None:
    check_heads(model.config.num_attention_heads, groups.config.ulysses_degree, groups.config.ring_degree)
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
        (video,), attn.layout = attn.layout.segments, None
        return video.gather(output, 1, groups.sp_group)

    def enter_cross(module, args):
        attn.local_depth += 1

    def leave_cross(module, args, output):
        attn.local_depth -= 1

    for block in model.blocks:
        attn.hooks.append(block.register_forward_pre_hook(before_block))
        attn.hooks.append(block.attn2.register_forward_pre_hook(enter_cross))
        attn.hooks.append(block.attn2.register_forward_hook(leave_cross))
    attn.hooks.append(model.blocks[-1].register_forward_hook(after_last))


def apply_sequence_parallel(
    models: list[nn.Module], groups: ParallelGroups, inner: AttentionImpl = sdpa_attention, exchange: str = "auto"
) -> SequenceParallelAttention:
    """Shard every transformer of a pipeline; returns the attention implementation to install (it runs
    `inner`, the single-GPU kernel, on what each rank holds; `exchange`: SequenceParallelAttention's)."""
    attn = SequenceParallelAttention(groups, inner, exchange)
    for model in models:
        if isinstance(model, FluxTransformer):
            shard_flux(model, attn, groups)
        elif isinstance(model, WanTransformer):
            shard_wan(model, attn, groups)
        else:
            raise UserError(f"sequence parallelism is not available for {type(model).__name__}")
    return attn

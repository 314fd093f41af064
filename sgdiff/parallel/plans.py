"""Where each model's latent tokens are split and joined for sequence parallelism, applied to a built
model with forward hooks on its blocks (the model code stays single-GPU math).

FLUX: the image tokens are split before the first double-stream block (text tokens stay whole on
every rank), the rotary table likewise; they are joined after the last block. Wan: the video tokens
(and per-token modulation, Wan2.2 TI2V) are split before the first block and joined after the last;
cross-attention to the prompt runs on the local queries with no communication.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from sgdiff.errors import UserError
from sgdiff.models.flux import FluxTransformer
from sgdiff.models.wan import WanTransformer
from sgdiff.parallel.groups import ParallelGroups
from sgdiff.parallel.sequence import SequenceParallelAttention, SequenceSplit


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


def check_heads(heads: int, ulysses_degree: int) -> None:
    if heads % ulysses_degree:
        raise UserError(f"--ulysses-degree {ulysses_degree} must divide the model's {heads} attention heads")


def shard_flux(model: FluxTransformer, attn: SequenceParallelAttention, groups: ParallelGroups) -> None:
    check_heads(model.config.num_attention_heads, groups.config.ulysses_degree)
    cache = ShardCache()
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]

    def local_rope(rope: torch.Tensor) -> torch.Tensor:  # [S_txt + S_img, ...] -> [S_txt + S_loc, ...]
        t = attn.text_len
        return cache.get(rope, lambda: torch.cat([rope[:t], attn.split.shard(rope[t:], 0, groups.sp_rank)]))

    def before_double(module, args):
        img, txt, temb, rope = args
        if attn.split is None:  # the first block of a forward
            cache.shards.clear()
            attn.split, attn.text_len = SequenceSplit(img.shape[1], groups.sp_degree), txt.shape[1]
            img = attn.split.shard(img, 1, groups.sp_rank)
        return img, txt, temb, local_rope(rope)

    def before_single(module, args):
        x, temb, rope = args
        return x, temb, local_rope(rope)

    def after_last(module, args, output):
        split, t = attn.split, attn.text_len
        attn.split = None
        if isinstance(output, tuple):  # a double-stream block: (img, txt)
            return split.gather(output[0], 1, groups.sp_group), output[1]
        return torch.cat([output[:, :t], split.gather(output[:, t:], 1, groups.sp_group)], dim=1)

    hooks = [block.register_forward_pre_hook(before_double) for block in model.transformer_blocks]
    hooks += [block.register_forward_pre_hook(before_single) for block in model.single_transformer_blocks]
    hooks.append(blocks[-1].register_forward_hook(after_last))
    attn.hooks += hooks


def shard_wan(model: WanTransformer, attn: SequenceParallelAttention, groups: ParallelGroups) -> None:
    check_heads(model.config.num_attention_heads, groups.config.ulysses_degree)
    cache = ShardCache()

    def before_block(module, args):
        x, context, image_context, modulation, rope = args
        if attn.split is None:  # the first block of a forward
            cache.shards.clear()
            attn.split, attn.text_len = SequenceSplit(x.shape[1], groups.sp_degree), 0
            x = attn.split.shard(x, 1, groups.sp_rank)
        if modulation.shape[1] != 1:  # one modulation per token (Wan2.2 TI2V): [B, S, 6, D]
            modulation = cache.get(modulation, lambda: attn.split.shard(modulation, 1, groups.sp_rank))
        rope = cache.get(rope, lambda: attn.split.shard(rope, 0, groups.sp_rank))
        return x, context, image_context, modulation, rope

    def after_last(module, args, output):
        split, attn.split = attn.split, None
        return split.gather(output, 1, groups.sp_group)

    def enter_cross(module, args):
        attn.local_depth += 1

    def leave_cross(module, args, output):
        attn.local_depth -= 1

    for block in model.blocks:
        attn.hooks.append(block.register_forward_pre_hook(before_block))
        attn.hooks.append(block.attn2.register_forward_pre_hook(enter_cross))
        attn.hooks.append(block.attn2.register_forward_hook(leave_cross))
    attn.hooks.append(model.blocks[-1].register_forward_hook(after_last))


def apply_sequence_parallel(models: list[nn.Module], groups: ParallelGroups) -> SequenceParallelAttention:
    """Shard every transformer of a pipeline; returns the attention implementation to install."""
    attn = SequenceParallelAttention(groups)
    for model in models:
        if isinstance(model, FluxTransformer):
            shard_flux(model, attn, groups)
        elif isinstance(model, WanTransformer):
            shard_wan(model, attn, groups)
        else:
            raise UserError(f"sequence parallelism is not available for {type(model).__name__}")
    return attn

"""Sequence-parallel attention: Ulysses (all-to-all over heads), Ring (K/V blocks passed around a
ring, merged by log-sum-exp) and both together (USP). Installed behind models/attention.py's one
entry point; parallel/plans.py shards a model's tokens before its blocks and gathers them after.

Each rank holds `local` latent tokens of a sequence padded to `padded` = local * sp_degree (shard i
holds tokens [i*local, (i+1)*local)). Padding never reaches a softmax: padded keys are cut off before
attention, padded queries are dropped when the sequence is gathered. Text tokens that every rank
holds (FLUX's joint attention puts them first) are not communicated: each rank uses its own copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from sgdiff.models.attention import AttentionImpl, sdpa_attention
from sgdiff.parallel.groups import ParallelGroups


@dataclass(frozen=True)
class SequenceSplit:
    """How one forward's latent tokens are split over the sequence-parallel ranks."""

    full: int  # real tokens
    degree: int

    @property
    def local(self) -> int:
        return -(-self.full // self.degree)

    @property
    def padded(self) -> int:
        return self.local * self.degree

    def shard(self, x: torch.Tensor, dim: int, sp_rank: int) -> torch.Tensor:
        """This rank's `local` tokens of x along dim (zero-padded at the end)."""
        if self.padded != self.full:
            pad = list(x.shape)
            pad[dim] = self.padded - self.full
            x = torch.cat([x, x.new_zeros(pad)], dim=dim)
        return x.narrow(dim, sp_rank * self.local, self.local).contiguous()

    def gather(self, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        """The whole sequence along dim from every rank's shard, padding removed."""
        parts = [torch.empty_like(x) for _ in range(self.degree)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, self.full)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and its log-sum-exp. q, k, v: [B, S, H, D] -> out [B, S, H, D], lse [B, S, H] float32."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt)[:2]
    return out.transpose(1, 2), lse.transpose(1, 2).float()


def merge_partials(partials: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Softmax over all keys from attention over disjoint key blocks: weight each block's output by
    exp(its lse - the total lse)."""
    total = torch.logsumexp(torch.stack([lse for _, lse in partials]), dim=0)  # [B, S, H]
    out = sum(o.float() * torch.exp(lse - total)[..., None] for o, lse in partials)
    return out.to(partials[0][0].dtype)


def heads_to_sequence(tensors: tuple[torch.Tensor, ...], group: dist.ProcessGroup, degree: int) -> tuple:
    """Ulysses all-to-all, one collective for all of `tensors` (q, k, v): each [B, S_loc, H, D] (all heads
    of my tokens) -> [B, degree*S_loc, H/degree, D] (my heads of every rank's tokens, in rank order)."""
    b, s, h, d = tensors[0].shape
    n = len(tensors)
    send = tensors[0].new_empty(degree, n, b, s, h // degree, d)  # [U (dest rank), n, B, S_loc, H/U, D]
    for i, x in enumerate(tensors):
        send[:, i].copy_(x.view(b, s, degree, h // degree, d).permute(2, 0, 1, 3, 4))
    received = torch.empty_like(send)  # [U (source rank), n, B, S_loc, H/U, D]
    dist.all_to_all_single(received, send, group=group)
    gathered = received.permute(1, 2, 0, 3, 4, 5).reshape(n, b, degree * s, h // degree, d)
    return tuple(gathered.unbind(0))


def sequence_to_heads(x: torch.Tensor, group: dist.ProcessGroup, degree: int) -> torch.Tensor:
    """The inverse all-to-all: [B, degree*S_loc, H/degree, D] -> [B, S_loc, H, D]."""
    b, s_all, hu, d = x.shape
    s = s_all // degree
    send = x.view(b, degree, s, hu, d).permute(1, 0, 2, 3, 4).contiguous()  # [U (dest rank), B, S_loc, H/U, D]
    received = torch.empty_like(send)  # [U (source = head group), B, S_loc, H/U, D]
    dist.all_to_all_single(received, send, group=group)
    return received.permute(1, 2, 0, 3, 4).reshape(b, s, degree * hu, d)


def gather_heads(x: torch.Tensor, group: dist.ProcessGroup, degree: int) -> torch.Tensor:
    """[B, S, H/degree, D] per rank -> [B, S, H, D] (every rank's head group, in rank order)."""
    parts = [torch.empty_like(x) for _ in range(degree)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=2)


class SequenceParallelAttention:
    """The attention implementation of a sequence-parallel rank (an AttentionImpl).

    plans.py sets, per forward: `split` (None outside a sharded forward: plain attention), `text_len`
    (replicated text tokens in front of the latent tokens of q, k and v) and `local_depth` (> 0 inside
    a cross-attention whose keys are replicated: plain attention on the local queries)."""

    def __init__(self, groups: ParallelGroups, inner: AttentionImpl = sdpa_attention):
        self.groups = groups
        self.inner = inner
        self.split: SequenceSplit | None = None
        self.text_len = 0
        self.local_depth = 0
        self.hooks: list = []  # the forward hooks that shard the models (plans.py)

    def remove(self) -> None:
        """Take the sharding hooks off the models again (they become single-GPU models)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.split is None or self.local_depth:
            return self.inner(q, k, v)
        g, t = self.groups, self.text_len
        u, r = g.config.ulysses_degree, g.config.ring_degree
        text, latent = (q[:, :t], k[:, :t], v[:, :t]), (q[:, t:], k[:, t:], v[:, t:])
        if u > 1:  # [B, S_loc, H, D] -> [B, U*S_loc, H/U, D]; text: my heads only, no communication
            latent = heads_to_sequence(latent, g.ulysses_group, u)
            heads = q.shape[2] // u
            text = tuple(x[:, :, g.ulysses_rank * heads : (g.ulysses_rank + 1) * heads] for x in text)
        block = u * self.split.local  # latent tokens per ring rank after the all-to-all
        queries = torch.cat([text[0], latent[0]], dim=1)
        if r == 1:
            valid = self.split.full  # the whole sequence is here: cut off its padding
            keys, values = (torch.cat([text[i], latent[i][:, :valid]], dim=1) for i in (1, 2))
            out = self.inner(queries, keys, values)
        else:
            out = self.ring(queries, text, latent[1], latent[2], block)
        text_out, latent_out = out[:, :t], out[:, t:]
        if u > 1:
            latent_out = sequence_to_heads(latent_out, g.ulysses_group, u)
            text_out = gather_heads(text_out, g.ulysses_group, u) if t else text_out
        return torch.cat([text_out, latent_out], dim=1) if t else latent_out

    def ring(self, queries, text, k_block, v_block, block: int) -> torch.Tensor:
        """My queries against the text keys and every ring rank's latent key block: the blocks travel
        round the ring (send to the next rank, receive from the previous one) while I compute."""
        g, r = self.groups, self.groups.config.ring_degree
        partials = [attention_with_lse(queries, text[1], text[2])] if self.text_len else []
        kv = torch.stack([k_block, v_block])  # [2, B, block, H', D]
        nxt, prev = g.ring_ranks[(g.ring_rank + 1) % r], g.ring_ranks[(g.ring_rank - 1) % r]
        for step in range(r):
            source = (g.ring_rank - step) % r  # whose block `kv` is
            pending = None
            if step < r - 1:
                incoming = torch.empty_like(kv)
                send = dist.P2POp(dist.isend, kv, nxt, g.ring_group)
                pending = dist.batch_isend_irecv([send, dist.P2POp(dist.irecv, incoming, prev, g.ring_group)])
            valid = min(max(self.split.full - source * block, 0), block)  # real tokens of that block
            if valid:
                partials.append(attention_with_lse(queries, kv[0][:, :valid], kv[1][:, :valid]))
            if pending is not None:
                for request in pending:
                    request.wait()
                kv = incoming
        return merge_partials(partials)

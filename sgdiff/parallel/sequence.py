"""Sequence-parallel attention: Ulysses (all-to-all over heads), Ring (K/V blocks passed around a
ring, merged by log-sum-exp) and both together (USP); on one host both exchange through symmetric
memory (symmetric_exchange.py, symmetric_ring.py); Ulysses-2 over a model's streams (FLUX's
joint_attention) moves their input instead of q, k and v (input_exchange.py). Installed behind
models/attention.py's one entry point; parallel/plans.py shards a model's tokens before its blocks
and gathers them after.

A model's sequence is one or more segments (FLUX's joint attention: text tokens, then image
tokens; Wan: video tokens). Each segment is split on its own over the sp ranks: rank i holds
tokens [i*local, (i+1)*local) of the segment, zero-padded at the end, so every rank's local sequence
is one shard of each segment in order. Every token, text included, lives on exactly one rank: with
FLUX's 512 text tokens held whole on every rank, each of 2 ranks would run 2560 of the 4608 tokens
through every projection and MLP, capping Ulysses-2 at 1.8x. Padding never reaches a softmax:
padded keys are cut out before attention, padded queries are dropped when segments are gathered.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.distributed as dist

from sgdiff.kernels.partial_attention import attention_with_lse, merge_partials
from sgdiff.models.attention import AttentionImpl, sdpa_attention
from sgdiff.models.streams import Stream, head_adapters
from sgdiff.parallel.groups import ParallelGroups
from sgdiff.parallel.input_exchange import HeadWeights, gather_inputs, gather_tokens, normed_qkv, project_rank
from sgdiff.parallel.symmetric_exchange import SymmetricUlysses, symmetric_memory_usable
from sgdiff.parallel.symmetric_ring import SymmetricRing, ring_sources


@dataclass(frozen=True)
class SequenceSplit:
    """How one segment's tokens are split over the sequence-parallel ranks."""

    full: int  # real tokens
    degree: int

    @property
    def local(self) -> int:
        return -(-self.full // self.degree)

    @property
    def padded(self) -> int:
        return self.local * self.degree

    def valid(self, shard: int) -> int:
        """Real (not padding) tokens of shard `shard`."""
        return min(max(self.full - shard * self.local, 0), self.local)

    def shard(self, x: torch.Tensor, dim: int, sp_rank: int) -> torch.Tensor:
        """This rank's `local` tokens of x along dim (zero-padded at the end)."""
        if self.padded != self.full:
            pad = list(x.shape)
            pad[dim] = self.padded - self.full
            x = torch.cat([x, x.new_zeros(pad)], dim=dim)
        return x.narrow(dim, sp_rank * self.local, self.local).contiguous()

    def gather(self, x: torch.Tensor, dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        """The whole segment along dim from every rank's shard, padding removed."""
        parts = [torch.empty_like(x) for _ in range(self.degree)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim).narrow(dim, 0, self.full)


@dataclass(frozen=True)
class TokenLayout:
    """The segments of one forward's sequence; a rank's local sequence is its shard of each, in order."""

    segments: tuple[SequenceSplit, ...]


@lru_cache(maxsize=64)
def real_key_positions(layout: TokenLayout, shards: range, device: torch.device) -> torch.Tensor | None:
    """Positions of the real tokens in the concatenated local sequences of `shards`, or None when
    none of them is padding. Cached: made once per layout, not per attention call."""
    if all(seg.valid(i) == seg.local for i in shards for seg in layout.segments):
        return None
    positions, offset = [], 0
    for i in shards:
        for seg in layout.segments:
            positions.append(torch.arange(offset, offset + seg.valid(i)))
            offset += seg.local
    return torch.cat(positions).to(device)


# Ulysses splits each rank's heads into this many chunks and pipelines them: chunk c+1's all-to-all
# travels while chunk c's attention runs, and chunk c's output travels back while chunk c+1's runs.
PIPELINE_CHUNKS = 2


class InFlight:
    """An all-to-all on its way: `finish()` makes the compute stream wait for it and unpacks it."""

    def __init__(self, received: torch.Tensor, work, unpack):
        self.received, self.work, self.unpack = received, work, unpack

    def finish(self):
        self.work.wait()
        return self.unpack(self.received)


def start_heads_to_sequence(tensors: tuple[torch.Tensor, ...], group: dist.ProcessGroup) -> InFlight:
    """Ulysses all-to-all, one collective for all of `tensors` (q, k, v): each [B, S_loc, U, h, D] (head
    group j goes to Ulysses rank j) -> finish() gives each as [B, U*S_loc, h, D] (my head group of every
    rank's tokens, in rank order). q, k and v travel interleaved per token, so with B = 1 what arrives
    is already each one's layout (a packed-qkv view): no copy after the collective."""
    b, s, u, h, d = tensors[0].shape
    n = len(tensors)
    send = tensors[0].new_empty(u, b, s, n, h, d)  # [U (dest rank), B, S_loc, n, h, D]
    for i, x in enumerate(tensors):
        send[:, :, :, i].copy_(x.permute(2, 0, 1, 3, 4))
    received = torch.empty_like(send)  # [U (source rank), B, S_loc, n, h, D]
    work = dist.all_to_all_single(received, send, group=group, async_op=True)
    # [U, B, S_loc, n, h, D] -> [B, U*S_loc, n, h, D]: a view when B = 1
    return InFlight(received, work, lambda r: r.transpose(0, 1).reshape(b, u * s, n, h, d).unbind(2))


def start_sequence_to_heads(x: torch.Tensor, group: dist.ProcessGroup, degree: int) -> InFlight:
    """The inverse all-to-all: [B, U*S_loc, h, D] -> finish() gives [B, S_loc, U, h, D]."""
    b, s_all, h, d = x.shape
    s = s_all // degree
    send = x.reshape(b, degree, s, h, d).transpose(0, 1).contiguous()  # [U (dest rank), B, S_loc, h, D]
    received = torch.empty_like(send)  # [U (source = head group), B, S_loc, h, D]
    work = dist.all_to_all_single(received, send, group=group, async_op=True)
    return InFlight(received, work, lambda r: r.permute(1, 2, 0, 3, 4))


def symmetric_or_nccl(kind: type, group: dist.ProcessGroup, degree: int, exchange: str, name: str) -> Any:
    """kind(group) (SymmetricUlysses or SymmetricRing) where `exchange` allows symmetric memory, the
    group has several ranks and their GPUs can map each other's memory; else None (NCCL). A
    collective over the group."""
    if exchange == "nccl" or degree == 1:
        return None
    if symmetric_memory_usable(group):
        return kind(group)
    if exchange == "symmetric":
        raise RuntimeError(f"the {name} group's GPUs cannot map each other's memory (symmetric memory)")
    return None


class SequenceParallelAttention:
    """The attention implementation of a sequence-parallel rank (an AttentionImpl).

    plans.py sets, per forward: `layout` (None outside a sharded forward: plain attention) and
    `local_depth` (> 0 inside a cross-attention whose keys every rank holds: plain attention on the
    local queries).

    exchange: how Ulysses moves heads and tokens and how a ring moves its K/V blocks. "auto": through
    symmetric memory where the group's GPUs can map each other's memory (one host;
    parallel/symmetric_exchange.py and symmetric_ring.py, faster than NCCL on 2 and 4 H100s), else
    NCCL's all-to-all and send/receive; "nccl" or "symmetric" to force one. Made by every rank of
    the groups together (a collective)."""

    def __init__(self, groups: ParallelGroups, inner: AttentionImpl = sdpa_attention, exchange: str = "auto"):
        if exchange not in ("auto", "nccl", "symmetric"):
            raise ValueError(f"exchange must be auto, nccl or symmetric, not {exchange!r}")
        self.groups = groups
        self.inner = inner
        u, r = groups.ulysses_degree, groups.ring_degree
        self.symmetric: SymmetricUlysses | None = symmetric_or_nccl(
            SymmetricUlysses, groups.ulysses_group, u, exchange, "Ulysses"
        )
        self.symmetric_ring: SymmetricRing | None = symmetric_or_nccl(
            SymmetricRing, groups.ring_group, r, exchange, "ring"
        )
        self.layout: TokenLayout | None = None
        self.local_depth = 0
        self.head_weights = HeadWeights()  # over_streams' weights: each stream's rows of my heads
        self.rope_gathered: tuple[torch.Tensor, torch.Tensor] | None = None  # (local table, every rank's)
        self.hooks: list = []  # what plans.py put on the models (hooks, the modulation split): each has remove()

    def remove(self) -> None:
        """Take the sharding hooks off the models again (they become single-GPU models)."""
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        self.head_weights = HeadWeights()

    @torch.compiler.disable  # collectives and Python state: outside a compiled block's graph
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.alongside(q, k, v, lambda: None)[0]

    @torch.compiler.disable
    def alongside(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, work: Callable[[], Any]) -> tuple:
        """(attention, work()) as models/attention.py's attention_alongside asks: with Ulysses, `work`
        runs while q, k and v travel (after every exchange has started, before any is waited on)."""
        if self.layout is None or self.local_depth:
            done = work()
            return self.inner(q, k, v), done
        g = self.groups
        u, r = g.ulysses_degree, g.ring_degree
        if u == 1:
            done = work()
            return self.ring(q, k, v), done
        if self.symmetric is not None:  # attend or ring on [B, U*S_loc, h, D]: [B, S_loc, H, D]
            # (with a ring inside, chunks would double its rounds: USP 2x2 on 4 H100s 51 -> 55 ms)
            attend, chunks = (self.attend, PIPELINE_CHUNKS) if r == 1 else (self.ring, 1)
            return self.symmetric.attention(q, k, v, attend, work, chunks)
        b, s, heads, d = q.shape
        chunks = PIPELINE_CHUNKS if r == 1 and heads % (u * PIPELINE_CHUNKS) == 0 else 1
        # [B, S_loc, H, D] -> [B, S_loc, U, C, h, D]: Ulysses rank j gets head group j, in C chunks of h heads
        q, k, v = (x.unflatten(2, (u, chunks, heads // (u * chunks))) for x in (q, k, v))
        inbound = [start_heads_to_sequence((q[:, :, :, c], k[:, :, :, c], v[:, :, :, c]), g.ulysses_group)
                   for c in range(chunks)]  # fmt: skip
        done = work()  # on the compute stream while the all-to-alls are in flight
        outbound = []
        for arriving in inbound:
            qc, kc, vc = arriving.finish()  # [B, U*S_loc, h, D]
            out = self.attend(qc, kc, vc) if r == 1 else self.ring(qc, kc, vc)
            outbound.append(start_sequence_to_heads(out, g.ulysses_group, u))
        # the chunks back in head order: [B, S_loc, U, C, h, D] -> [B, S_loc, H, D]
        return torch.stack([leaving.finish() for leaving in outbound], dim=3).view(b, s, heads, d), done

    @torch.compiler.disable
    def over_streams(self, streams: list[Stream], rope: torch.Tensor, heads: int, work: Callable[[], Any]):
        """models/attention.py's joint_attention: under Ulysses-2 alone (no ring), with q/k norms per
        head, each rank's streams' inputs travel instead of q, k and v, and every rank projects all
        tokens for its heads (parallel/input_exchange.py). Returns ([B, S_loc, H, D], work()), or
        None (nothing run) where this does not apply: the model then projects and calls `alongside`."""
        g = self.groups
        u, head_dim = g.ulysses_degree, rope.shape[-2] * 2
        if self.layout is None or self.local_depth or u != 2 or g.ring_degree != 1:
            return None
        if not all(stream.per_head_norms(head_dim) for stream in streams):
            return None  # (a norm over all heads needs every head of a token)
        if any(linear.fp8 for stream in streams for linear in stream.linears):
            return None  # (FP8 weights, --dit-precision fp8: the model projects them, q, k and v travel)
        rank, group = g.ulysses_rank, heads // u
        mine = slice(rank * group, (rank + 1) * group)
        weights = [self.head_weights.get(s, mine, head_dim) for s in streams]
        adapters = [head_adapters(s.linears, mine, head_dim) for s in streams]  # unfused LoRA (most often none)
        every_rope = self.gathered(rope)
        inputs = [s.x for s in streams]
        b, s_loc = inputs[0].shape[0], sum(x.shape[1] for x in inputs)
        buffer = inputs[0].new_empty(b, u * s_loc, 3, group, head_dim)  # my heads of every rank's tokens

        def project(source: int, xs: list[torch.Tensor]) -> None:
            project_rank(buffer, source, xs, weights, adapters)

        def qkv() -> tuple[torch.Tensor, ...]:
            return normed_qkv(buffer, streams, every_rope, u)

        if self.symmetric is not None:
            return self.symmetric.input_attention(inputs, project, qkv, self.attend_pieces, work)
        every = gather_inputs(streams, g.ulysses_group)  # [rank][stream] -> [B, S_i, C]
        done = work()
        for source, xs in enumerate(every):
            project(source, xs)
        out = self.attend(*qkv())  # [B, U*S_loc, h, D]
        back = start_sequence_to_heads(out, g.ulysses_group, u).finish()  # [B, S_loc, U, h, D]
        return back.reshape(b, s_loc, heads, head_dim), done

    def gathered(self, rope: torch.Tensor) -> torch.Tensor:
        """Every Ulysses rank's rotary table (rank order, [U*S_loc, D/2, 2]), gathered once per forward:
        every block gets the same local table (the last one is kept, so `is` cannot match a new one)."""
        if self.rope_gathered is None or self.rope_gathered[0] is not rope:
            self.rope_gathered = (rope, gather_tokens(rope, self.groups.ulysses_group))
        return self.rope_gathered[1]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """My Ulysses group's whole sequence is here: attention with the padded keys cut out."""
        return self.inner(q, *self.real_keys(k, v))

    def attend_pieces(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """`attend` as (first head, [B, S, h_i, D]) pieces, as the kernel gives them (the wave split's
        whole heads and split heads: speed/wave_split.py), so that nothing copies them into one."""
        k, v = self.real_keys(k, v)
        pieces = getattr(self.inner, "pieces", None)
        return pieces(q, k, v) if pieces is not None else [(0, self.inner(q, k, v))]

    def real_keys(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k and v [B, U*S_loc, h, D] without the rows that pad a segment (they never enter a softmax)."""
        keep = real_key_positions(self.layout, range(self.groups.ulysses_degree), k.device)
        return (k, v) if keep is None else (k[:, keep], v[:, keep])

    def ring(self, queries: torch.Tensor, k_block: torch.Tensor, v_block: torch.Tensor) -> torch.Tensor:
        """My queries against every ring rank's key block: the blocks travel round the ring (send to
        the next rank, receive from the previous one; through symmetric memory every block goes to
        every ring rank at once) while I compute. A ring rank's block holds the local sequences of its
        Ulysses group's sp ranks."""
        kv = torch.stack([k_block, v_block])  # [2, B, U*S_loc, H/U, D]
        if self.symmetric_ring is not None:
            attended = self.symmetric_ring.over_blocks(kv, lambda source, block: self.block(queries, source, block))
            return merge_partials([p for p in attended if p is not None])
        g = self.groups
        r = g.ring_degree
        partials = []
        nxt, prev = g.ring_ranks[(g.ring_rank + 1) % r], g.ring_ranks[(g.ring_rank - 1) % r]
        for step, source in enumerate(ring_sources(g.ring_rank, r)):  # source: whose block `kv` is
            pending = None
            if step < r - 1:
                incoming = torch.empty_like(kv)
                send = dist.P2POp(dist.isend, kv, nxt, g.ring_group)
                pending = dist.batch_isend_irecv([send, dist.P2POp(dist.irecv, incoming, prev, g.ring_group)])
            partial = self.block(queries, source, kv)
            if partial is not None:
                partials.append(partial)
            if pending is not None:
                for request in pending:
                    request.wait()
                kv = incoming
        return merge_partials(partials)

    def block(self, queries: torch.Tensor, source: int, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Attention (and log-sum-exp) of my queries over ring rank `source`'s block kv ([2, B,
        U*S_loc, h, D]) with its padded keys cut out; None where the block holds only padding."""
        u = self.groups.ulysses_degree
        keep = real_key_positions(self.layout, range(source * u, (source + 1) * u), queries.device)
        keys, values = (kv[0], kv[1]) if keep is None else (kv[0][:, keep], kv[1][:, keep])
        return attention_with_lse(queries, keys, values) if keys.shape[1] else None

"""Sequence-parallel attention on its own: with each rank holding its shard of every segment (FLUX's
text and image tokens, neither divisible by the ranks), the gathered output equals attention over
the whole sequence, for Ulysses (heads pipelined in chunks), Ring and USP, and with another
single-GPU kernel inside (--attention-backend math); and where the symmetric-memory exchanges of
Ulysses and of the ring write each rank's slices and blocks (their GPU paths run in
scripts/probes/bench_parallel.py --exchange)."""

from __future__ import annotations

import pytest
import torch

from sgdiff.config import ParallelConfig
from sgdiff.models.attention import sdpa_attention
from sgdiff.parallel.sequence import PIPELINE_CHUNKS
from sgdiff.testing.distributed import run_on_ranks, sharded_attention

HEADS = 8  # Ulysses-2 and -4 split each rank's heads into PIPELINE_CHUNKS chunks
SEGMENTS = (7, 13)
MODES = {
    "ulysses-2": ParallelConfig(2),
    "ulysses-4": ParallelConfig(4),
    "ring-3": ParallelConfig(3, ring_degree=3),
    "usp-2x2": ParallelConfig(4, ulysses_degree=2, ring_degree=2),
}


def by_processes(*params):
    """Each (mode, ...) case; those of more than two processes in the slow tier (CI runs it: pytest -m slow)."""
    return [pytest.param(*p, marks=pytest.mark.slow) if MODES[p[0]].num_gpus > 2 else p for p in params]


@pytest.mark.parametrize(("mode", "backend"), by_processes(*((mode, "auto") for mode in MODES), ("ulysses-2", "math")))
def test_sharded_attention_equals_whole_sequence(mode, backend):
    assert HEADS % (4 * PIPELINE_CHUNKS) == 0 and PIPELINE_CHUNKS > 1
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, sum(SEGMENTS), HEADS, 16, generator=g) for _ in range(3))
    reference = sdpa_attention(q, k, v)
    for rank, out in enumerate(run_on_ranks(MODES[mode], sharded_attention, q, k, v, SEGMENTS, backend)):
        difference = (out - reference).abs().max().item()
        assert difference <= 1e-5, f"{mode} rank {rank}: max abs diff {difference}"


@pytest.mark.parametrize("mode", ["ulysses-2", pytest.param("ring-3", marks=pytest.mark.slow)])
def test_work_alongside_runs_while_q_k_v_travel(mode):
    """attention_alongside: the same output and `work` run once; with Ulysses after every chunk's
    all-to-all was started and before the first is waited on (Ring: first)."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, sum(SEGMENTS), HEADS, 16, generator=g) for _ in range(3))
    reference = sdpa_attention(q, k, v)
    for out, events in run_on_ranks(MODES[mode], sharded_attention, q, k, v, SEGMENTS, "auto", True):
        assert (out - reference).abs().max().item() <= 1e-5
        assert events.count("work") == 1
        if mode.startswith("ulysses"):
            assert events[: PIPELINE_CHUNKS + 2] == [*["sent"] * PIPELINE_CHUNKS, "work", "arrived"]
        else:
            assert events == ["work"]


@pytest.mark.parametrize(("degree", "chunks"), [(2, 1), (2, 2), (4, 1), (4, 2)])
def test_symmetric_memory_exchange_layouts(degree, chunks):
    """The symmetric-memory Ulysses exchange, its ranks simulated in one process (the peers' buffers
    are plain tensors here), each head group sent in `chunks` chunks: what lands in chunk c's inbox
    is chunk c of that rank's head group, of every rank's tokens in rank order, and what lands in
    each outbox is every head group's output (chunk by chunk) for its tokens."""
    from sgdiff.parallel.symmetric_exchange import received_sequence, scatter_heads, scatter_sequence

    g = torch.Generator().manual_seed(0)
    b, s_loc, h, d = 2, 3, 4, 4  # h heads per Ulysses rank
    hc = h // chunks
    qkv = [[torch.randn(b, s_loc, degree * h, d, generator=g) for _ in range(3)] for _ in range(degree)]
    for c in range(chunks):
        inboxes = [torch.full((b, degree, s_loc, 3, hc, d), float("nan")) for _ in range(degree)]
        for rank in range(degree):
            scatter_heads(tuple(qkv[rank]), inboxes, rank, chunk=(c, chunks))
        for j in range(degree):
            heads = slice(j * h + c * hc, j * h + (c + 1) * hc)
            for i, got in enumerate(received_sequence(inboxes[j])):
                expected = torch.cat([qkv[rank][i][:, :, heads] for rank in range(degree)], dim=1)
                assert torch.equal(got, expected), f"rank {j} tensor {i} chunk {c}"

    # outs[group][c]: head group `group`'s chunk c output, every rank's tokens
    outs = [[torch.randn(b, degree * s_loc, hc, d, generator=g) for _ in range(chunks)] for _ in range(degree)]
    outboxes = [torch.full((b, s_loc, degree * h, d), float("nan")) for _ in range(degree)]
    for rank in range(degree):
        for c in range(chunks):
            scatter_sequence(outs[rank][c], outboxes, rank, chunk=(c, chunks))
    for j in range(degree):
        tokens = slice(j * s_loc, (j + 1) * s_loc)
        expected = torch.cat([outs[group][c][:, tokens] for group in range(degree) for c in range(chunks)], dim=2)
        assert torch.equal(outboxes[j], expected), f"rank {j}"


@pytest.mark.parametrize("degree", [2, 3, 4])
def test_symmetric_ring_blocks_reach_every_rank_in_ring_order(degree):
    """The symmetric-memory ring, its ranks simulated in one process (the inboxes are plain tensors
    here): after every rank posts its K/V block, each rank's inbox holds every other rank's block in
    that rank's slot; each rank attends the blocks in the NCCL ring's order (its own, then rank - 1,
    ...), and the merged partials equal attention of its queries over the whole sequence."""
    from sgdiff.kernels.partial_attention import attention_with_lse, merge_partials
    from sgdiff.parallel.symmetric_exchange import post_to_peers
    from sgdiff.parallel.symmetric_ring import ring_sources

    g = torch.Generator().manual_seed(degree)
    b, s_blk, h, d = 1, 5, 3, 8
    q, k, v = (torch.randn(b, degree * s_blk, h, d, generator=g) for _ in range(3))
    blocks = [torch.stack([k, v])[:, :, r * s_blk : (r + 1) * s_blk] for r in range(degree)]  # [2, B, S_blk, h, D]
    inboxes = [torch.full((degree, 2, b, s_blk, h, d), float("nan")) for _ in range(degree)]
    for rank in range(degree):
        post_to_peers([blocks[rank]], inboxes, rank)
    reference = sdpa_attention(q, k, v)
    for rank in range(degree):
        sources = ring_sources(rank, degree)
        assert sources == [(rank - step) % degree for step in range(degree)] and sorted(sources) == list(range(degree))
        for source in sources[1:]:
            assert torch.equal(inboxes[rank][source], blocks[source]), f"rank {rank}, block of {source}"
        assert inboxes[rank][rank].isnan().all(), "a rank's own slot is never written"
        received = [blocks[rank], *(inboxes[rank][source] for source in sources[1:])]
        queries = q[:, rank * s_blk : (rank + 1) * s_blk]
        out = merge_partials([attention_with_lse(queries, kv[0], kv[1]) for kv in received])
        difference = (out - reference[:, rank * s_blk : (rank + 1) * s_blk]).abs().max().item()
        assert difference <= 1e-5, f"rank {rank}: max abs diff {difference}"


@pytest.mark.parametrize("batch", [1, 2])
def test_posted_streams_land_in_every_peers_slot_in_order(batch):
    """Ulysses-2's input exchange, its ranks simulated in one process: each rank's streams (text, then
    image: [B, S_i, C]) land joined in its slot of every other rank's inbox ([U, B, S_loc, C]), and a
    rank's own slot is never written."""
    from sgdiff.parallel.symmetric_exchange import post_to_peers

    degree, g = 3, torch.Generator().manual_seed(batch)
    streams = [[torch.randn(batch, n, 4, generator=g) for n in (2, 5)] for _ in range(degree)]
    inboxes = [torch.full((degree, batch, 7, 4), float("nan")) for _ in range(degree)]
    for rank in range(degree):
        post_to_peers(streams[rank], inboxes, rank, dim=1)
    for rank in range(degree):
        for source in range(degree):
            slot = inboxes[rank][source]
            if source == rank:
                assert slot.isnan().all(), "a rank's own slot is never written"
            else:
                assert torch.equal(slot, torch.cat(streams[source], dim=1)), f"rank {rank}, streams of {source}"


@pytest.mark.parametrize(
    ("mode", "batch", "per_head_norms", "inputs_travel"),
    by_processes(
        ("ulysses-2", 1, True, True),
        ("ulysses-2", 2, True, True),
        ("ulysses-2", 1, False, False),  # a norm over every head needs q and k whole: q, k, v travel
        ("ulysses-4", 1, True, False),  # four ranks: q, k and v are fewer bytes than the inputs
        ("usp-2x2", 1, True, False),
    ),
)
def test_joint_attention_from_streams_equals_whole_sequence(mode, batch, per_head_norms, inputs_travel):
    """joint_attention with the streams before their projections (FLUX's text and image, lengths the
    ranks do not divide): under Ulysses-2 every rank's inputs travel and each rank projects all tokens
    for its heads (parallel/input_exchange.py); elsewhere q, k and v do. Either way the gathered output
    equals one process's, and the work alongside runs once."""
    from sgdiff.models.streams import project_streams
    from sgdiff.testing.distributed import joint_streams, sharded_joint_attention

    streams, rope = joint_streams(SEGMENTS, batch, per_head_norms)
    with torch.no_grad():
        reference = sdpa_attention(*project_streams(streams, rope, 8))
    ranks = run_on_ranks(MODES[mode], sharded_joint_attention, SEGMENTS, batch, per_head_norms)
    for rank, (out, done, travelled) in enumerate(ranks):
        assert travelled == inputs_travel, f"{mode} rank {rank}: inputs travelled {travelled}"
        assert done == "work"
        difference = (out - reference).abs().max().item()
        assert difference <= 1e-5, f"{mode} rank {rank}: max abs diff {difference}"

"""Run a function on N CPU processes joined in a gloo group, for tests of the parallel code."""

from __future__ import annotations

import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sgdiff.config import ParallelConfig
from sgdiff.parallel.groups import ParallelGroups, build_groups


def _rank_main(rank: int, world: int, init: str, config: ParallelConfig, fn, args, results) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    # results travel pickled by value: a tensor put on the queue as it is travels as a shared-memory
    # handle that the parent can no longer open once this process has exited
    try:
        output = fn(build_groups(config), *args)
        results.put((rank, pickle.dumps(output)))
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        results.put((rank, pickle.dumps(exc)))
        raise
    finally:
        dist.destroy_process_group()


def run_on_ranks(config: ParallelConfig, fn: Callable[..., Any], *args: Any, timeout: float = 300) -> list[Any]:
    """fn(groups, *args) on every rank of `config` (CPU, gloo); returns each rank's result, rank order.
    fn must be importable (a module-level function): the ranks are spawned processes."""
    world = config.resolved().num_gpus
    context = torch.multiprocessing.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as folder:
        init = f"file://{Path(folder) / 'store'}"
        procs = [
            context.Process(target=_rank_main, args=(rank, world, init, config, fn, args, results))
            for rank in range(world)
        ]
        for proc in procs:
            proc.start()
        outputs = {rank: pickle.loads(payload) for rank, payload in (results.get(timeout=timeout) for _ in procs)}
        for proc in procs:
            proc.join(timeout=30)
    failures = [o for o in outputs.values() if isinstance(o, BaseException)]
    if failures:
        raise failures[0]
    return [outputs[rank] for rank in range(world)]


def parallel_latents(groups: ParallelGroups, requests: list[tuple[str, str, dict]]) -> tuple[list, list]:
    """A rank's final latents for each (model, prompt, flags) on a parallel pipeline, and the names of the
    components it loaded (a run_on_ranks function)."""
    from sgdiff.config import RuntimeConfig
    from sgdiff.engine.runner import ModelRunner
    from sgdiff.engine.worker import load_for_rank, make_parallel

    latents, loaded = [], []
    for model, prompt, flags in requests:
        engine = ModelRunner(model, runtime=RuntimeConfig(device="cpu", dtype="fp32"))
        load_for_rank(engine, groups)  # ranks other than 0 hold no text encoder
        with make_parallel(engine, groups):
            latents.append(engine.generate(engine.sampling_params(prompt, **flags)).latents)
        assert engine.pipeline is not None  # (loaded)
        loaded.append(engine.pipeline.loaded)
    return latents, loaded


def pipeline_output(groups: ParallelGroups, model: str, prompt: str, flags: dict) -> dict:
    """The final latents and decoded images or videos (None where the model makes none, or on ranks other
    than 0) of one request on a pipeline made parallel by `groups` as the engine's workers make it, and how
    its denoising stage runs and guides the CFG branches (the names of its `branches` and `guide`)."""
    from sgdiff.config import RuntimeConfig
    from sgdiff.engine.runner import ModelRunner
    from sgdiff.engine.worker import load_for_rank, make_parallel

    engine = ModelRunner(model, runtime=RuntimeConfig(device="cpu", dtype="fp32"))
    load_for_rank(engine, groups)
    assert engine.pipeline is not None  # (loaded)
    with make_parallel(engine, groups):
        result = engine.generate(engine.sampling_params(prompt, **flags))
        (stage,) = [stage for stage in engine.pipeline.stages if stage.name == "denoising"]
        denoising = (type(stage.branches).__name__, stage.guide.__name__)  # type: ignore[attr-defined]
    return dict(latents=result.latents, images=result.images, videos=result.videos, denoising=denoising)


def sharded_attention(
    groups: ParallelGroups, q, k, v, segment_lengths: tuple[int, ...], backend: str = "auto", log_overlap: bool = False
):
    """Attention over a sequence of segments (FLUX: text, image) with every rank holding its shard of
    each segment, gathered back to the whole sequence's output (a run_on_ranks function); `backend`:
    the single-GPU kernel (--attention-backend). q, k, v: [B, S, H, D], S = sum(segment_lengths).
    log_overlap: through attention_alongside instead, returning (output, events): when each
    all-to-all was started ("sent") and waited on ("arrived"), and when the work alongside ran ("work")."""
    from sgdiff.models.attention import attention_alongside, use_attention_impl
    from sgdiff.parallel import sequence
    from sgdiff.speed.attention_backends import attention_backend

    segments = tuple(sequence.SequenceSplit(n, groups.sp_degree) for n in segment_lengths)
    attn = sequence.SequenceParallelAttention(groups, attention_backend(backend, q.device, q.dtype))
    attn.layout = sequence.TokenLayout(segments)
    starts = [sum(segment_lengths[:i]) for i in range(len(segments))]

    def local(x: torch.Tensor) -> torch.Tensor:
        parts = [seg.shard(x[:, a : a + seg.full], 1, groups.sp_rank) for seg, a in zip(segments, starts, strict=True)]
        return torch.cat(parts, dim=1)

    events: list[str] = []
    if log_overlap:
        # (patched on purpose: each lambda logs, then calls the original)
        sent, arrived = sequence.InFlight.__init__, sequence.InFlight.finish
        sequence.InFlight.__init__ = lambda self, *a: (events.append("sent"), sent(self, *a))[1]  # type: ignore[method-assign,func-returns-value]
        sequence.InFlight.finish = lambda self: (events.append("arrived"), arrived(self))[1]  # type: ignore[method-assign,func-returns-value]
        try:
            with use_attention_impl(attn):
                out, done = attention_alongside(local(q), local(k), local(v), lambda: events.append("work") or 1)  # type: ignore[func-returns-value]
        finally:
            sequence.InFlight.__init__, sequence.InFlight.finish = sent, arrived  # type: ignore[method-assign]
        assert done == 1, "attention_alongside returns what the work returned"
    else:
        out = attn(local(q), local(k), local(v))  # [B, sum of local lengths, H, D]
    whole, offset = [], 0
    for seg in segments:
        whole.append(seg.gather(out[:, offset : offset + seg.local], 1, groups.sp_group))
        offset += seg.local
    gathered = torch.cat(whole, dim=1)
    return (gathered, events) if log_overlap else gathered


def joint_streams(segment_lengths: tuple[int, ...], batch: int, per_head_norms: bool) -> tuple[list, torch.Tensor]:
    """Random streams of 8 heads of 16 channels for models/attention.py's joint_attention (seeded:
    every rank builds the same): per segment an input [B, S_i, 24], q/k/v Linears and q/k RMSNorms per
    head (FLUX's) or over all heads (Wan's); and a rotary table [S, 8, 2]."""
    from torch import nn

    from sgdiff.models.layers import Linear, RMSNorm
    from sgdiff.models.rope import rope_frequencies
    from sgdiff.models.streams import Stream

    torch.manual_seed(0)
    streams = []
    for n in segment_lengths:
        linears = tuple(Linear(24, 8 * 16) for _ in range(3))
        norms = tuple(RMSNorm(16 if per_head_norms else 8 * 16, eps=1e-6) for _ in range(2))
        for norm in norms:
            nn.init.uniform_(norm.weight, 0.5, 1.5)
        streams.append(Stream(torch.randn(batch, n, 24), linears, norms))  # type: ignore[arg-type]  # (3 and 2 long)
    ids = torch.randint(0, 64, (sum(segment_lengths), 3))
    return streams, rope_frequencies(ids, (4, 4, 8), theta=10000.0)


def sharded_joint_attention(groups: ParallelGroups, segment_lengths: tuple[int, ...], batch: int, per_head_norms: bool):
    """joint_attention over random streams (joint_streams) with every rank holding its shard of each
    stream, gathered back to the whole sequence's output (a run_on_ranks function). Returns (output,
    what the work alongside returned, whether the inputs travelled instead of q, k and v)."""
    from sgdiff.models.attention import joint_attention, use_attention_impl
    from sgdiff.models.streams import Stream
    from sgdiff.parallel import sequence

    streams, rope = joint_streams(segment_lengths, batch, per_head_norms)
    segments = tuple(sequence.SequenceSplit(n, groups.sp_degree) for n in segment_lengths)
    attn = sequence.SequenceParallelAttention(groups)
    attn.layout = sequence.TokenLayout(segments)
    starts = [sum(segment_lengths[:i]) for i in range(len(segments))]
    rank = groups.sp_rank
    local_rope = torch.cat([s.shard(rope[a : a + s.full], 0, rank) for s, a in zip(segments, starts, strict=True)])
    local = [Stream(seg.shard(s.x, 1, rank), s.linears, s.norms) for s, seg in zip(streams, segments, strict=True)]
    with torch.no_grad(), use_attention_impl(attn):
        inputs_travelled = attn.over_streams(local, local_rope, 8, lambda: None) is not None
        out, done = joint_attention(local, local_rope, 8, lambda: "work")
    whole, offset = [], 0
    for seg in segments:
        whole.append(seg.gather(out[:, offset : offset + seg.local], 1, groups.sp_group))
        offset += seg.local
    return torch.cat(whole, dim=1), done, inputs_travelled


def sharded_flux_modulation(groups: ParallelGroups, batch: int) -> dict:
    """The tiny FLUX transformer of sgdiff/bench/parts.py with guidance (float32, seeded: every rank
    builds the same) run whole, then sequence-parallel, then whole again after `remove()` (a
    run_on_ranks function).
    Returns the last two outputs' largest difference from the first, the modulation rows this rank
    computed ((Linear's index, first row, end row) each), every modulation Linear's rows, and how
    often the original modulation Linears ran under sequence parallelism."""
    from sgdiff.families.flux import FAMILY as FLUX
    from sgdiff.models.attention import use_attention_impl
    from sgdiff.models.layers import AdaModulation
    from sgdiff.parallel.modulation import ShardedModulation
    from sgdiff.parallel.plans import apply_sequence_parallel
    from sgdiff.testing.sharded_flux import tiny_flux

    model, inputs = tiny_flux(batch)
    linears = [m.linear for m in model.modules() if isinstance(m, AdaModulation)]
    calls = []
    for linear in linears:
        linear.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        whole = model(**inputs)
        calls.clear()
        attn = apply_sequence_parallel([model], FLUX, groups)
        (modulation,) = [hook for hook in attn.hooks if isinstance(hook, ShardedModulation)]
        with use_attention_impl(attn):
            sharded = model(**inputs)
        original_calls = len(calls)
        attn.remove()
        again = model(**inputs)
    return dict(
        sharded=(sharded - whole).abs().max().item(),
        after_remove=(again - whole).abs().max().item(),
        rows=[(linears.index(linear), first, end) for linear, first, end in modulation.pieces],
        sizes=[linear.out_features for linear in linears],
        original_calls=original_calls,
    )

"""Ulysses' two exchanges through symmetric memory, for the ranks of one host (CUDA).

NCCL's all_to_all_single sends one contiguous block to each rank, so q, k and v are first packed
into a send buffer, and the attention output is unpacked after its way back: on FLUX.1-dev
Ulysses-2 those copies move ~140 MB per attention. With symmetric memory each rank maps its peers'
buffers and writes its slice of every head group straight to where the peer's attention reads it
(the peer's inbox), and each head group's attention output straight back into its owner's
[B, S_loc, H, D] buffer (the outbox) at that head group's place, instead of pack + send + unpack.
Each tensor goes to every rank in one Triton launch that moves 16-byte vectors, the local slot's
copy beside the peers' (kernels/triton_copy_heads.py; torch's strided copy_ stores element by
element, which NVLink carries poorly, one destination after the other). A barrier closes each
exchange (kernels/triton_signal_barrier.py: arrival counts in the signal pads). `input_attention`
moves the attention's input instead of q, k and v (parallel/input_exchange.py), by memcpy.

The buffers need no double buffering: a rank writes into a peer's inboxes for an attention only
after its side stream has waited for its compute stream, which had passed the output barrier that
closed the previous attention, which the peer reaches only once its attention (or projection) has
read those inboxes (each chunk, and the input, has its own inbox). Likewise a rank writes into a
peer's outbox only after the first chunk's barrier of that attention, which the peer reaches only
after its compute stream has used the outbox (its side stream waits for its compute stream before
the first copy). So the output `attention` returns is valid until this rank's next attention call
(models use an attention's output before they attend again)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

# copy(src, destinations, pair_stride): destination p = src shifted by p * pair_stride elements (views
# of one shape: [B, S, h, D]); on CUDA one Triton launch for all of them
PairCopy = Callable[[torch.Tensor, list[torch.Tensor], int], None]


def copy_to_each(src: torch.Tensor, destinations: list[torch.Tensor], pair_stride: int) -> None:
    """PairCopy through torch's copy_, one destination after the other."""
    for p, dst in enumerate(destinations):
        dst.copy_(src.as_strided(src.shape, src.stride(), src.storage_offset() + p * pair_stride))


def scatter_heads(
    tensors: tuple[torch.Tensor, ...],
    inboxes: list[torch.Tensor],
    rank: int,
    copy: PairCopy = copy_to_each,
    chunk: tuple[int, int] = (0, 1),
) -> None:
    """Write head group j of each of `tensors` (q, k, v: [B, S_loc, H, D], my tokens) into rank j's
    inbox ([B, U, S_loc, n, h, D]: source rank, its tokens, which tensor, heads), at source `rank`.
    chunk (c, C): only chunk c of C of every head group (h = H / U / C heads of it)."""
    c, count = chunk
    for i, x in enumerate(tensors):
        group = x.shape[2] // len(inboxes)  # heads per rank
        h = group // count
        copy(x[:, :, c * h : (c + 1) * h], [inbox[:, rank, :, i] for inbox in inboxes], group * x.stride(2))


def post_to_peers(parts: list[torch.Tensor], inboxes: list[torch.Tensor], rank: int, dim: int = 0) -> None:
    """Copy my parts, which joined along `dim` make one slot, into my slot of every other rank's inbox
    ([R (source), *slot]): each part lands as one block of memory where the slot's rows before `dim`
    are one, a plain memcpy, which the copy engines carry to a peer's memory."""
    lengths = [part.shape[dim] for part in parts]
    for peer, inbox in enumerate(inboxes):
        if peer != rank:
            for part, place in zip(parts, inbox[rank].split(lengths, dim=dim), strict=True):
                place.copy_(part)


def received_sequence(inbox: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor's view in my inbox: [B, U, S_loc, n, h, D] -> n x [B, U*S_loc, h, D] (no copy)."""
    return tuple(x.flatten(1, 2) for x in inbox.unbind(3))


def scatter_sequence(
    out: torch.Tensor, outboxes: list[torch.Tensor], rank: int, copy: PairCopy = copy_to_each, chunk: tuple = (0, 1)
) -> None:
    """Write rank j's tokens of `out` ([B, U*S_loc, h, D]: my head group, or chunk c of C of it, every
    rank's tokens) into rank j's outbox ([B, S_loc, H, D]) at those heads' place."""
    (c, count), h = chunk, out.shape[2]
    scatter_tokens(out, outboxes, (rank * count + c) * h, copy)


def scatter_tokens(out: torch.Tensor, outboxes: list[torch.Tensor], first: int, copy: PairCopy) -> None:
    """Write rank j's tokens of `out` ([B, U*S_loc, h, D]) into rank j's outbox ([B, S_loc, H, D]) at
    heads [first, first + h)."""
    s, h = out.shape[1] // len(outboxes), out.shape[2]
    copy(out[:, :s], [outbox[:, :, first : first + h] for outbox in outboxes], s * out.stride(1))


def symmetric_memory_usable(group: dist.ProcessGroup) -> bool:
    """Whether the ranks of `group` can map each other's memory: NCCL (CUDA) ranks, all on this host,
    each GPU with peer access to the others'. A collective: every rank of the group calls it, and all
    get the same answer."""
    if dist.get_backend(group) != "nccl":
        return False
    world = dist.get_world_size(group)
    placed: list[Any] = [None] * world
    dist.all_gather_object(placed, (socket.gethostname(), torch.cuda.current_device()), group=group)
    mine = torch.cuda.current_device()
    local_ok = len({host for host, _ in placed}) == 1 and all(
        device == mine or (device < torch.cuda.device_count() and torch.cuda.can_device_access_peer(mine, device))
        for _, device in placed
    )
    verdicts = [None] * world
    dist.all_gather_object(verdicts, local_ok, group=group)
    return all(verdicts)


class SymmetricBuffers:
    """Buffers in symmetric memory for one group of one host's ranks, allocated once per shape, and a
    barrier in their signal pads."""

    def __init__(self, group: dist.ProcessGroup):
        # no NVLink multicast objects: these exchanges never use them (and shared hosts may forbid them)
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        # one allocation per buffer: from torch's implicit pool a buffer may sit at an offset in a
        # shared allocation, where get_buffer's views (counted from the allocation's start) would miss it
        os.environ["TORCH_SYMMMEM_IMPLICIT_POOL"] = "0"
        self.side = torch.cuda.Stream()  # the copies and their barriers
        self.group = group
        self.rank, self.degree = dist.get_rank(group), dist.get_world_size(group)
        self.buffers: dict[tuple, list[torch.Tensor]] = {}
        self.signal_barrier: SignalBarrier | None = None  # made with the first buffer (boxes)
        self.keep_alive: list = []

    def barrier(self) -> None:
        """The group's barrier in the first buffer's signal pads (`boxes` has made a buffer before)."""
        assert self.signal_barrier is not None
        self.signal_barrier()

    def boxes(self, shape: tuple[int, ...], like: torch.Tensor, tag: int = 0) -> list[torch.Tensor]:
        """Every rank's buffer of `shape` (mine at self.rank; `tag` tells apart buffers of one shape),
        made on first use (a collective: every rank asks for the same buffers in the same order)."""
        key = (shape, like.dtype, tag)
        if key not in self.buffers:
            import torch.distributed._symmetric_memory as symm_mem

            local = symm_mem.empty(*shape, dtype=like.dtype, device=like.device)
            handle = symm_mem.rendezvous(local, self.group)
            # `local` is its own allocation (no implicit pool), so it starts where get_buffer counts from
            self.buffers[key] = [handle.get_buffer(p, shape, like.dtype) for p in range(self.degree)]
            self.keep_alive += [local, handle]  # the views hold neither; the handle keeps peers mapped
            if self.signal_barrier is None:  # the first buffer's signal pads serve every exchange
                self.signal_barrier = SignalBarrier(handle, self.group, like.device)
        return self.buffers[key]


class SymmetricUlysses(SymmetricBuffers):
    """Ulysses' all-to-alls for one group, in symmetric memory."""

    def __init__(self, group: dist.ProcessGroup):
        super().__init__(group)
        from sgdiff.kernels.triton_copy_heads import HeadCopy  # Triton: imported once, here

        self.head_copy = HeadCopy
        self.copies: dict[tuple[int, ...], HeadCopy] = {}  # by the destinations' addresses

    def copy(self, src: torch.Tensor, destinations: list[torch.Tensor], pair_stride: int) -> None:
        """PairCopy in one Triton launch (the destinations are slots of this exchange's buffers: the
        first call for each set, made before any capture, sets up its offset table)."""
        key = tuple(t.data_ptr() for t in destinations)
        if key not in self.copies:
            self.copies[key] = self.head_copy(destinations)
        if not self.copies[key](src, pair_stride):
            copy_to_each(src, destinations, pair_stride)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attend: Callable[..., torch.Tensor],
        work: Callable[[], Any] = lambda: None,
        chunks: int = 1,
    ) -> tuple[torch.Tensor, Any]:
        """Ulysses attention: q, k, v [B, S_loc, H, D] (my tokens) -> ([B, S_loc, H, D], work()), where
        attend(q, k, v) runs on my head group of every rank's tokens ([B, U*S_loc, h, D]).

        Each head group travels in `chunks` chunks (if they divide it): the copies run on a side
        stream, so chunk c+1's q, k, v travel while chunk c's attention runs, and chunk c's output
        travels back while chunk c+1's runs (the copies take the SMs the other kernel leaves free).
        `work` (which must not touch the exchange's buffers: FLUX's single-stream MLP) runs on the
        compute stream while the first chunk travels. Barriers, one per chunk's arrival and one for
        the outputs, run in one order on every rank."""
        b, s, heads, d = q.shape
        group = heads // self.degree
        chunks = chunks if group % chunks == 0 else 1
        inboxes = [self.boxes((b, self.degree, s, 3, group // chunks, d), q, tag=c) for c in range(chunks)]
        outboxes = self.boxes((b, s, heads, d), q)
        compute, side = torch.cuda.current_stream(), self.side
        side.wait_stream(compute)  # q, k, v are ready
        arrived = []
        with torch.cuda.stream(side):
            for c in range(chunks):
                scatter_heads((q, k, v), inboxes[c], self.rank, self.copy, (c, chunks))
                self.barrier()  # chunk c of every rank is in my inbox
                arrived.append(side.record_event())
        done = work()
        outs = []  # (kept until the compute stream has waited for their copies: no early reuse)
        for c in range(chunks):
            compute.wait_event(arrived[c])
            outs.append(attend(*received_sequence(inboxes[c][self.rank])))  # [B, U*S_loc, h/C, D]
            side.wait_stream(compute)
            with torch.cuda.stream(side):
                scatter_sequence(outs[c], outboxes, self.rank, self.copy, (c, chunks))
        return self.outputs_back(outboxes), done

    def outputs_back(self, outboxes: list[torch.Tensor]) -> torch.Tensor:
        """After the last chunk's copies: my outbox, once every head group's output is in it."""
        # (q, k, v and the outputs were made on the compute stream, which now waits for the side
        # stream's last read of them: their memory is not handed out again before that)
        torch.cuda.current_stream().wait_stream(self.side)
        self.barrier()  # every head group's output for my tokens is in my outbox
        return outboxes[self.rank]

    def input_attention(
        self,
        inputs: list[torch.Tensor],
        project: Callable[[int, list[torch.Tensor]], None],
        qkv: Callable[[], tuple[torch.Tensor, ...]],
        attend: Callable[..., list[tuple[int, torch.Tensor]]],
        work: Callable[[], Any],
    ) -> tuple[torch.Tensor, Any]:
        """Ulysses attention with the input on the wire (parallel/input_exchange.py): inputs, my
        streams' [B, S_i, C] (my tokens), go to every peer's inbox by memcpy on the side stream
        while the compute stream runs `work` and project(my rank, inputs); then project(peer,
        its inputs) for each peer, qkv() gives q, k, v [B, U*S_loc, h, D] (my head group of every
        rank's tokens), and attend(q, k, v) gives the attention as (first head, [B, U*S_loc, h_i, D])
        pieces (the wave split's two, speed/wave_split.py), which travel back as in `attention`, as
        they are (in head chunks it was slower: 72.5-72.9 against 71.8 ms a step, FLUX.1-dev on 2
        H100s). Returns ([B, S_loc, H, D], work())."""
        b, s = inputs[0].shape[0], sum(x.shape[1] for x in inputs)
        inboxes = self.boxes((self.degree, b, s, inputs[0].shape[-1]), inputs[0], tag=INPUT_TAG)
        compute, side = torch.cuda.current_stream(), self.side
        side.wait_stream(compute)  # the inputs are ready
        with torch.cuda.stream(side):
            post_to_peers(inputs, inboxes, self.rank, dim=1)  # [B, S_i, C] each: a memcpy when B = 1
            self.barrier()  # every rank's inputs are in my inbox
            arrived = side.record_event()
        done = work()
        project(self.rank, inputs)
        compute.wait_event(arrived)
        lengths = [x.shape[1] for x in inputs]
        for peer in range(self.degree):
            if peer != self.rank:
                project(peer, list(inboxes[self.rank][peer].split(lengths, dim=1)))
        pieces = attend(*qkv())  # (first head, [B, U*S_loc, h_i, D]) pieces of my head group
        group = sum(piece.shape[2] for _, piece in pieces)
        outboxes = self.boxes((b, s, group * self.degree, pieces[0][1].shape[-1]), pieces[0][1])
        side.wait_stream(compute)
        with torch.cuda.stream(side):
            for first, piece in pieces:  # (each where the kernel left it: no concatenated copy)
                scatter_tokens(piece, outboxes, self.rank * group + first, self.copy)
        return self.outputs_back(outboxes), done


INPUT_TAG = 1  # the inboxes of input_attention (apart from any q/k/v inbox of the same shape)


class SignalBarrier:
    """A barrier on the GPU streams of one host's ranks, in the signal pads of one symmetric buffer:
    each rank counts its arrivals and stores the count in its slot of every peer's pad, then waits for
    every peer's count in its own. Counts only grow: unlike flags that are raised and cleared (torch's
    own `barrier()`), none is ever reset, so a replayed CUDA graph needs nothing put back."""

    def __init__(self, handle, group: dist.ProcessGroup, device: torch.device):
        from sgdiff.kernels.triton_signal_barrier import signal_barrier  # Triton: imported once, here

        self.signal_barrier = signal_barrier
        world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.pads = torch.tensor([handle.signal_pad_ptrs[p] for p in range(world)], dtype=torch.int64, device=device)
        self.count = torch.zeros(1, dtype=torch.int32, device=device)
        handle.get_signal_pad(self.rank, (world,), torch.int32).zero_()
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # every pad is zero before anyone signals

    def __call__(self) -> None:  # twice per attention
        self.signal_barrier(self.pads, self.count, self.rank)

"""Reading a safetensors file at the pace of the machine: its header parsed here (the format is a
little-endian length, a JSON header, then the raw bytes of every tensor), the data read by several
threads at once straight into each tensor's own memory on the target device. On CUDA each reader
thread is a lane of its own: it reads a chunk into one of its two pinned staging buffers and copies it
on to the GPU on its own stream, so that the lanes keep the disk and the bus busy without waiting for
each other (pinned host-to-device copies run at the bus's rate, pageable ones at a fraction of it).
Nothing is unpickled; nothing is copied twice."""

from __future__ import annotations

import bisect
import json
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from sgdiff.errors import UserError

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
CHUNK_BYTES = 16 * 2**20  # one piece read at a time by one thread (on CUDA: one staging buffer)
READERS = 16  # reader threads (on CUDA: lanes, each with two staging buffers and a stream)
MAX_HEADER_BYTES = 100 * 2**20
Entry = tuple[torch.dtype, list[int], int, int]  # dtype, shape, begin, end (offsets into the data)


def read_header(path: Path) -> tuple[int, dict[str, Entry]]:
    """(where the data starts, {name: (dtype, shape, begin, end)}) with offsets into the data."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 0 < length <= MAX_HEADER_BYTES:
            raise UserError(f"{path} is not a safetensors file (header length {length})")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UserError(f"{path} is not a safetensors file (its header is not JSON)") from None
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry.get("dtype") not in DTYPES:
            raise UserError(f"{path}: tensor {name} has dtype {entry.get('dtype')}, which sgdiff does not read")
        begin, end = entry["data_offsets"]
        entries[name] = (DTYPES[entry["dtype"]], list(entry["shape"]), begin, end)
    return 8 + length, entries


class LoadingStopped(Exception):
    """A read given up: another part of the model failed, or the user interrupted the load."""


def read_range(fd: int, into: torch.Tensor, offset: int) -> None:
    """Fill the uint8 CPU tensor `into` from the file at `offset` (os.preadv lets go of the GIL)."""
    view = memoryview(into.numpy())  # type: ignore[arg-type]  # (numpy's stubs: no buffer before Python 3.12)
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise UserError(f"a safetensors file ended early (at byte {offset + done}): it is truncated")
        done += got


class Lane:
    """One CUDA reader thread's own: two pinned staging buffers, the stream that copies them on to the
    GPU, and the event after each buffer's last copies (None: free)."""

    def __init__(self, device: torch.device):
        self.buffers = [torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.stream = torch.cuda.Stream(device)
        self.copied: list[torch.cuda.Event | None] = [None, None]


class Reader:
    """The threads that read (on CUDA with their lanes, made once for many files). One file is read at a
    time (`lock`): parts loading side by side share the disk and the bus."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = ThreadPoolExecutor(READERS, thread_name_prefix="sgdiff-read")
        self.lanes: list[Lane | None] = [None] * READERS  # made by their own thread on first use
        self.lock = threading.Lock()
        self.stop = threading.Event()  # set: every read in progress gives up at its next chunk

    def check(self) -> None:
        if self.stop.is_set():
            raise LoadingStopped("the load was given up")

    def lane(self, index: int) -> Lane:
        lane = self.lanes[index]
        if lane is None:
            lane = self.lanes[index] = Lane(self.device)
        return lane

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc) -> None:
        self.pool.shutdown()
        self.lanes = [None] * READERS


_shared: dict[torch.device, tuple[Reader, int]] = {}  # device -> (its reader, how many users hold it)
_shared_lock = threading.Lock()


@contextmanager
def shared_reader(device: torch.device) -> Iterator[Reader]:
    """The one Reader of `device` while anyone holds it (its pinned buffers are made once for every part
    of a model loading side by side), closed when the last holder lets go."""
    with _shared_lock:
        reader, users = _shared.get(device, (None, 0))
        if reader is None:
            reader = Reader(device)
        _shared[device] = (reader, users + 1)
    try:
        yield reader
    finally:
        with _shared_lock:
            reader, users = _shared[device]
            if users == 1:
                del _shared[device]
                reader.__exit__()
            else:
                _shared[device] = (reader, users - 1)


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a flat uint8 tensor (the same memory)."""
    return tensor.reshape(-1).view(torch.uint8)


def read_into_tensors(fd: int, start: int, entries: dict[str, Entry], tensors: dict[str, torch.Tensor],
                      reader: Reader) -> None:  # fmt: skip
    """Fill CPU `tensors` from the file: every tensor, in slices of at most CHUNK_BYTES, side by side."""
    pieces = []
    for name, (_, _, begin, end) in entries.items():
        raw = raw_bytes(tensors[name])
        for offset in range(0, end - begin, CHUNK_BYTES):
            pieces.append((raw[offset : offset + CHUNK_BYTES], start + begin + offset))

    def read_piece(into: torch.Tensor, at: int) -> None:
        reader.check()
        read_range(fd, into, at)

    for future in [reader.pool.submit(read_piece, into, at) for into, at in pieces]:
        future.result()


class Layout:
    """Where each tensor's bytes lie in the data, sorted, to say quickly what a chunk holds."""

    def __init__(self, entries: dict[str, Entry]):
        self.spans = sorted((begin, end, name) for name, (_, _, begin, end) in entries.items() if end > begin)
        self.begins = [begin for begin, _, _ in self.spans]
        self.size = max((end for _, end, _ in self.spans), default=0)

    def chunk_copies(self, offset: int, count: int) -> list[tuple[str, int, int, int]]:
        """What of data bytes [offset, offset + count) goes where: (tensor name, from its byte, to its
        byte, from the chunk's byte) for every tensor that overlaps the chunk."""
        copies = []
        first = max(0, bisect.bisect_right(self.begins, offset) - 1)  # the last tensor to begin at or before it
        for begin, end, name in self.spans[first:]:
            if begin >= offset + count:
                break
            low, high = max(begin, offset), min(end, offset + count)  # this tensor's bytes in the chunk
            if low < high:
                copies.append((name, low - begin, high - begin, low - offset))
        return copies


def copy_through_staging(fd: int, start: int, entries: dict[str, Entry], tensors: dict[str, torch.Tensor],
                         reader: Reader) -> None:  # fmt: skip
    """Fill CUDA `tensors` from the file: lane k takes chunks k, k + READERS, ... and, for each, waits
    until the staging buffer it takes has reached the GPU, reads the chunk into it and queues its bytes'
    copies on to the tensors they belong to on the lane's stream. Every lane's copies are done on return."""
    layout = Layout(entries)
    failed = threading.Event()  # a lane failed: the others stop too

    def run_lane(index: int) -> None:
        lane = reader.lane(index)
        try:
            for turn, offset in enumerate(range(index * CHUNK_BYTES, layout.size, READERS * CHUNK_BYTES)):
                reader.check()
                if failed.is_set():
                    return
                count, side = min(CHUNK_BYTES, layout.size - offset), turn % 2
                copies = layout.chunk_copies(offset, count)
                if not copies:  # only tensors not asked for: not read
                    continue
                if (copied := lane.copied[side]) is not None:
                    copied.synchronize()  # its previous chunk has reached the GPU
                buffer = lane.buffers[side]
                read_range(fd, buffer[:count], start + offset)
                with torch.cuda.stream(lane.stream):
                    for name, low, high, at in copies:
                        raw_bytes(tensors[name])[low:high].copy_(buffer[at : at + high - low], non_blocking=True)
                    lane.copied[side] = lane.stream.record_event()
        except BaseException:
            failed.set()
            raise
        finally:
            lane.stream.synchronize()  # the tensors are whole before anyone uses them (also after a failure)

    for future in [reader.pool.submit(run_lane, index) for index in range(READERS)]:
        future.result()


def read_safetensors(
    path: Path, reader: Reader, wanted: Callable[[str], bool] = lambda name: True
) -> dict[str, torch.Tensor]:
    """The file's tensors that are `wanted` (by name; the others' bytes are not read) on the reader's
    device, as stored: each its own allocation (so that one replaced later, cast or fused, frees its
    memory), filled straight from the file."""
    start, entries = read_header(path)
    size = max((end for _, _, _, end in entries.values()), default=0)
    if start + size > path.stat().st_size:
        raise UserError(f"{path} is truncated: its header promises {start + size} bytes, it has {path.stat().st_size}")
    for name, (dtype, shape, begin, end) in entries.items():
        if end - begin != dtype.itemsize * math.prod(shape):
            raise UserError(f"{path}: tensor {name} has {end - begin} bytes, its shape and dtype need more or fewer")
    entries = {name: entry for name, entry in entries.items() if wanted(name)}
    device = reader.device
    tensors = {name: torch.empty(shape, dtype=dtype, device=device) for name, (dtype, shape, _, _) in entries.items()}
    fd = os.open(path, os.O_RDONLY)
    try:
        with reader.lock:
            reader.check()
            if reader.device.type == "cuda":
                copy_through_staging(fd, start, entries, tensors, reader)
            else:
                read_into_tensors(fd, start, entries, tensors, reader)
    finally:
        os.close(fd)
    return tensors

"""Ulysses' exchange copies (parallel/symmetric_exchange.py): one [B, S, h, D] view copied to several
destinations at once. Pair p copies the source view shifted by p * `src_pair_stride` elements to
destination p, whose buffer may be a peer GPU's mapped memory; every pair has the same strides.

torch's copy_ runs such strided copies element by element (2-byte stores, which NVLink carries
poorly), one launch per pair, one after the other. Here each row of D channels moves as 16-byte
vectors, and one launch covers every pair: the local copy runs while the peers' travel. Imported
only when it runs (Triton is a GPU package)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def copy_heads_kernel(
    src, src_pair_stride, src_b, src_s, src_h, dst, dst_offsets, dst_b, dst_s, dst_h, S,
    PAIRS: tl.constexpr, D: tl.constexpr, DB: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    # program (token block, head, batch * PAIRS + pair): BLOCK_S tokens of one head, D channels each.
    # Every offset is a multiple of 8 elements (checked on the host): rows move as 16-byte vectors.
    pair, b = tl.program_id(2) % PAIRS, tl.program_id(2) // PAIRS
    s = (tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)  # [BLOCK_S]
    h = tl.program_id(1)
    src_rows = tl.multiple_of(pair * src_pair_stride + b * src_b + s * src_s + h * src_h, 8)
    dst_rows = tl.multiple_of(tl.load(dst_offsets + pair) + b * dst_b + s * dst_s + h * dst_h, 8)
    d = tl.arange(0, DB)[None, :]
    mask = (s[:, None] < S) & (d < D)
    x = tl.load(src + src_rows[:, None] + d, mask=mask)
    tl.store(dst + dst_rows[:, None] + d, x, mask=mask)


class HeadCopy:
    """Copies to a fixed list of destination views (every rank's inbox or outbox slot: made once,
    before any CUDA graph capture, so their offset table never needs a host copy during one)."""

    BLOCK_S, WARPS = 32, 4  # tokens per program, warps per program

    def __init__(self, destinations: list[torch.Tensor]):
        first = destinations[0]
        if any(t.shape != first.shape or t.stride() != first.stride() for t in destinations):
            raise ValueError("HeadCopy's destinations must be views of one shape and strides")
        self.destinations = destinations
        size = first.element_size()
        offsets = [(t.data_ptr() - first.data_ptr()) // size for t in destinations]  # elements from the first
        self.offsets = torch.tensor(offsets, dtype=torch.int64, device=first.device)
        self.aligned = first.data_ptr() % 16 == 0 and all(
            (t.data_ptr() - first.data_ptr()) % 16 == 0 for t in destinations
        ) and all(x % 8 == 0 for x in first.stride()[:3]) and first.stride(-1) == 1  # fmt: skip

    def __call__(self, src: torch.Tensor, src_pair_stride: int) -> bool:
        """destination p = src shifted by p * src_pair_stride elements ([B, S, h, D], D contiguous), in
        one launch; False (nothing copied) where 16-byte vectors do not fit the addresses."""
        dst = self.destinations[0]
        if src.shape != dst.shape or src.stride(-1) != 1:
            raise ValueError(f"HeadCopy takes [B, S, h, D] views of one shape, D contiguous: {src.shape} {dst.shape}")
        b, s, h, d = src.shape
        strides_ok = src_pair_stride % 8 == 0 and d % 8 == 0 and all(x % 8 == 0 for x in src.stride()[:3])
        if not (self.aligned and strides_ok and src.data_ptr() % 16 == 0):
            return False
        pairs = len(self.destinations)
        copy_heads_kernel[(triton.cdiv(s, self.BLOCK_S), h, b * pairs)](
            src, src_pair_stride, *src.stride()[:3], dst, self.offsets, *dst.stride()[:3], s,
            PAIRS=pairs, D=d, DB=triton.next_power_of_2(d), BLOCK_S=self.BLOCK_S, num_warps=self.WARPS,
        )  # fmt: skip
        return True

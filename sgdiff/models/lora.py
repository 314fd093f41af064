"""The math of LoRA adapters kept beside a Linear (unfused): y = linear(x) + sum_i s_i * B_i (A_i x).

Every adapter on one Linear is stacked along the rank: A [R, in] holds each adapter's down rows one after
the other (R = the sum of their ranks), B [out, R] its up columns, and `scale` [R] each rank's factor
(the adapter's scale times its alpha / rank). Switching adapters or their scales writes new values into
`scale` (zero: an adapter off) and never changes a shape, so code that torch.compile traced, or a CUDA
graph captured, runs on unchanged (sgdiff/lora/apply.py makes these and sets their scales)."""

from __future__ import annotations

import torch
from torch import nn


class LowRank(nn.Module):
    """The stacked adapters of one Linear. Its tensors are buffers that no state dict holds: they move
    with the model (.to; offloading lends the factors as it lends weights and keeps `scale` on the compute
    device) and leave the checkpoint's names as they were."""

    down: torch.Tensor  # A [R, in]
    up: torch.Tensor  # B [out, R]
    scale: torch.Tensor  # [R]: each rank's adapter scale * alpha / rank
    # written in place when adapters are switched: offloading keeps it on the compute device (offload/weights.py)
    RESIDENT_BUFFERS = ("scale",)

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("down", down, persistent=False)
        self.register_buffer("up", up, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., in] -> the adapters' sum [.., out], in x's dtype."""
        return nn.functional.linear(self.hidden(x), self.up)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., in] -> the scaled down projection [.., R]."""
        return nn.functional.linear(x, self.down) * self.scale

    def add_to(self, out: torch.Tensor, x: torch.Tensor, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """out += forward(x), in place, and out: one GEMM reads `out` and writes the sum (cuBLAS's beta = 1),
        where `out + forward(x)` writes the update, reads it back with `out` and writes a third tensor. `out`
        [.., out] may be a column slice of a wider output (a fused projection's share). `hidden`: hidden(x),
        when the caller has it already. Under torch.compile the sum stays out of place: inductor folds the
        addition into the kernels that read `out`."""
        if hidden is None:
            hidden = self.hidden(x)
        if torch.compiler.is_compiling():
            return out + nn.functional.linear(hidden, self.up)
        flat = out.view(-1, out.shape[-1])  # [.., out] -> [M, out], a view: the sum lands in `out`
        flat.addmm_(hidden.reshape(-1, hidden.shape[-1]), self.up.t())  # [M, R] @ [R, out]
        return out

    def rows(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """forward(x)[..., rows] from those rows of B alone: x [.., in] -> [.., rows] (sequence parallelism's
        share of a Linear's outputs: parallel/modulation.py, parallel/input_exchange.py)."""
        return nn.functional.linear(self.hidden(x), self.up[rows])

    def hidden_over_concat(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """hidden(cat(parts, -1)) without the concatenated copy: each part [.., w] meets its w columns of A."""
        hidden, start = None, 0
        for part in parts:
            width = part.shape[-1]
            term = nn.functional.linear(part, self.down[:, start : start + width])  # [.., R]
            hidden = term if hidden is None else hidden + term
            start += width
        return hidden * self.scale  # type: ignore[operator]  # (parts is never empty)

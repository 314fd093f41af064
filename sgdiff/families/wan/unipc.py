"""UniPC multistep sampling in flow-matching mode (Wan's scheduler) as plain functions over tensors.

Flow matching: x_sigma = (1 - sigma) * x0 + sigma * noise and the model predicts v = noise - x0, so
x0 = x - sigma * v. With alpha = 1 - sigma and lambda = log(alpha / sigma), one update from sigma_s
to sigma_t (h = lambda_t - lambda_s) is

    x_t = sigma_t / sigma_s * x_s - alpha_t * (e^-h - 1) * x0_s - alpha_t * B(h) * sum_k rho_k * D_k

with D_k = (x0_k - x0_s) / r_k over the earlier points k (r_k = (lambda_k - lambda_s) / h) and
B(h) = -h (bh1) or e^-h - 1 (bh2). The predictor (UniP) takes x_s to the next sigma; once the model
has seen that sample, the corrector (UniC) redoes the same update with the new x0 as one more point.
The order starts at 1, grows by one per step up to `solver_order`, and (`lower_order_final`) shrinks
again towards the end.

This reproduces diffusers 0.42.1's UniPCMultistepScheduler bit for bit (same float32 tensor ops on
the same devices; the schedule in float64 numpy as diffusers) for the configs `UniPCConfig.from_dict`
accepts, which are sgdiff's own:
  prediction_type "flow_prediction", use_flow_sigmas true, predict_x0 true, thresholding false,
  solver_p none, no karras / exponential / beta sigmas, no dynamic shifting, no shift_terminal;
  any flow_shift and num_train_timesteps, solver_order >= 1, solver_type "bh1" or "bh2",
  lower_order_final, disable_corrector, final_sigmas_type "zero" or "sigma_min", timestep_spacing
  "linspace" / "leading" / "trailing" (unused with flow sigmas), any beta settings (unused likewise).
Any other value makes `from_dict` answer None: the caller then keeps diffusers' class.
The math is not Wan's; it lives with its one user, the Wan family, until another family needs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# UniPCMultistepScheduler options sgdiff's UniPC has no choice for: (diffusers' default, the values ours
# implements); the defaults of the first two are not ours
FIXED_OPTIONS: dict[str, tuple[Any, tuple]] = {
    "prediction_type": ("epsilon", ("flow_prediction",)),
    "use_flow_sigmas": (False, (True,)),
    "predict_x0": (True, (True,)),
    "thresholding": (False, (False,)),
    "solver_p": (None, (None,)),
    "use_karras_sigmas": (False, (False,)),
    "use_exponential_sigmas": (False, (False,)),
    "use_beta_sigmas": (False, (False,)),
    "use_dynamic_shifting": (False, (False,)),
    "shift_terminal": (None, (None, 0, 0.0)),
    "timestep_spacing": ("linspace", ("linspace", "leading", "trailing")),  # unused with flow sigmas
    "beta_schedule": ("linear", ("linear", "scaled_linear", "squaredcos_cap_v2")),  # likewise
}
# options that shape only the beta (non-flow) schedule, thresholding or dynamic shifting: any value
UNUSED_OPTIONS = (
    "beta_start", "beta_end", "trained_betas", "rescale_betas_zero_snr", "dynamic_thresholding_ratio",
    "sample_max_value", "steps_offset", "time_shift_type", "sigma_min", "sigma_max",
)  # fmt: skip


@dataclass(frozen=True)
class UniPCConfig:
    """The UniPCMultistepScheduler options sgdiff's own UniPC follows (diffusers' defaults)."""

    num_train_timesteps: int = 1000
    flow_shift: float = 1.0
    solver_order: int = 2
    solver_type: str = "bh2"  # "bh1" | "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()  # steps whose following corrector is skipped
    final_sigmas_type: str = "zero"  # "zero" | "sigma_min" (the last sigma repeated)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> UniPCConfig | None:
        """The config as ours, or None where it asks for something only diffusers' class does."""
        for key, (default, ours) in FIXED_OPTIONS.items():
            value = raw.get(key, default)
            if not any(value == v and type(value) is type(v) for v in ours):
                return None
        corrector = raw.get("disable_corrector", [])
        if not (isinstance(corrector, (list, tuple)) and all(is_int(i) for i in corrector)):
            return None
        names = ("num_train_timesteps", "flow_shift", "solver_order", "solver_type", "lower_order_final")
        config = cls(
            **{k: raw[k] for k in (*names, "final_sigmas_type") if k in raw}, disable_corrector=tuple(corrector)
        )
        return config if config.is_ours() else None

    def is_ours(self) -> bool:
        return (
            is_int(self.num_train_timesteps) and self.num_train_timesteps > 0
            and (is_int(self.flow_shift) or isinstance(self.flow_shift, float))
            and is_int(self.solver_order) and self.solver_order >= 1
            and self.solver_type in ("bh1", "bh2")
            and isinstance(self.lower_order_final, bool)
            and self.final_sigmas_type in ("zero", "sigma_min")
        )  # fmt: skip


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def unipc_schedule(num_steps: int, config: UniPCConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [num_steps + 1] float32, timesteps [num_steps] int64), both on the CPU: shifted flow sigmas
    from 1 down to 1/num_train_timesteps, computed in float64 as diffusers does."""
    n = config.num_train_timesteps
    sigmas = np.linspace(1, 1 / n, num_steps + 1)[:-1]
    sigmas = config.flow_shift * sigmas / (1 + (config.flow_shift - 1) * sigmas)
    if np.fabs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6  # keeps log(alpha) = log(1 - sigma) finite
    timesteps = torch.from_numpy(sigmas * n).to(torch.int64)  # truncated, as diffusers
    last = sigmas[-1] if config.final_sigmas_type == "sigma_min" else 0
    return torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32)), timesteps


@dataclass(frozen=True)
class UniPCUpdate:
    """The scalars of one update from sigma_s to sigma_t (0-dim float32 tensors on the sampling device):
    x_t = ratio * x - x0_weight * m0 - residual_weight * (einsum(rhos[:K], D) [+ rhos[-1] * (m_t - m0)])."""

    ratio: torch.Tensor  # sigma_t / sigma_s
    x0_weight: torch.Tensor  # alpha_t * (e^-h - 1)
    residual_weight: torch.Tensor  # alpha_t * B(h)
    rks: list[torch.Tensor]  # r_k of the K = order - 1 earlier points, newest first
    rhos: torch.Tensor | None  # [K] (predictor) or [K + 1] (corrector); None: predictor of order 1


def flow_lambda(sigma: torch.Tensor) -> torch.Tensor:
    """log(alpha / sigma) with alpha = 1 - sigma, as two logs (the order of diffusers' ops)."""
    return torch.log(1 - sigma) - torch.log(sigma)


def unipc_update(sigmas: torch.Tensor, s: int, order: int, solver_type: str, corrector: bool) -> UniPCUpdate:
    """The update from sigmas[s] to sigmas[s + 1] of this order, the earlier points sigmas[s - k]
    (k = 1 .. order - 1). `sigmas` [num_steps + 1] float32 on the sampling device."""
    sigma_s, sigma_t = sigmas[s], sigmas[s + 1]
    alpha_t = 1 - sigma_t
    lambda_s = flow_lambda(sigma_s)
    h = flow_lambda(sigma_t) - lambda_s
    rks = [(flow_lambda(sigmas[s - k]) - lambda_s) / h for k in range(1, order)]
    minus_h = -h
    h_phi_1 = torch.expm1(minus_h)  # e^-h - 1
    b_h = minus_h if solver_type == "bh1" else torch.expm1(minus_h)
    size = order if corrector else order - 1  # the corrector weighs the new point too
    if size == 0:
        rhos = None
    elif size == 1:  # UniP-2 and UniC-1: a fixed weight, as diffusers
        rhos = torch.ones(1, device=sigmas.device) * 0.5
    else:
        rhos = solve_rhos(rks, minus_h, h_phi_1, b_h, size)
    return UniPCUpdate(sigma_t / sigma_s, alpha_t * h_phi_1, alpha_t * b_h, rks, rhos)


def solve_rhos(rks: list[torch.Tensor], minus_h, h_phi_1, b_h, size: int) -> torch.Tensor:
    """The [size] weights rho solving R rho = b, R[i] = r^i over (r_1, .., r_K, 1) and
    b[i] = (i + 1)! * (-h) * phi_{i+2}(-h) / B(h) (their leading size x size part)."""
    r = torch.stack([*rks, torch.ones((), device=minus_h.device)])  # [K + 1]
    rows, b = [], []
    h_phi_k = h_phi_1 / minus_h - 1
    factorial = 1
    for i in range(1, len(r) + 1):
        rows.append(torch.pow(r, i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / minus_h - 1 / factorial
    matrix, vector = torch.stack(rows), torch.stack(b)  # [K + 1, K + 1], [K + 1]
    return torch.linalg.solve(matrix[:size, :size], vector[:size])


def apply_update(
    update: UniPCUpdate,
    x: torch.Tensor,
    m0: torch.Tensor,
    earlier: list[torch.Tensor],
    m_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [B, C, ...] at sigma_s -> x at sigma_t, in x's dtype. m0, earlier: the x0 predictions at sigma_s and
    at the earlier points (newest first); m_t: the one at sigma_t (the corrector's extra point)."""
    base = update.ratio * x - update.x0_weight * m0
    rhos = update.rhos.to(x.dtype) if update.rhos is not None else None
    residual: torch.Tensor | int = 0
    if earlier:
        assert rhos is not None  # (None: a first-order predictor, which has neither earlier points nor m_t)
        differences = torch.stack(
            [(m - m0) / rk for m, rk in zip(earlier, update.rks, strict=True)], dim=1
        )  # [B, K, C, ...]
        residual = torch.einsum("k,bkc...->bc...", rhos[: len(earlier)], differences)
    if m_t is not None:
        assert rhos is not None
        residual = residual + rhos[-1] * (m_t - m0)
    return (base - update.residual_weight * residual).to(x.dtype)


def step_orders(num_steps: int, config: UniPCConfig) -> list[int]:
    """The predictor's order at each step: warming up from 1, lowered near the end (lower_order_final)."""
    final = [num_steps - i if config.lower_order_final else config.solver_order for i in range(num_steps)]
    return [min(config.solver_order, final[i], i + 1) for i in range(num_steps)]


def earlier_points(history: list[torch.Tensor], count: int) -> list[torch.Tensor]:
    """The `count` x0 predictions before the newest one (history[-1]), newest first."""
    return history[-2 : -count - 2 : -1]


class UniPCSampler:
    """UniPC over a request's steps. Every update's scalars are computed up front on the device (no host
    sync while sampling); between steps it keeps the last `solver_order` x0 predictions and the sample
    the last predictor started from, a row per latent of the batch."""

    def __init__(self, config: UniPCConfig, num_steps: int, device: torch.device):
        self.config = config
        self.sigmas, timesteps = unipc_schedule(num_steps, config)  # sigmas stay on the CPU, as diffusers'
        self.timesteps = timesteps.to(device)
        on_device = self.sigmas.to(device)
        self.orders = step_orders(num_steps, config)
        self.predictors = [unipc_update(on_device, i, p, config.solver_type, False) for i, p in enumerate(self.orders)]
        self.correctors: list[UniPCUpdate | None] = [None]  # (the first step has no corrector)
        self.correctors += [
            None if i - 1 in config.disable_corrector
            else unipc_update(on_device, i - 1, self.orders[i - 1], config.solver_type, True)
            for i in range(1, num_steps)
        ]  # fmt: skip
        self.history: list[torch.Tensor] = []  # x0 predictions, oldest first, [B, C, ...] each
        self.last_sample: torch.Tensor | None = None

    def step(self, velocity: torch.Tensor, index: int, latents: torch.Tensor) -> torch.Tensor:
        x0 = latents - self.sigmas[index] * velocity  # the model's x0 prediction, [B, C, ...]
        corrector = self.correctors[index]
        if corrector is not None and self.last_sample is not None:  # UniC: the last step again, with x0 known
            m0, earlier = self.history[-1], earlier_points(self.history, len(corrector.rks))
            latents = apply_update(corrector, self.last_sample, m0, earlier, x0)
        self.history = [*self.history, x0][-self.config.solver_order :]
        self.last_sample = latents
        predictor = self.predictors[index]  # UniP: on to the next sigma
        return apply_update(predictor, latents, x0, earlier_points(self.history, len(predictor.rks)))

    def keep_rows(self, rows: torch.Tensor, batch: int) -> None:
        self.history = [m[rows.to(m.device)] for m in self.history]
        if self.last_sample is not None:
            self.last_sample = self.last_sample[rows.to(self.last_sample.device)]

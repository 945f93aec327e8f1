"""Noise schedule, sampling grid and the per-row coefficients of the restoration chain.

Conventions (docs/design.md section 1): linear betas 1e-4..0.02 over 1000 training steps,
abar(t) = prod_{k<=t} (1 - beta_k), abar(-1) = 1. For N sampling steps and start S:
skip = S // N, seq = [0, skip, ..., (N-1) * skip] (exactly N entries). Steps run from the
noisiest, tau_1 = seq[N-1], ..., tau_N = seq[0]; the next time of tau_i is tau_{i+1}, and -1
for tau_N. All coefficients are float64; cast where they are used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deqir_dist.errors import DeqirError, check_int, is_int, is_real

TRAIN_STEPS = 1000


def linear_alphas_cumprod(n: int = TRAIN_STEPS, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """abar(t) for t = 0..n-1 of the linear beta schedule, float64."""
    betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


def timestep_grid(steps: int, start: int = TRAIN_STEPS, spacing: str = "leading", offset: int = 0) -> torch.Tensor:
    """tau_1..tau_N (descending, int64): the N sampling times, noisiest first.

    ``spacing`` as diffusers' ``timestep_spacing`` over T = ``start`` training steps: "leading"
    (this project's grid: skip = T // N, [0, skip, ..., (N-1) skip] + ``offset``), "trailing"
    (round(T - k T / N) - 1, k = 0..N-1) or "linspace" (round(linspace(0, T - 1, N)))."""
    if not is_int(steps):
        raise DeqirError(f"steps must be an integer, got {steps!r}")
    steps, start = int(steps), check_int("start", start)
    if steps < 1 or steps > start:
        raise DeqirError(f"steps must be in 1..start={start}, got {steps}")
    offset = check_int("steps_offset", offset, 0)
    if spacing == "leading":
        taus = torch.arange(steps - 1, -1, -1, dtype=torch.int64) * (start // steps) + offset
    elif spacing == "trailing":
        taus = torch.round(torch.arange(start, 0, -start / steps, dtype=torch.float64)[:steps]).long() - 1
    elif spacing == "linspace":
        taus = torch.linspace(0, start - 1, steps, dtype=torch.float64).round().long().flip(0)
    else:
        raise DeqirError(f"timestep spacing must be leading, trailing or linspace, got {spacing!r}")
    if spacing != "leading" and offset:
        raise DeqirError(f"steps_offset applies to leading spacing only (diffusers), got {offset} with {spacing}")
    if int(taus[0]) >= start:
        raise DeqirError(f"steps_offset={offset} puts the first step at t={int(taus[0])}, past start={start}")
    return taus


def _check_schedule(alphas_cumprod: torch.Tensor, start: int) -> torch.Tensor:
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().cpu()
    if ac.numel() < start:
        raise DeqirError(f"start={start} is past the model's noise schedule: start (--start) must be at most "
                         f"{ac.numel()}, its number of training timesteps")
    if not torch.isfinite(ac).all() or (ac <= 0).any() or (ac > 1).any():
        raise DeqirError("alphas_cumprod must be finite and in (0, 1]")
    return ac


@dataclass(frozen=True)
class ChainCoefficients:
    """Per-row scalars of the chain, each a float64 tensor of shape (N,), rows i = 1..N.

    a = abar(tau_i), a_next = abar(next of tau_i); with s(t) = sqrt(1/abar(t) - 1):
    k1 = s(tau_i), k2 = sqrt(1 - w^2) s(next), kn = v s(next), g = sqrt(a_next),
    lam = range-space weight of the rectification (1 without measurement noise; with
    sigma_y > 0, lam_i = min(1, s(next) / sigma_y), the DDNM+-style rule).
    """

    taus: torch.Tensor
    a: torch.Tensor
    a_next: torch.Tensor
    k1: torch.Tensor
    k2: torch.Tensor
    kn: torch.Tensor
    g: torch.Tensor
    lam: torch.Tensor
    etw: float
    nw: float
    sigma_y: float

    @property
    def steps(self) -> int:
        return int(self.taus.numel())

    @property
    def range_recurrent(self) -> bool:
        """True when some lam < 1, i.e. the range-space part is a recurrence, not per row."""
        return bool((self.lam < 1).any())


def chain_coefficients(
    steps: int,
    start: int = TRAIN_STEPS,
    etw: float = 0.0,
    nw: float = 0.0,
    sigma_y: float = 0.0,
    alphas_cumprod: torch.Tensor | None = None,
    spacing: str = "leading",
    offset: int = 0,
) -> ChainCoefficients:
    """All loop-invariant scalars of the serial sampler / joint map for this grid
    (``timestep_grid(steps, start, spacing, offset)``)."""
    taus = timestep_grid(steps, start, spacing, offset)
    ac = _check_schedule(linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod, start)
    for name, val in (("etw", etw), ("nw", nw), ("sigma_y", sigma_y)):
        if not (is_real(val) and math.isfinite(val)):
            raise DeqirError(f"{name} must be a finite number, got {val!r}")
    etw, nw, sigma_y = float(etw), float(nw), float(sigma_y)
    if not 0.0 <= etw <= 1.0:
        raise DeqirError(f"etw must be in [0, 1], got {etw}")
    if nw < 0 or sigma_y < 0:
        raise DeqirError("nw and sigma_y must be >= 0")
    a = ac[taus]
    a_next = torch.cat([ac[taus[1:]], torch.ones(1, dtype=torch.float64)])
    s = torch.sqrt(1.0 / a - 1.0)
    s_next = torch.sqrt((1.0 / a_next - 1.0).clamp_min(0.0))
    lam = torch.ones_like(a) if sigma_y == 0 else torch.clamp(s_next / sigma_y, max=1.0)
    return ChainCoefficients(
        taus=taus, a=a, a_next=a_next, k1=s, k2=(1.0 - etw**2) ** 0.5 * s_next, kn=nw * s_next,
        g=torch.sqrt(a_next), lam=lam, etw=float(etw), nw=float(nw), sigma_y=float(sigma_y),
    )


@dataclass(frozen=True)
class NullCoordinates:
    """Per-row scalars (N,) of the null-space recurrence the joint map iterates.

    With w_i the null-space state in coordinates n'_i (P h_i = n'_i P w_i) and
    d_i = eps_i - shift_i h_{i-1} the part of the network output the recurrence sums,

        P w_i = decay_i P w_{i-1} + coef_i P d_i + noise_i P z_i,    P w_0 = P xi / n_1.

    Every choice has the serial trajectory as its fixed point; they differ in how fast Picard
    iteration converges (see ``null_coordinates``).
    """

    n_in: torch.Tensor       # n_i: scale of the row's input h_{i-1}
    n_out: torch.Tensor      # n'_i: scale of the row's output h_i
    decay: torch.Tensor
    coef: torch.Tensor
    noise: torch.Tensor
    shift: torch.Tensor


def null_coordinates(coeffs: ChainCoefficients, data_std: float | None) -> NullCoordinates:
    """The null-space recurrence in coordinates n(t) = sqrt(abar c^2 + 1 - abar), c = data_std.

    For data drawn from N(0, c^2) the DDIM ODE keeps h / n(t) constant (and d = 0), so in these
    coordinates Picard iteration only has to resolve what the prior adds beyond a Gaussian of
    variance c^2. With alpha = sqrt(abar), sigma = sqrt(1 - abar), c_w = sqrt(1 - w^2), input
    time tau_i and output time next(tau_i) (primed):

        decay = (alpha' alpha c^2 + c_w sigma' sigma) / (n n'),   coef = (c_w sigma' - alpha' sigma / alpha) / n',
        noise = v sigma' / n',   shift = sigma / n^2   (so d = eps - sigma h / n^2).

    ``data_std=None`` is the limit c -> infinity (scaled by c): n = alpha, decay 1, d = eps, the
    prefix sum of eps of DeqIR's unrolled form (``u_i = h_i / sqrt(a'_i)``).
    """
    a, an = coeffs.a, coeffs.a_next
    al, sg, aln, sgn = a.sqrt(), (1 - a).sqrt(), an.sqrt(), (1 - an).clamp_min(0).sqrt()
    cw = (1.0 - coeffs.etw ** 2) ** 0.5
    if data_std is None:
        return NullCoordinates(al, aln, torch.ones_like(a), coeffs.k2 - coeffs.k1, coeffs.kn, torch.zeros_like(a))
    c2 = float(data_std) ** 2
    n, nn = (a * c2 + 1 - a).sqrt(), (an * c2 + 1 - an).sqrt()
    return NullCoordinates(n, nn, (aln * al * c2 + cw * sgn * sg) / (n * nn), (cw * sgn - aln * sg / al) / nn,
                           coeffs.nw * sgn / nn, sg / n ** 2)

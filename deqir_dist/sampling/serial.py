"""The serial DDNM sampler with DeqIR's two knobs: the reference every parallel solver must match.

h_0 = xi; for i = 1..N (docs/design.md section 1, (1.1)-(1.4)):
    eps_i = eps(h_{i-1}, tau_i)
    x0_i  = (h_{i-1} - sqrt(1 - a_i) eps_i) / sqrt(a_i)                (not clipped)
    x0~_i = x0_i - lam_i A+(A x0_i - y)          (lam = 1: A+y + P x0_i)
    h_i   = sqrt(a'_i) x0~_i + sqrt(1 - a'_i) (sqrt(1 - w^2) eps_i + v z_i)
The result is h_N.
"""
from __future__ import annotations

import torch

from deqir_dist.sampling.schedule import ChainCoefficients, linear_alphas_cumprod


def sample_serial(eps_fn, op, coeffs: ChainCoefficients, y: torch.Tensor, xi: torch.Tensor,
                  step_noise: torch.Tensor | None = None, progress: bool = False,
                  callback=None) -> torch.Tensor:
    """Run the N steps for a batch; step_noise is z (B, N, C, H, W) (needed when nw > 0).

    ``callback(i, h_i)`` sees every state (i = 1..N).
    """
    h = xi
    y = y.to(device=xi.device, dtype=xi.dtype)
    b = xi.shape[0]
    bar = None
    if progress:
        from deqir_dist.sampling.progress import progress_bar
        bar = progress_bar(coeffs.steps, "serial", "step", leave=False)
    for i in range(coeffs.steps):
        a, a_next, lam = float(coeffs.a[i]), float(coeffs.a_next[i]), float(coeffs.lam[i])
        t = torch.full((b,), int(coeffs.taus[i]), dtype=torch.int64, device=xi.device)
        z = step_noise[:, i] if coeffs.nw > 0 else None
        h = ddnm_step(op, h, eps_fn(h, t), y, a, a_next, lam, coeffs.etw, coeffs.nw, z)
        if callback is not None:
            callback(i + 1, h)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return h


def ddnm_step(op, h: torch.Tensor, eps: torch.Tensor, y: torch.Tensor, a, a_next, lam, etw: float, nw: float,
              z: torch.Tensor | None = None) -> torch.Tensor:
    """One step of the serial sampler from h = h_{i-1} and eps = eps(h_{i-1}, tau_i): h_i.

    a, a_next, lam are the row's scalars, or tensors (rows, 1, 1, 1) when rows of different
    steps are stacked (the parareal fine solve); z is the row's noise draw (used when nw > 0)."""
    x0 = (h - (1 - a) ** 0.5 * eps) / a ** 0.5
    x0 = x0 - lam * op.A_pinv(op.A(x0) - y)
    out = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * (1 - etw ** 2) ** 0.5 * eps
    if nw > 0:
        out = out + (1 - a_next) ** 0.5 * nw * z.to(out)
    return out



def coarse_trajectory(eps_fn, op, coeffs: ChainCoefficients, coarse_steps: int, y: torch.Tensor,
                      xi: torch.Tensor, alphas_cumprod: torch.Tensor | None = None) -> torch.Tensor:
    """A warm start for the N rows from a deterministic serial pass over S of the N timesteps.

    The coarse times are S of the fine ones, evenly spaced from tau_1 (so xi is the state at
    the first of them). At coarse step j the pass has (x0~_j, eps_j); fine row i, the state at
    time t = next(tau_i), takes those of the last coarse step with tau >= t and jumps:
    h_i = sqrt(abar(t)) x0~_j + sqrt(1 - abar(t)) eps_j. Returns (B, N, C, H, W).
    """
    ac = (linear_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod)).double()
    n = coeffs.steps
    pick = torch.linspace(0, n - 1, min(coarse_steps, n)).round().long().unique()
    taus = coeffs.taus[pick]
    y = y.to(device=xi.device, dtype=xi.dtype)
    h, b = xi, xi.shape[0]
    x0s, epss = [], []
    for j in range(taus.numel()):
        a = float(ac[taus[j]])
        a_next = float(ac[taus[j + 1]]) if j + 1 < taus.numel() else 1.0
        eps = eps_fn(h, torch.full((b,), int(taus[j]), dtype=torch.int64, device=xi.device))
        x0 = (h - (1 - a) ** 0.5 * eps) / a ** 0.5
        x0 = x0 - op.A_pinv(op.A(x0) - y)
        x0s.append(x0)
        epss.append(eps)
        h = a_next ** 0.5 * x0 + (1 - a_next) ** 0.5 * eps
    next_t = torch.cat([coeffs.taus[1:], torch.tensor([-1])])
    rows = []
    for i in range(n):
        j = max(int((taus >= next_t[i]).sum()) - 1, 0)
        an = float(coeffs.a_next[i])
        rows.append(an ** 0.5 * x0s[j] + (1 - an) ** 0.5 * epss[j])
    return torch.stack(rows, dim=1)

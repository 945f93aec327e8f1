"""The joint fixed-point map of the restoration chain, for a block of rows.

One serial step (docs/design.md section 1, (1.1)-(1.4)) splits, with P and Q = A+A, into a null-space and a
range-space part that never mix (P and Q commute with every scalar):

    P h_i = n'_i P w_i,   P w_i = m_i P w_{i-1} + e_i P d_i + nz_i P z_i,   d_i = eps_i - s_i h_{i-1}
    Q h_i = g_i Q u_i,    Q u_i = (1 - lam_i) Q u_{i-1} + (k2_i - (1 - lam_i) k1_i) Q eps_i + lam_i A+y + kn_i Q z_i

with eps_i = eps(h_{i-1}, tau_i). The null-space coordinates (n, m, e, nz, s) are
``schedule.null_coordinates``: DeqIR's unrolled form is m = 1, d = eps (a prefix sum); the
default normalises by the state's scale under a Gaussian prior, which converges in fewer
iterations. The range part has no memory when lam = 1.

The joint map F takes the current rows h_1..h_N, evaluates every eps_i from h_{i-1} (h_0 = xi) in
ONE batched denoiser call, and returns h'_i from the two scans. It is causal, its fixed point is
the serial trajectory, and Picard iteration is exact after N sweeps.

Unit of work: a block of rows [lo, hi) with an incoming halo row h_{lo-1} (the denoiser input of
row lo) and an incoming carry (P w_{lo-1}, Q u_{lo-1}). ``increments`` needs only the inputs;
``summary`` gives what the next block's carry needs; ``outputs`` needs the carry.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from deqir_dist.sampling.schedule import ChainCoefficients, null_coordinates

ACC = torch.float64         # dtype of the prefix-sum accumulators and carries
ROW_WEIGHT_FLOOR = 1e-3     # row weights for residual norms: 1 / max(1 - a'_i, floor)
SCAN_CLOSED_FORM_MIN = 1e-6  # linear_scan uses cumprod / cumsum when the decays' product stays above this


def linear_scan(decay: torch.Tensor, b: torch.Tensor, init: torch.Tensor | None) -> torch.Tensor:
    """v_i = decay_i v_{i-1} + b_i along dim 1 of b (B, n, ...), v_0 = init (B, ...) or 0.

    ``decay`` is a host (n,) tensor; all-ones is a cumsum and all-zeros is b itself. Positive
    decays whose product stays >= SCAN_CLOSED_FORM_MIN use the closed form (relative error about
    1e-16 / product in float64); anything else runs the loop over rows.
    """
    if bool((decay == 0).all()):
        return b
    if bool((decay == 1).all()):
        out = torch.cumsum(b, dim=1)
        return out if init is None else out + init.unsqueeze(1)
    cum = torch.cumprod(decay.double(), 0)
    if bool((decay > 0).all()) and float(cum[-1]) >= SCAN_CLOSED_FORM_MIN:
        # v_i = D_i (init + sum_{j<=i} b_j / D_j), D_i = prod_{k<=i} decay_k: two vector ops, no loop
        d = cum.to(device=b.device, dtype=b.dtype).view(1, -1, *([1] * (b.dim() - 2)))
        out = torch.cumsum(b / d, dim=1)
        return (out if init is None else out + init.unsqueeze(1)) * d
    out = torch.empty_like(b)
    v = torch.zeros_like(b[:, 0]) if init is None else init
    for i in range(b.shape[1]):
        v = float(decay[i]) * v + b[:, i]
        out[:, i] = v
    return out


def decay_products(p_decay: torch.Tensor, q_decay: torch.Tensor, blocks, first: int = 0) -> list[tuple[float, float]]:
    """(P decay, Q decay) products over each global block [a, b) of rows; the decays are given
    per row from row ``first`` on. What a rank needs to fold the other ranks' ``Summary`` tails
    into its carry (``Summary.p_decay``, ``Summary.q_decay``)."""
    return [(float(torch.prod(p_decay[a - first:b - first])), float(torch.prod(q_decay[a - first:b - first])))
            for a, b in blocks]


def block_decays(coeffs: ChainCoefficients, blocks, data_std: float | None) -> list[tuple[float, float]]:
    """``decay_products`` of the whole chain's rows."""
    return decay_products(null_coordinates(coeffs, data_std).decay, 1 - coeffs.lam, blocks)


@dataclass
class Carry:
    """The chain state entering a block: P w_{lo-1} and Q u_{lo-1}, (B, C, H, W) each."""

    p: torch.Tensor
    q: torch.Tensor

    def index(self, idx: torch.Tensor) -> "Carry":
        return Carry(self.p[idx], self.q[idx])


@dataclass
class Summary:
    """What a block contributes to the carry of the blocks after it.

    carry_out = (p_decay * carry.p + p_tail, q_decay * carry.q + q_tail): the block's scans
    from a zero carry (tails) and the products of its decays.
    """

    p_tail: torch.Tensor
    q_tail: torch.Tensor
    p_decay: float
    q_decay: float

    def apply(self, carry: Carry) -> Carry:
        return Carry(self.p_decay * carry.p + self.p_tail, self.q_decay * carry.q + self.q_tail)


class ChainBlock:
    """Rows [lo, hi) of the joint map for B images, with every loop-invariant term precomputed.

    eps_fn(x, t) -> eps in the solver dtype; op has A, A_pinv, P, Q; y (B, *measurement);
    xi (B, C, H, W) the initial noise; step_noise (B, hi - lo, C, H, W) the z rows of this block
    (None when nw = 0); data_std the null-space coordinates (``schedule.null_coordinates``;
    None: DeqIR's prefix sum of eps). All tensors live on xi's device, in xi's dtype.
    """

    def __init__(self, eps_fn, op, coeffs: ChainCoefficients, y: torch.Tensor, xi: torch.Tensor,
                 lo: int, hi: int, step_noise: torch.Tensor | None = None, data_std: float | None = None):
        if not 0 <= lo < hi <= coeffs.steps:
            raise ValueError(f"bad block [{lo}, {hi}) for {coeffs.steps} rows")
        self.eps_fn, self.op, self.lo, self.hi = eps_fn, op, lo, hi
        self.total_rows = coeffs.steps
        self.xi = xi
        dev, dt = xi.device, xi.dtype
        nc = null_coordinates(coeffs, data_std)

        def rows(v):
            return v[lo:hi].to(device=dev, dtype=dt).view(1, hi - lo, 1, 1, 1)

        self.taus = coeffs.taus[lo:hi].to(dev)
        self.g = rows(coeffs.g)
        self.n_out = rows(nc.n_out)
        self.coef_p = rows(nc.coef)
        self.shift = rows(nc.shift) if bool((nc.shift != 0).any()) else None
        self.coef_q = rows(coeffs.k2 - (1 - coeffs.lam) * coeffs.k1)
        self.p_decay = nc.decay[lo:hi].clone()
        self.decay = (1 - coeffs.lam[lo:hi]).clone()
        self.row_weight = rows(1.0 / (1 - coeffs.a_next).clamp_min(ROW_WEIGHT_FLOOR))
        self.range_recurrent = coeffs.range_recurrent
        apy = op.A_pinv(y.to(device=dev, dtype=dt))
        xi_q = op.Q(xi.to(ACC))
        self.carry0 = Carry((xi.to(ACC) - xi_q) / float(nc.n_in[0]), xi_q / float(coeffs.a[0]) ** 0.5)
        # loop-invariant increments: nz P z on the null side, lam A+y + kn Q z on the range side
        self.const_q = rows(coeffs.lam) * apy.unsqueeze(1)
        self.const_p = None
        if step_noise is not None and coeffs.nw > 0:
            z = step_noise.to(device=dev, dtype=dt)
            zq = self._apply(op.Q, z)
            self.const_p = rows(nc.noise) * (z - zq)
            self.const_q = self.const_q + rows(coeffs.kn) * zq

    @property
    def rows(self) -> int:
        return self.hi - self.lo

    _ROW_TENSORS = ("g", "n_out", "coef_p", "shift", "coef_q", "row_weight", "const_q", "const_p")

    def view(self, lo: int, hi: int) -> "ChainBlock":
        """The rows [lo, hi) of this block (global indices) as a block sharing its tensors.

        The incoming carry and halo of the view are the caller's business (``carry0`` stays the
        chain's initial carry). Used by the sliding window, which re-slices every iteration."""
        if not self.lo <= lo < hi <= self.hi:
            raise ValueError(f"bad view [{lo}, {hi}) of block [{self.lo}, {self.hi})")
        a, b = lo - self.lo, hi - self.lo
        v = object.__new__(ChainBlock)
        v.__dict__.update(self.__dict__)
        v.lo, v.hi = lo, hi
        v.taus, v.p_decay, v.decay = self.taus[a:b], self.p_decay[a:b], self.decay[a:b]
        for name in self._ROW_TENSORS:
            t = getattr(self, name)
            setattr(v, name, None if t is None else t[:, a:b])
        return v

    def decay_products(self, blocks) -> list[tuple[float, float]]:
        """``decay_products`` over each global block [a, b) inside this block's rows."""
        return decay_products(self.p_decay, self.decay, blocks, self.lo)

    @staticmethod
    def _apply(fn, t: torch.Tensor) -> torch.Tensor:
        """Apply an image operator to a (B, n, C, H, W) stack."""
        return fn(t.flatten(0, 1)).view_as(t)

    @staticmethod
    def inputs(x: torch.Tensor, halo: torch.Tensor) -> torch.Tensor:
        """The denoiser inputs h_{i-1} of the block's rows: [halo, x rows lo..hi-2], (b, n, C, H, W)."""
        return torch.cat([halo.unsqueeze(1), x[:, :-1]], dim=1)

    def denoise(self, inputs: torch.Tensor) -> torch.Tensor:
        """eps_i of the block's rows from their inputs, one batched call, (b, n, C, H, W)."""
        b = inputs.shape[0]
        return self.eps_fn(inputs.flatten(0, 1), self.taus.repeat(b)).view_as(inputs)

    def increments(self, eps: torch.Tensor, inputs: torch.Tensor,
                   idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b_P, b_Q) of the block's rows for the images ``idx``: e P d + nz P z, and the range terms."""
        eps_q = self._apply(self.op.Q, eps)
        d = eps if self.shift is None else eps - self.shift * inputs
        d_q = eps_q if self.shift is None else eps_q - self.shift * self._apply(self.op.Q, inputs)
        bp = self.coef_p * (d - d_q)
        if self.const_p is not None:
            bp = bp + self.const_p[idx]
        bq = self.coef_q * eps_q + self.const_q[idx]
        return bp, bq

    def summary(self, bp: torch.Tensor, bq: torch.Tensor) -> Summary:
        bp, bq = bp.to(ACC), bq.to(ACC)
        q_tail = linear_scan(self.decay, bq, None)[:, -1] if self.range_recurrent else torch.zeros_like(bq[:, -1])
        return Summary(linear_scan(self.p_decay, bp, None)[:, -1], q_tail,
                       float(torch.prod(self.p_decay)), float(torch.prod(self.decay)))

    def scans(self, bp: torch.Tensor, bq: torch.Tensor, carry: Carry) -> Carry:
        """(P w_i, Q u_i) of the block's rows given the incoming carry, (b, n, C, H, W) float64.

        The scans accumulate in float64: with data_std=None, w sums terms of size 1/sqrt(a_1)
        (about 100) that cancel to O(1), so float32 accumulation would leave errors near 1e-5
        that depend on how the rows are split. Row j of the result is the carry into row j + 1.
        """
        pw = linear_scan(self.p_decay, bp.to(ACC), carry.p)
        qu = linear_scan(self.decay, bq.to(ACC), carry.q if self.range_recurrent else None)
        return Carry(pw, qu)

    def combine(self, state: Carry, dtype: torch.dtype) -> torch.Tensor:
        """h_i = n'_i P w_i + g_i Q u_i from the scanned state."""
        return (self.n_out.to(ACC) * state.p + self.g.to(ACC) * state.q).to(dtype)

    def outputs(self, bp: torch.Tensor, bq: torch.Tensor, carry: Carry) -> torch.Tensor:
        """h'_i = n'_i P w_i + g_i Q u_i for the block's rows, given the incoming carry."""
        return self.combine(self.scans(bp, bq, carry), bp.dtype)

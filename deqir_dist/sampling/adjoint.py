"""The adjoint of the chain map on a block of rows: reverse scans, carries and the linearisation."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from deqir_dist.sampling.chain import ChainBlock, linear_scan
from deqir_dist.sampling.schedule import ChainCoefficients

# ---------------------------------------------------------------------------- adjoint pieces

def reverse_scan(decay_next: torch.Tensor, w: torch.Tensor, init: torch.Tensor | None) -> torch.Tensor:
    """mu_i = w_i + decay_next_i mu_{i+1} along dim 1 of w (B, n, ...), mu_n = init or 0.

    The forward ``linear_scan`` run on the reversed rows (``decay_next`` is a host (n,) tensor).
    """
    return torch.flip(linear_scan(torch.flip(decay_next, [0]), torch.flip(w, [1]), init), [1])


@dataclass
class ReverseCarry:
    """The adjoint entering a block from the rows after it: mu^P and mu^Q of row hi, (B, C, H, W)."""

    p: torch.Tensor
    q: torch.Tensor


@dataclass
class ReverseSummary:
    """What a block contributes to the reverse carry of the blocks BEFORE it.

    carry_out (mu of row lo) = (carry.p + p_total, q_head + q_decay * carry.q).
    """

    p_total: torch.Tensor
    q_head: torch.Tensor
    q_decay: float

    def apply(self, carry: ReverseCarry) -> ReverseCarry:
        return ReverseCarry(carry.p + self.p_total, self.q_head + self.q_decay * carry.q)


class AdjointBlock:
    """The adjoint of the joint map for rows [lo, hi): everything except the denoiser VJP.

    Sharding (mirror image of the forward block, docs/design.md section 4): rank r owns rows [lo, hi)
    and the adjoint rows lam_lo..lam_{hi-1}. Per adjoint evaluation:
      1. reverse carry: ``summary(lam)`` of every block, an exclusive REVERSE scan over ranks
         (rank r gets the sum over ranks > r; ``ReverseSummary.apply``), the mirror of the forward
         prefix scan;
      2. ``scan(lam, carry)`` then ``eps_adjoint``: local, per row;
      3. one batched denoiser VJP on the local rows (inputs h_{lo-1}..h_{hi-2}, the same input
         rows as the forward denoise): its first row v_{lo-1} belongs to the previous rank's last
         row, a reverse halo sent to rank r-1 (rank 0 keeps it: it is the xi denoiser path);
      4. rank 0 adds ``xi_linear`` to get dL/dxi; the stopping test all_reduces a few scalars.
    """

    def __init__(self, op, coeffs: ChainCoefficients, lo: int, hi: int, dtype=torch.float64, device=None):
        if not 0 <= lo < hi <= coeffs.steps:
            raise ValueError(f"bad block [{lo}, {hi}) for {coeffs.steps} rows")
        self.op, self.lo, self.hi = op, lo, hi
        n = hi - lo

        def rows(v):
            return v[lo:hi].to(device=device, dtype=dtype).view(1, n, 1, 1, 1)

        self.g = rows(coeffs.g)
        self.coef_p = rows(coeffs.k2 - coeffs.k1)
        self.coef_q = rows(coeffs.k2 - (1 - coeffs.lam) * coeffs.k1)
        decay = (1 - coeffs.lam).clone()
        self.range_recurrent = coeffs.range_recurrent
        # decay_next_i = d_{i+1}; the row after the last one of the chain does not exist
        self.decay_next = torch.cat([decay, torch.zeros(1, dtype=decay.dtype)])[lo + 1:hi + 1]
        self.first_decay = float(decay[0])
        # host copies for the row-by-row sweep (no device synchronisation per row)
        self.host = {"g": coeffs.g[lo:hi].tolist(), "coef_p": (coeffs.k2 - coeffs.k1)[lo:hi].tolist(),
                     "coef_q": (coeffs.k2 - (1 - coeffs.lam) * coeffs.k1)[lo:hi].tolist(),
                     "decay_next": self.decay_next.tolist()}
        self.xi_scale = 1.0 / float(coeffs.a[0]) ** 0.5

    def summary(self, lam: torch.Tensor) -> ReverseSummary:
        w = self.g * lam
        if self.range_recurrent:
            head = reverse_scan(self.decay_next, w, None)[:, 0]
            q_decay = float(torch.prod(self.decay_next))     # mu^Q_lo = head + prod(d_{lo+1..hi}) mu^Q_hi
        else:
            head, q_decay = w[:, 0], 0.0
        return ReverseSummary(w.sum(1), head, q_decay)

    def scan(self, lam: torch.Tensor, carry: ReverseCarry | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu^P, mu^Q) of the block's rows from lam (B, n, C, H, W) and the carry of row hi."""
        w = self.g * lam
        mu_p = torch.flip(torch.cumsum(torch.flip(w, [1]), 1), [1])
        if carry is not None:
            mu_p = mu_p + carry.p.unsqueeze(1)
        if self.range_recurrent:
            mu_q = reverse_scan(self.decay_next, w, None if carry is None else carry.q)
        else:
            mu_q = w
        return mu_p, mu_q

    def eps_adjoint(self, mu_p: torch.Tensor, mu_q: torch.Tensor) -> torch.Tensor:
        """a_i = coef_p P mu^P_i + coef_q Q mu^Q_i, with one Q application per row."""
        cp = self.coef_p * mu_p
        return cp + ChainBlock._apply(self.op.Q, self.coef_q * mu_q - cp)

    def xi_linear(self, mu_p: torch.Tensor, mu_q: torch.Tensor) -> torch.Tensor:
        """The linear path xi -> (P u_0, Q u_0) of the first block (lo == 0)."""
        if self.lo != 0:
            raise ValueError("xi_linear belongs to the block of row 1")
        m0 = mu_p[:, 0]
        if self.range_recurrent and self.first_decay != 0:
            out = m0 + self.op.Q(self.first_decay * mu_q[:, 0] - m0)
        else:
            out = m0 - self.op.Q(m0)
        return self.xi_scale * out


def _eps_rows(eps_fn, inp: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """eps for denoiser input rows inp (B, n, C, H, W) at times taus (n,)."""
    b, n = inp.shape[:2]
    return eps_fn(inp.flatten(0, 1), taus.repeat(b)).view(inp.shape)


class _Linearization:
    """The denoiser at the fixed point, ready for vector-Jacobian products.

    inputs: rows [xi, h*_1..h*_{N-1}] (B, N, C, H, W). With ``chunk`` None the graph of one batched
    call is built once and reused (retain_graph): memory = one batched forward's saved tensors.
    With ``chunk`` = c the rows are recomputed c at a time in every VJP (memory = c rows, cost +1
    forward per VJP). ``eps`` is the detached eps at the inputs (needed for F(h*)).
    """

    def __init__(self, eps_fn, inputs: torch.Tensor, taus: torch.Tensor, chunk: int | None):
        self.eps_fn, self.taus, self.chunk = eps_fn, taus, chunk
        self.inputs = inputs.detach()
        self.calls = 0
        if chunk is None:
            self._inp = self.inputs.clone().requires_grad_(True)
            with torch.enable_grad():
                self._out = _eps_rows(eps_fn, self._inp, taus)
            self.eps = self._out.detach()
        else:
            with torch.no_grad():
                self.eps = torch.cat([_eps_rows(eps_fn, self.inputs[:, a:a + chunk], taus[a:a + chunk])
                                      for a in range(0, taus.numel(), chunk)], 1)

    def vjp(self, a: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """v = (d eps / d inputs)^T a, (B, n, C, H, W); only the rows [r0, r1) when given."""
        self.calls += 1
        n = self.taus.numel()
        r0, r1 = (0, n) if rows is None else rows
        if self.chunk is None:
            if (r0, r1) != (0, n):
                a = torch.cat([torch.zeros_like(self._out[:, :r0]), a,
                               torch.zeros_like(self._out[:, r1:])], 1)
            v, = torch.autograd.grad(self._out, self._inp, grad_outputs=a, retain_graph=True)
            return v[:, r0:r1]
        out = []
        for s in range(r0, r1, self.chunk):
            e = min(s + self.chunk, r1)
            with torch.enable_grad():
                inp = self.inputs[:, s:e].clone().requires_grad_(True)
                eps = _eps_rows(self.eps_fn, inp, self.taus[s:e])
                v, = torch.autograd.grad(eps, inp, grad_outputs=a[:, s - r0:e - r0])
            out.append(v)
        return torch.cat(out, 1)

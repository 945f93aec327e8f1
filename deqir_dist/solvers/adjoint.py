"""Solving the adjoint (reverse) fixed point on a block of rows: serial sweep, picard or anderson.

One pipeline for any number of ranks P: the block holds rows [lo, hi) of the N rows, and the
``comm`` (``parallel.comm.Comm``) runs the reverse collectives, identities on ``LocalComm``.
"""
from __future__ import annotations

import torch

from deqir_dist.sampling.adjoint import AdjointBlock, _Linearization
from deqir_dist.solvers.anderson import AndersonHistory
from deqir_dist.solvers.options import ADJOINT_M, ADJOINT_RIDGE, DEFAULT_ADJOINT_TOL

__all__ = ["DEFAULT_ADJOINT_TOL", "reverse_decays", "solve_adjoint"]


def reverse_decays(coeffs, blocks, range_recurrent: bool) -> list[float]:
    """Per block [a, c), the range-space decay product d_{a+1}..d_c its reverse carry crosses
    (``ReverseSummary.q_decay``; 0 without range-space memory)."""
    dn = torch.cat([1 - coeffs.lam, torch.zeros(1, dtype=coeffs.lam.dtype)])
    return [float(torch.prod(dn[a + 1:c + 1])) if range_recurrent else 0.0 for a, c in blocks]


def solve_adjoint(adj: AdjointBlock, lin: _Linearization, dl: torch.Tensor, comm, solver: str, tol: float,
                  max_iter: int, steps: int, decays: list[float] | None = None, m: int = ADJOINT_M,
                  ridge: float = ADJOINT_RIDGE):
    """Solve lam = dl + J_h^T lam on this rank's rows (dl nonzero only in row N, on the last rank);
    returns (grad_xi on every rank, evaluations, trace).

    Stopping rule (documented): after each evaluation Phi(lam_k) = dl + J_h^T lam_k, stop when the
    relative residual |Phi(lam_k) - lam_k| / |Phi(lam_k)| (summed over ranks) <= tol for every
    image, or when lam_k is exact by causality (its rows N-k..N are exact after k evaluations: all
    of them at k = N-1). The gradient returned is J_xi^T lam_k of the last evaluation's input lam_k
    (computed in the same VJP, on the first rank). ``serial`` in one process: back-substitution,
    one row at a time (``_adjoint_serial``); sharded it runs as ``picard``. ``anderson``: one set
    of mixing weights per image for the whole chain (``anderson.AndersonHistory``: Gram summed
    over rows, ridge relative to the Gram diagonal, no row weights), and rows already exact take
    the Picard value. ``decays``: ``reverse_decays`` of the ranks' blocks (P > 1).

    Per evaluation: the reverse carry from the blocks after this one (``comm.reverse_carry``),
    the local scans and ``eps_adjoint``, one batched denoiser VJP of the local linearisation,
    whose first row goes to the previous block (``comm.halo_back``): (J_h^T lam)_j = v_j.
    """
    if solver == "serial" and comm.size == 1:
        grad, k = _adjoint_serial(adj, lin, dl[:, -1])
        return grad, k, []
    b = dl.shape[0]
    x = dl.clone()
    zero_row = torch.zeros_like(dl[:, 0])
    hist = AndersonHistory(m, x, b) if solver == "anderson" else None
    trace: list[float] = []
    k = 0
    while True:
        rcarry = None if comm.size == 1 else comm.reverse_carry(adj.summary(x), decays, adj.range_recurrent)
        mu_p, mu_q = adj.scan(x, rcarry)
        v = lin.vjp(adj.eps_adjoint(mu_p, mu_q))
        from_next = comm.halo_back(v[:, 0].contiguous(), zero_row)
        f = dl + torch.cat([v[:, 1:], from_next.unsqueeze(1)], 1)
        r = f - x
        # columns: |r|^2, |f|^2 (per image, summed over ranks), then anderson's Gram row
        cols = [r.flatten(1).double().pow(2).sum(1, keepdim=True), f.flatten(1).double().pow(2).sum(1, keepdim=True)]
        if hist is not None:
            hist.push(k, x, r)
            cols.append(hist.dots(r))
        sq = comm.all_sum(torch.cat(cols, 1))
        rel = sq[:, 0].sqrt() / sq[:, 1].sqrt().clamp_min(1e-300)
        trace.append(float(rel.max()))
        exact_rows = min(k + 2, steps)                   # rows of f that are exact (the last ones)
        k += 1
        if k >= max_iter or k >= steps or bool((rel <= tol).all()):
            break
        if hist is None:
            x = f
            continue
        hist.add_gram_row(sq[:, 2:].cpu())
        x = hist.mix(hist.weights(ridge), 1.0)
        first_exact = max(steps - exact_rows - adj.lo, 0)
        x[:, first_exact:] = f[:, first_exact:]
    grad = v[:, 0] + adj.xi_linear(mu_p, mu_q) if comm.is_first else torch.zeros_like(zero_row)
    return comm.from_first(grad.contiguous()), k, trace


def _adjoint_serial(adj: AdjointBlock, lin: _Linearization, dl_last: torch.Tensor):
    """Exact reverse sweep, one row at a time: N single-row VJPs (= backprop through the serial chain)."""
    n = lin.taus.numel()
    lam_row = dl_last
    mu_p = torch.zeros_like(dl_last)
    mu_q = torch.zeros_like(dl_last)
    g, cpf, cqf, dn = (adj.host[k] for k in ("g", "coef_p", "coef_q", "decay_next"))
    for i in range(n - 1, -1, -1):
        w = g[i] * lam_row
        mu_p = mu_p + w
        mu_q = w + dn[i] * mu_q if adj.range_recurrent else w
        cp = cpf[i] * mu_p
        a = cp + adj.op.Q(cqf[i] * mu_q - cp)
        lam_row = lin.vjp(a.unsqueeze(1), rows=(i, i + 1))[:, 0]       # adjoint of h_{i} (row i-1 input)
    grad = lam_row + adj.xi_linear(mu_p.unsqueeze(1), mu_q.unsqueeze(1))
    return grad, n

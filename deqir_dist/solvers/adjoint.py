"""Solving the adjoint (reverse) fixed point: serial sweep, picard or anderson."""
from __future__ import annotations

import torch

from deqir_dist.sampling.adjoint import (
    AdjointBlock,
    _adjoint_eval,
    _Linearization,
    _norms,
)

DEFAULT_ADJOINT_TOL = 0.0       # relative adjoint residual; 0: run to the exact end (N evaluations)


def _solve_adjoint(adj: AdjointBlock, lin: _Linearization, dl: torch.Tensor, solver: str, tol: float,
                   max_iter: int, m: int = 5, ridge: float = 1e-8):
    """Solve lam = dl + J_h^T lam (dl nonzero only in row N); returns (grad_xi, evaluations, trace).

    Stopping rule (documented): after each evaluation Phi(lam_k) = dl + J_h^T lam_k, stop when the
    relative residual |Phi(lam_k) - lam_k| / |Phi(lam_k)| <= tol for every image, or when lam_k is
    exact by causality (its rows N-k..N are exact after k evaluations: all of them at k = N-1).
    The gradient returned is J_xi^T lam_k of the last evaluation's input lam_k (computed in the
    same VJP). ``anderson``: one set of mixing weights per image for the whole chain (Gram summed
    over rows, ridge relative to the Gram diagonal), and rows already exact take the Picard value.
    """
    b, n = dl.shape[:2]
    if solver == "serial":
        return _adjoint_serial(adj, lin, dl[:, -1]) + ([],)
    x = dl.clone()
    trace: list[float] = []
    hist_x, hist_r = [], []
    k = 0
    while True:
        jt, g = _adjoint_eval(adj, lin, x)
        f = dl + jt
        r = f - x
        rel = _norms(r) / _norms(f).clamp_min(1e-300)
        trace.append(float(rel.max()))
        exact_rows = min(k + 2, n)                       # rows of f that are exact
        k += 1
        if k >= max_iter or k >= n or bool((rel <= tol).all()):
            return g, k, trace
        if solver == "picard":
            x = f
            continue
        hist_x.append(x)
        hist_r.append(r)
        if len(hist_x) > m:
            hist_x.pop(0)
            hist_r.pop(0)
        R = torch.stack([h.flatten(1) for h in hist_r], 1).double()          # (b, j, D)
        gram = R @ R.transpose(1, 2)
        j = gram.shape[1]
        scale = torch.diagonal(gram, dim1=1, dim2=2).mean(1).clamp_min(1e-300)
        eye = torch.eye(j, dtype=gram.dtype)
        alpha = torch.linalg.solve(gram + ridge * scale.view(-1, 1, 1) * eye,
                                   torch.ones(b, j, 1, dtype=gram.dtype)).squeeze(2)
        alpha = (alpha / alpha.sum(1, keepdim=True)).to(x.dtype)
        x = sum(alpha[:, i].view(b, 1, 1, 1, 1) * (hist_x[i] + hist_r[i]) for i in range(j))
        x[:, n - exact_rows:] = f[:, n - exact_rows:]


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

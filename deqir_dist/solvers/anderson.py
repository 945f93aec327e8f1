"""Anderson mixing weights (constrained least squares over a residual history)."""
from __future__ import annotations

import torch


def _anderson_weights(gram: torch.Tensor, valid: torch.Tensor, ridge: float, newest: int) -> torch.Tensor:
    """Constrained least-squares mixing weights (b, m) from Gram matrices (b, m, m), float64.

    An image whose system is numerically singular takes weight 1 on slot ``newest`` (Picard)."""
    v = valid.to(gram.dtype)
    g = gram * v.unsqueeze(1) * v.unsqueeze(2)
    diag = torch.diagonal(g, dim1=1, dim2=2)
    scale = (diag.sum(1) / v.sum(1).clamp_min(1)).clamp_min(1e-300)
    eye = torch.eye(g.shape[1], dtype=g.dtype)
    # invalid slots: identity rows, zero right-hand side -> weight exactly 0
    system = g + (ridge * scale).view(-1, 1, 1) * eye * v.unsqueeze(2) + eye * (1 - v).unsqueeze(2)
    w, info = torch.linalg.solve_ex(system, v.unsqueeze(2))
    w = w.squeeze(2)
    w = w / w.sum(1, keepdim=True)
    bad = (info != 0) | ~torch.isfinite(w).all(1)     # numerically singular: a plain Picard step
    w[bad] = torch.nn.functional.one_hot(torch.tensor(newest), g.shape[1]).to(w.dtype)
    return w

"""Anderson mixing: the weights (constrained least squares over a residual history) and the history."""
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


class AndersonHistory:
    """The last ``m`` iterates and residuals of every image (a ring buffer), their Gram matrices
    and the mixing x = sum_j w_j (x_j + beta r_j): the one Anderson of the forward solver
    (``chain.AndersonSweep``) and the adjoint (``adjoint.solve_adjoint``).

    Per iteration: ``push`` the iterate and its residual, ``dots`` of the history with the
    (weighted) newest residual, summed over ranks by the caller, ``add_gram_row``, then
    ``weights`` and ``mix``. Gram sums are per row in the state's dtype, summed over rows in
    float64, so they do not depend on how the rows are split."""

    def __init__(self, m: int, like: torch.Tensor, nimg: int):
        self.m = m
        self.xh = torch.zeros((m, *like.shape), dtype=like.dtype, device=like.device)
        self.rh = torch.zeros_like(self.xh)
        self.gram = torch.zeros((nimg, m, m), dtype=torch.float64)
        self.valid = torch.zeros((nimg, m), dtype=torch.bool)
        self.slot, self.filled = 0, 0

    def push(self, k: int, x: torch.Tensor, r: torch.Tensor) -> int:
        """Store iterate k and its residual (slot k mod m); returns the entries held."""
        self.slot, self.filled = k % self.m, min(k + 1, self.m)
        self.xh[self.slot], self.rh[self.slot] = x, r
        return self.filled

    def dots(self, r: torch.Tensor) -> torch.Tensor:
        """(b, filled) float64: <R_j, r> of every held residual with ``r`` (b, n, ...)."""
        return torch.einsum("jbnd,bnd->bjn", self.rh[:self.filled].flatten(3), r.flatten(2)).double().sum(2)

    def add_gram_row(self, g_row: torch.Tensor) -> None:
        """The newest entry's Gram row (b, filled), from ``dots`` of its residual."""
        s, nh = self.slot, self.filled
        self.gram[:, s, :nh] = g_row
        self.gram[:, :nh, s] = g_row
        self.valid[:, s] = True

    def restart(self, mask: torch.Tensor) -> None:
        """Forget every entry but the newest for the images in ``mask``."""
        self.valid[mask] = False
        self.valid[mask, self.slot] = True

    def weights(self, ridge: float, picard: torch.Tensor | None = None) -> torch.Tensor:
        """Mixing weights (b, filled) in the state's dtype; images in ``picard`` take the newest entry."""
        s, nh = self.slot, self.filled
        w = _anderson_weights(self.gram[:, :nh, :nh], self.valid[:, :nh], ridge, s)
        if picard is not None:
            w[picard] = 0.0
            w[picard, s] = 1.0
        return w.to(device=self.xh.device, dtype=self.xh.dtype)

    def mix(self, w: torch.Tensor, beta: float) -> torch.Tensor:
        nh = self.filled
        return (torch.einsum("bj,jb...->b...", w, self.xh[:nh])
                + beta * torch.einsum("bj,jb...->b...", w, self.rh[:nh]))

    def keep(self, keep: torch.Tensor) -> None:
        """Only the images at batch positions ``keep`` (a CPU index) stay."""
        kd = keep.to(self.xh.device)
        self.xh, self.rh = self.xh[:, kd], self.rh[:, kd]
        self.gram, self.valid = self.gram[keep], self.valid[keep]

"""ParaTAA: triangular Anderson acceleration of the joint chain map (Tang et al., ICML 2024).

The chain's fixed-point system is triangular: row i of F(x) depends on rows < i only (here row 1
is the noisiest). Plain Anderson mixes all rows with ONE set of weights; triangular Anderson
gives every row its own weights, fitted only on the rows it depends on. With the residual
R = F(x) - x and, over the last ``m`` iterations, the differences dX_j = x_{j+1} - x_j and
dR_j = R_{j+1} - R_j (at most m - 1 of them), row i takes

    Gamma_i = argmin_G  sum_{s in [i0, i]} |R_s - dR_s G|^2 + lam_i |G|^2
    x_i <- x_i + beta R_i - (dX_i + beta dR_i) Gamma_i

where the sum runs over the noisier rows s <= i (a prefix in this project's row order), from
the noisiest row that has not converged, i0, on: ParaTAA's window starts there, the rows
before it are settled. A row is converged when rms(R_s) / sigma_s <= tol (the ``rows`` rule's
units; tol = ``stop_tol`` under the ``rows`` rule, else that rule's default). lam_i = ``ridge``
x mean diagonal of the row's Gram sum (relative: the scale of the residuals drops out).

Plain steps (x_i <- F(x)_i): row i0 itself and every row before it, every row while fewer than
two history entries exist (the first iteration), rows whose inputs are already exact (rows
1..k after k evaluations, by causality, so the solve is exact after N evaluations like
Picard), and a row whose small system is numerically singular. ``m`` is the history length
in entries (default ``options.TAA_HISTORY`` = 2, ParaTAA's: one difference); the residual here is the full joint map's (ParaTAA's
"order" = N: every earlier row's eps enters through the scans).

Sharded, the prefix Gram sums need the earlier ranks' block totals: one all_sum of a
(images, ranks, (m-1)^2 + (m-1)) tensor per iteration, besides the stopping statistics (which
also carry each rank's first unconverged row, so that every rank knows i0).
"""
from __future__ import annotations

import torch

from deqir_dist.solvers.chain import BlockSweep
from deqir_dist.solvers.driver import SolveOutput, run
from deqir_dist.solvers.options import DEFAULT_STOP_TOL, SolverOptions


def _gamma(gram: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """Per (image, row): solve (G + lam I) Gamma = d, lam = ridge * mean diag G; float64.

    gram (b, n, J, J), rhs (b, n, J) -> (b, n, J); NaN rows where the system is singular."""
    j = gram.shape[-1]
    scale = torch.diagonal(gram, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
    eye = torch.eye(j, dtype=gram.dtype, device=gram.device)
    sol, info = torch.linalg.solve_ex(gram + (ridge * scale)[..., None, None] * eye, rhs.unsqueeze(-1))
    sol = sol.squeeze(-1)
    bad = (info != 0) | ~torch.isfinite(sol).all(-1) | (scale <= 1e-300)
    return torch.where(bad.unsqueeze(-1), torch.full_like(sol, float("nan")), sol)


class TriangularSweep(BlockSweep):
    """ParaTAA as an update rule of ``driver.run`` over every row of the block (``chain.BlockSweep``).

    Extra statistics columns: per rank, its first unconverged row (global index), so that every
    rank knows i0."""

    def __init__(self, block, comm, opts: SolverOptions, x0: torch.Tensor | None):
        super().__init__(block, comm, opts, x0, extra=comm.size)
        self.m = max(int(opts.m), 1)
        self.hist_x: list[torch.Tensor] = []
        self.hist_r: list[torch.Tensor] = []
        self.row_tol = opts.stop_tol if opts.stop == "rows" else DEFAULT_STOP_TOL["rows"]
        xi = block.xi
        self.glob = torch.arange(block.lo, block.hi, device=xi.device).view(1, -1)   # global index of each local row

    def local_stats(self, k: int, stats: torch.Tensor) -> None:
        bsz, glob = self.x.shape[0], self.glob
        unconverged = self.r2 * self.inv_var / self.numel_row > self.row_tol ** 2     # |r_i|^2 / sigma_i^2
        first = torch.where(unconverged, glob.expand(bsz, -1),
                            torch.full_like(glob, self.block.total_rows).expand(bsz, -1))
        stats[:, self.EXTRA_AT + self.comm.rank] = first.min(1).values.double()

    def step(self, k: int, q: torch.Tensor) -> torch.Tensor:
        opts, comm, glob, x, r = self.opts, self.comm, self.glob, self.x, self.r
        size, rank, bsz = comm.size, comm.rank, x.shape[0]
        i0 = self.stats[:, self.EXTRA_AT:self.EXTRA_AT + size].min(1).values.long().view(-1, 1).to(x.device)
        hist_x, hist_r = self.hist_x, self.hist_r
        hist_x.append(x)
        hist_r.append(r)
        if len(hist_x) > self.m:
            hist_x.pop(0)
            hist_r.pop(0)
        x = self.f.clone()                                         # the plain step, where nothing else applies
        nd = len(hist_x) - 1
        if nd >= 1:
            dx = torch.stack([hist_x[j + 1] - hist_x[j] for j in range(nd)], 2)      # (bsz, n, J, ...)
            dr = torch.stack([hist_r[j + 1] - hist_r[j] for j in range(nd)], 2)
            drf, rf = dr.flatten(3).double(), r.flatten(2).double()
            in_sum = (glob >= i0).to(torch.float64)                                  # rows s in [i0, ...)
            g_rows = torch.einsum("bnjd,bnld->bnjl", drf, drf) * in_sum[..., None, None]
            d_rows = torch.einsum("bnjd,bnd->bnj", drf, rf) * in_sum[..., None]
            g_cum, d_cum = g_rows.cumsum(1), d_rows.cumsum(1)
            if size > 1:                     # add the earlier ranks' totals
                tot = torch.zeros((bsz, size, nd * nd + nd), dtype=torch.float64, device=x.device)
                tot[:, rank] = torch.cat([g_cum[:, -1].flatten(1), d_cum[:, -1]], 1)
                tot = comm.all_sum(tot)[:, :rank].sum(1)
                g_cum = g_cum + tot[:, :nd * nd].view(bsz, 1, nd, nd)
                d_cum = d_cum + tot[:, nd * nd:].view(bsz, 1, nd)
            gam = _gamma(g_cum, d_cum, opts.ridge)                                   # (bsz, n, J)
            use = (glob > i0) & (glob >= k + 1) & torch.isfinite(gam).all(-1)
            gam = torch.nan_to_num(gam).to(x.dtype)
            mixed = torch.einsum("bnj,bnj...->bn...", gam, dx + opts.beta * dr)
            taa = hist_x[-1] + opts.beta * r - mixed
            sel = use.view(*use.shape, *([1] * (x.dim() - 2)))
            x = torch.where(sel, taa, x)
        return x

    def drop(self, keep: torch.Tensor) -> None:
        kd = keep.to(self.x.device)
        self.hist_x = [h[kd] for h in self.hist_x]
        self.hist_r = [h[kd] for h in self.hist_r]

    def postfix(self, q: torch.Tensor) -> str:
        finite = q[torch.isfinite(q)]
        return f"{self.opts.stop}={float(finite.max()):.3g}" if finite.numel() else ""


def solve_triangular(block, comm, opts: SolverOptions, x0: torch.Tensor | None = None, progress: bool = False,
                     callback=None, entering: torch.Tensor | None = None) -> SolveOutput:
    """ParaTAA over the block's rows (every row, every sweep); history ``opts.m`` entries.

    Same contract as ``solvers.chain.solve_chain``: per-image stopping (``opts.stop``), every
    rank returns the final rows; ``entering`` does not apply (nothing slides)."""
    return run(TriangularSweep(block, comm, opts, x0), comm, opts.max_iter, block.xi, progress, callback)

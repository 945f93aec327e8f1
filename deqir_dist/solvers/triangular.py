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
in entries (ParaTAA: 2, one difference); the residual here is the full joint map's (ParaTAA's
"order" = N: every earlier row's eps enters through the scans).

Sharded, the prefix Gram sums need the earlier ranks' block totals: one all_sum of a
(images, ranks, (m-1)^2 + (m-1)) tensor per iteration, besides the stopping statistics (which
also carry each rank's first unconverged row, so that every rank knows i0).
"""
from __future__ import annotations

import time

import torch

from deqir_dist.solvers.driver import (
    IterationTiming,
    SolveOutput,
    _is_done,
    _progress,
    record_evaluation,
    stop_quantity,
)
from deqir_dist.solvers.options import DEFAULT_STOP_TOL, SolverOptions

TAA_HISTORY = 2         # ParaTAA's history: two entries, one difference


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


def solve_triangular(block, comm, opts: SolverOptions, x0: torch.Tensor | None = None, progress: bool = False,
                     callback=None, entering: torch.Tensor | None = None) -> SolveOutput:
    """ParaTAA over the block's rows (every row, every sweep); history ``opts.m`` entries.

    Same contract as ``solvers.chain.solve_chain``: per-image stopping (``opts.stop``), every
    rank returns the final rows; ``entering`` does not apply (nothing slides)."""
    xi = block.xi
    nimg, n = xi.shape[0], block.rows
    numel_row = xi[0].numel()
    x = x0.clone() if x0 is not None else xi.unsqueeze(1).expand(nimg, n, *xi.shape[1:]).clone()
    ids = list(range(nimg))
    idx = torch.arange(nimg, device=xi.device)
    final = torch.zeros_like(xi)
    iterations = [0] * nimg
    trace: list[list[float]] = []
    timings: list[IterationTiming] = []
    m = max(int(opts.m), 1)
    hist_x: list[torch.Tensor] = []
    hist_r: list[torch.Tensor] = []
    row_tol = opts.stop_tol if opts.stop == "rows" else DEFAULT_STOP_TOL["rows"]
    size, rank = comm.size, comm.rank
    first_at = 3                                   # per rank: its first unconverged row (global index)
    rows_at = first_at + size                      # per rank: max_i |r_i|^2 / sigma_i^2 (the rows rule)
    width = rows_at + (size if opts.stop == "rows" else 0)
    inv_var = block.row_weight.view(1, -1).double()
    glob = torch.arange(block.lo, block.hi, device=xi.device).view(1, -1)          # global row index of each local row
    bar = _progress(progress and comm.is_first, opts.max_iter)
    for k in range(opts.max_iter):
        t_start = time.perf_counter()
        comm_s0, bytes0 = comm.stats.seconds, comm.stats.bytes_sent
        halo = comm.halo(x[:, -1], xi[idx])
        t0 = time.perf_counter()
        inputs = block.inputs(x, halo)
        eps = block.denoise(inputs)
        t_den = time.perf_counter() - t0
        bp, bq = block.increments(eps, inputs, idx)
        carry0 = block.carry0.index(idx)
        carry = carry0 if size == 1 else comm.carry(carry0, block.summary(bp, bq), block.range_recurrent)
        f = block.outputs(bp, bq, carry)
        r = f - x
        bsz = len(ids)
        r2 = r.flatten(2).pow(2).sum(2).double()                   # (bsz, n)
        rel = r2 * inv_var                                         # |r_i|^2 / sigma_i^2
        unconverged = rel / numel_row > row_tol ** 2
        first = torch.where(unconverged, glob.expand(bsz, -1), torch.full_like(glob, block.total_rows).expand(bsz, -1))
        stats = torch.zeros((bsz, width), dtype=torch.float64, device=x.device)
        stats[:, 0] = r2.sum(1)
        stats[:, 1] = f.flatten(2).pow(2).sum(2).double().sum(1)
        if comm.is_last:
            stats[:, 2] = r2[:, -1]
        stats[:, first_at + rank] = first.min(1).values.double()
        if opts.stop == "rows":
            stats[:, rows_at + rank] = rel.max(1).values
        stats = comm.all_sum(stats).cpu()
        q = stop_quantity(opts.stop, stats, numel_row, rows_at)
        done = _is_done(opts.stop, q, opts.stop_tol)
        if opts.stop != "none" and k + 1 >= block.total_rows:
            done[:] = True                       # exact: every row's inputs have been swept
        if k + 1 == opts.max_iter:
            done[:] = True
        record_evaluation(trace, iterations, ids, q)
        if callback is not None:
            callback(k, list(ids), f[:, -1], q)
        if done.any():
            d = torch.nonzero(done).flatten()
            final[idx[d.to(idx.device)]] = f[d.to(f.device), -1]
        keep = torch.nonzero(~done).flatten()
        if keep.numel() > 0:
            i0 = stats[:, first_at:first_at + size].min(1).values.long().view(-1, 1).to(x.device)   # (bsz, 1)
            hist_x.append(x)
            hist_r.append(r)
            if len(hist_x) > m:
                hist_x.pop(0)
                hist_r.pop(0)
            x = f.clone()                                          # the plain step, where nothing else applies
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
        if keep.numel() < len(ids):
            kd = keep.to(x.device)
            x = x[kd]
            idx = idx[kd]
            ids = [ids[j] for j in keep.tolist()]
            hist_x = [h[kd] for h in hist_x]
            hist_r = [h[kd] for h in hist_r]
        timings.append(IterationTiming(time.perf_counter() - t_start, t_den,
                                       comm.stats.seconds - comm_s0, comm.stats.bytes_sent - bytes0,
                                       int(done.numel()), int(done.numel()) * n))
        if bar is not None:
            finite = q[torch.isfinite(q)]
            bar.set_postfix_str(f"{opts.stop}={float(finite.max()):.3g}" if finite.numel() else "")
            bar.update(1)
        if not ids:
            break
    if bar is not None:
        bar.close()
    return SolveOutput(comm.from_last(final), iterations, trace, timings, x.shape[1])

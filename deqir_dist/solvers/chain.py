"""The sweep solver over a block of rows: picard or anderson updates, per-image stopping."""
from __future__ import annotations

import time

import torch

from deqir_dist.solvers.anderson import _anderson_weights
from deqir_dist.solvers.driver import (
    IterationTiming,
    SolveOutput,
    _is_done,
    _progress,
    record_evaluation,
    stop_quantity,
)
from deqir_dist.solvers.options import SolverOptions


def solve_chain(block, comm, opts: SolverOptions, x0: torch.Tensor | None = None,
                progress: bool = False, callback=None) -> SolveOutput:
    """Solve the block's joint fixed point for all images; every rank returns the same result.

    ``callback(k, image_ids, final_rows, q)``, if given, sees each evaluation's final rows
    (meaningful on the last rank) and the stopping quantity of the active images.
    """
    xi = block.xi
    nimg, n = xi.shape[0], block.rows
    numel_row = xi[0].numel()
    x = x0.clone() if x0 is not None else xi.unsqueeze(1).expand(nimg, n, *xi.shape[1:]).clone()
    ids = list(range(nimg))                      # original image index of each active image
    idx = torch.arange(nimg, device=xi.device)
    final = torch.zeros_like(xi)
    iterations = [0] * nimg
    trace: list[list[float]] = []
    timings: list[IterationTiming] = []
    anderson = opts.solver == "anderson"
    m = opts.m if anderson else 0
    if anderson:
        xh = torch.zeros((m, *x.shape), dtype=x.dtype, device=x.device)
        rh = torch.zeros_like(xh)
        gram = torch.zeros((nimg, m, m), dtype=torch.float64)
        valid = torch.zeros((nimg, m), dtype=torch.bool)
        best = torch.full((nimg,), float("inf"), dtype=torch.float64)
        q_best = torch.full((nimg,), float("inf"), dtype=torch.float64)
        q_stale = torch.zeros((nimg,), dtype=torch.long)
        picard_only = torch.zeros((nimg,), dtype=torch.bool)
    rows_at = 3 + m                              # first per-rank slot of the "rows" statistic
    width = rows_at + (comm.size if opts.stop == "rows" else 0)
    inv_var = block.row_weight.view(1, -1).double()       # 1 / sigma_i^2 of the block's rows
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
        carry = carry0 if comm.size == 1 else comm.carry(carry0, block.summary(bp, bq), block.range_recurrent)
        f = block.outputs(bp, bq, carry)
        r = f - x
        stats = torch.zeros((len(ids), width), dtype=torch.float64, device=x.device)
        # per-row sums (independent of how rows are split), then summed over rows in float64
        r2 = r.flatten(2).pow(2).sum(2).double()
        stats[:, 0] = r2.sum(1)
        stats[:, 1] = f.flatten(2).pow(2).sum(2).double().sum(1)
        if comm.is_last:
            stats[:, 2] = r2[:, -1]
        if opts.stop == "rows":
            stats[:, rows_at + comm.rank] = (r2 * inv_var).max(1).values
        if anderson:
            slot, nh = k % m, min(k + 1, m)
            xh[slot], rh[slot] = x, r
            rw = r * block.row_weight
            stats[:, 3:3 + nh] = torch.einsum("jbnd,bnd->bjn", rh[:nh].flatten(3), rw.flatten(2)).double().sum(2)
        stats = comm.all_sum(stats).cpu()        # the one host synchronisation of an iteration
        q = stop_quantity(opts.stop, stats, numel_row, rows_at)
        done = _is_done(opts.stop, q, opts.stop_tol)
        if opts.stop != "none" and k + 1 >= block.total_rows:
            done[:] = True                       # exact: every row has been swept (Anderson keeps exact rows)
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
            if anderson:
                res = stats[:, 0].sqrt()
                g_row = stats[:, 3:3 + nh]
                gram[:, slot, :nh] = g_row
                gram[:, :nh, slot] = g_row
                valid[:, slot] = True
                restart = res > opts.safeguard * best
                best = torch.minimum(best, res)
                if opts.stop == "rows":    # the stopping quantity stalls: Picard steps from here on
                    q_stale = torch.where(q < 0.9 * q_best, torch.zeros_like(q_stale), q_stale + 1)
                    q_best = torch.minimum(q_best, q)
                    picard_only |= q_stale > opts.m
                    restart |= picard_only
                valid[restart] = False
                valid[restart, slot] = True
                w = _anderson_weights(gram[:, :nh, :nh], valid[:, :nh], opts.ridge, slot)
                w[restart] = 0.0
                w[restart, slot] = 1.0
                w = w.to(device=x.device, dtype=x.dtype)
                x = torch.einsum("bj,jb...->b...", w, xh[:nh]) + opts.beta * torch.einsum("bj,jb...->b...", w, rh[:nh])
                exact = min(max(k + 1 - block.lo, 0), n)   # rows whose inputs were all exact
                if exact:
                    x[:, :exact] = f[:, :exact]
            else:
                x = f
        # drop the images that stopped
        if keep.numel() < len(ids):
            kd = keep.to(x.device)
            x = x[kd]
            idx = idx[kd]
            ids = [ids[j] for j in keep.tolist()]
            if anderson:
                xh, rh = xh[:, kd], rh[:, kd]
                gram, valid, best = gram[keep], valid[keep], best[keep]
                q_best, q_stale, picard_only = q_best[keep], q_stale[keep], picard_only[keep]
        timings.append(IterationTiming(time.perf_counter() - t_start, t_den,
                                       comm.stats.seconds - comm_s0, comm.stats.bytes_sent - bytes0,
                                       int(done.numel()), int(done.numel()) * n))
        if bar is not None:
            finite = q[torch.isfinite(q)]
            bar.set_postfix_str(f"{opts.stop}={float(finite.min() if opts.stop == 'final' else finite.max()):.3g}"
                                if finite.numel() else "")
            bar.update(1)
        if not ids:
            break
    if bar is not None:
        bar.close()
    return SolveOutput(comm.from_last(final), iterations, trace, timings, x.shape[1])

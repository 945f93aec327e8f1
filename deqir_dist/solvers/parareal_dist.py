"""The parareal solver pipelined over the ranks of a torch.distributed group (``parallel.dist.DistComm``).

Rank r owns the blocks ``block_owners(B, P)`` gives it (one block per rank when P = B, a
contiguous group when P < B). In iteration k a rank waits for U_n^k of its first active block
(point-to-point from the rank before), runs G_n, forms U_{n+1}^k = G_n(U_n^k) + F_n(U_n^{k-1}) -
G_n(U_n^{k-1}) and sends it on at once (the correction travels along the ranks), then runs the
fine solves F_n(U_n^k) of its blocks that iteration k + 1 needs, without waiting for anyone.
Iteration k's stopping decision (taken by the last rank, which holds U_B) is one all_reduce at
the start of iteration k + 2 (``STOP_LAG``), after the fine solves; a batch of images moves through together and stopped images leave it.
At the end the final states are broadcast from the last rank. Every exchange goes through
``DistComm._run``: bounded by the group's timeout, failures name the dead rank.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from deqir_dist.sampling.schedule import ChainCoefficients
from deqir_dist.solvers.parareal import (
    Parareal,
    PararealOptions,
    PararealOutput,
    block_owners,
    change_quantity,
    done,
    parareal_schedule,
    secant_correction,
    solve_parareal,
)

# iteration k's stopping decision is taken at the start of iteration k + STOP_LAG: with 1, every
# rank would wait each iteration for the last rank's U_B (a barrier that doubles the critical
# path at B = 20, ``parareal_schedule(stop_lag=1)``); with 2 the pipeline keeps running and
# images that stopped ride one speculative iteration
STOP_LAG = 2


def run_parareal(eps_fn, op, coeffs: ChainCoefficients, y, xi, opts: PararealOptions, step_noise=None, comm=None,
                 callback=None) -> PararealOutput:
    """restore's entry: one process (``comm`` None or of size 1), else the pipelined ranks.
    Fills in the critical path and denoiser calls per image (at the largest K) of the schedule the
    ranks run (``stop_lag=STOP_LAG``; in one process: as if on one rank per block)."""
    procs = 1 if comm is None else comm.size
    if procs > 1:
        out = solve_parareal_dist(eps_fn, op, coeffs, y, xi, opts, comm, step_noise, callback=callback)
    else:
        out = solve_parareal(eps_fn, op, coeffs, y, xi, opts, step_noise, callback=callback)
    sched = parareal_schedule(out.blocks, [min(opts.coarse_steps, hi - lo) for lo, hi in out.blocks],
                              max(out.iterations), procs if procs > 1 else len(out.blocks), stop_lag=STOP_LAG)
    out.critical_path, out.schedule_calls = sched["critical_path"], sched["calls"]
    return out


class _Pipe:
    """Point-to-point state messages between the owners of consecutive blocks."""

    def __init__(self, comm):
        self.comm = comm
        self.pending = []

    def send(self, t: torch.Tensor, dst: int) -> None:
        c = self.comm

        def go():
            buf = c._dev(t.clone())
            self.pending.append((dist.isend(buf, c.global_ranks[dst], c.group), buf))
            c.stats.bytes_sent += buf.numel() * buf.element_size()
        c._run("parareal send", go)

    def recv(self, like: torch.Tensor, src: int) -> torch.Tensor:
        c = self.comm

        def go():
            buf = torch.empty(like.shape, dtype=like.dtype, device=c.device)
            dist.recv(buf, c.global_ranks[src], c.group)
            return buf.to(like.device)
        return c._run("parareal receive", go)

    def flush(self) -> None:
        c = self.comm

        def go():
            for w, _ in self.pending:
                w.wait()
            self.pending.clear()
        c._run("parareal send", go)


@torch.no_grad()
def solve_parareal_dist(eps_fn, op, coeffs: ChainCoefficients, y: torch.Tensor, xi: torch.Tensor,
                        opts: PararealOptions, comm, step_noise: torch.Tensor | None = None,
                        callback=None) -> PararealOutput:
    """This rank's share of ``solve_parareal`` (same result); every rank returns the final states."""
    y = y.to(device=xi.device, dtype=xi.dtype)
    pr = Parareal(eps_fn, op, coeffs, y, opts, step_noise)
    nb, batch, rank = opts.blocks, xi.shape[0], comm.rank
    owner = block_owners(nb, comm.size)
    mine = [n for n in range(nb) if owner[n] == rank]
    last = owner[nb - 1] == rank
    pipe = _Pipe(comm)
    ids = list(range(batch))
    U, G, E, F, OUT = {}, {}, {}, {}, {}       # per owned block: input, G(input), eps(input), F(input), output
    H = {n: [] for n in mine}                  # per owned block: (input, F - G at it) (secant)
    final = torch.zeros_like(xi)
    iters, trace, qs, ends = [0] * batch, [], {}, {}

    def boundary(n: int, state: torch.Tensor):
        """Block n's new output: keep it, pass it to block n + 1."""
        OUT[n] = state
        if n + 1 < nb and owner[n + 1] != rank:
            pipe.send(state, owner[n + 1])

    def incoming(n: int) -> torch.Tensor:
        """U_n of this iteration."""
        if n == 0:
            return xi[ids]
        if owner[n - 1] == rank:
            return OUT[n - 1]
        return pipe.recv(xi[ids], owner[n - 1])

    def prune(keep):
        for d in (U, G, E, F, OUT):
            for n in list(d):
                d[n] = d[n][keep]
        for n, hist in H.items():
            H[n] = [(x[keep], c[keep]) for x, c in hist]

    kmax, k_done, decided = opts.max_iter, -1, 0
    timings = []
    for k in range(kmax + 1):
        since = pr.mark(comm)
        if k - STOP_LAG >= 1:                  # iteration k - STOP_LAG's decision, taken STOP_LAG iterations later
            decided = k - STOP_LAG
            ids, keep = _decide(comm, pipe, decided, ids, qs, ends, final, iters, trace, opts, last, kmax, nb,
                                batch)
            if keep is not None:
                prune(keep)
            if not ids:
                break
        for n in mine:                         # G pass: the correction travels along the ranks
            if n < k - 1:
                continue
            if n == k - 1:                     # U_k^k = F_{k-1}(U_{k-1}^{k-1}): exact
                boundary(n, F[n])
                continue
            u = incoming(n)
            corr = None
            if k:
                corr = F[n] - G[n]
                if opts.secant:
                    H[n].append((U[n], corr))
                    del H[n][:-(opts.secant + 1)]
                    corr = secant_correction(H[n], u)
            g, E[n] = pr.coarse(n, u, ids)
            new = g if k == 0 else g + corr
            U[n], G[n] = u, g
            boundary(n, new)
        if last:
            out = OUT[nb - 1]
            if k:
                q = change_quantity(out, ends[k - 1])
                qs[k] = torch.full_like(q, math.inf) if k == nb else q
            ends[k] = out
            if callback is not None:
                callback(k, list(ids), out, qs.get(k))
        k_done = k
        if k == kmax:
            timings.append(pr.timing(since, len(ids), comm))
            break
        todo = [n for n in mine if n >= k]     # F pass, for iteration k + 1
        if todo:
            per = len(ids)
            fv = pr.fine(todo, torch.cat([U[n] for n in todo]), torch.cat([E[n] for n in todo]), ids)
            for j, n in enumerate(todo):
                F[n] = fv[j * per:(j + 1) * per]
        timings.append(pr.timing(since, len(ids), comm))
    for j in range(decided + 1, k_done + 1):   # the decisions not taken yet; the last one stops every image
        if not ids:
            break
        ids, keep = _decide(comm, pipe, j, ids, qs, ends, final, iters, trace, opts, last, k_done, nb, batch)
        if keep is not None:
            prune(keep)
    if ids and k_done == 0 and last:           # max_iter = 0: the coarse pass is the answer
        final[ids] = ends[0]
    pipe.flush()
    final = comm.from_rank(final, owner[nb - 1], "final broadcast")
    return PararealOutput(final, iters, trace, pr.bounds, opts.coarse_steps, pr.calls, timings=timings)


def _decide(comm, pipe, k, ids, qs, ends, final, iters, trace, opts, last, kmax, nb, batch):
    """Iteration k's stopping decision from the last rank (one all_reduce); the stopped images'
    final states are kept on the last rank. Returns (remaining ids, rows to keep or None)."""
    pipe.flush()
    msg = torch.zeros(len(ids), dtype=torch.float64)
    if last:
        msg = qs[k].detach().to("cpu", torch.float64).nan_to_num(posinf=1e300)
    q = comm.all_sum(msg)
    q = torch.where(q >= 1e300, torch.full_like(q, math.inf), q)
    stop = done(opts.stop, q, opts.stop_tol) if k < min(kmax, nb) else torch.ones_like(q, dtype=torch.bool)
    row = [math.nan] * batch
    for j, i in enumerate(ids):
        row[i] = float(q[j])
        iters[i] = k
    trace.append(row)
    keep = [j for j in range(len(ids)) if not bool(stop[j])]
    if last:
        for j in range(len(ids)):
            if bool(stop[j]):
                final[ids[j]] = ends[k][j]
        for kk in list(ends):
            ends[kk] = ends[kk][keep] if kk >= k - 1 else None
        for kk in list(qs):
            qs[kk] = qs[kk][keep]
    if len(keep) == len(ids):
        return ids, None
    return [ids[j] for j in keep], torch.tensor(keep, dtype=torch.long, device=final.device)

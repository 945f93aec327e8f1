"""The two-level (parareal) solver of the DDNM chain (docs/design.md section 6, equation (6.1)).

The N rows are cut into B blocks [lo_n, hi_n). U_n is the state after block n (U_0 = xi, U_B =
h_N). The fine propagator F_n runs the block's rows with the serial sampler's step
(``sampling.serial.ddnm_step``); the coarse propagator G_n crosses the block in m jumps
(``CoarseJump``). Iteration k = 1, 2, ...:

    U_n^0 = G_n(U_{n-1}^0),    U_n^k = G_n(U_{n-1}^k) + F_n(U_{n-1}^{k-1}) - G_n(U_{n-1}^{k-1}).

After k iterations U_1..U_k are exact (they no longer change, so blocks before k need no work),
and K = B is the serial answer. G's first call, eps(U_{n-1}, tau_{lo_n}), is also F's first
call: it is computed once. Per image stopping ("final", the default: stop after iteration k
when the final state moved by less than ``stop_tol`` = 40 dB PSNR, 10 log10(4 / mse(U_B^k,
U_B^{k-1})), and return U_B^k: measured >= 51 dB from serial on the oracle and at most one
iteration past the oracle bound K40, bench/parareal.py; "none": ``max_iter`` iterations); a
stopped image leaves the batch. restore's default ``stop="rows"`` means this default here. ``parareal_schedule`` models the pipelined schedule (one worker per block, or several
blocks per worker) and gives the critical path and the total denoiser calls of the run.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field

import torch

from deqir_dist.errors import DeqirError, is_int, is_real
from deqir_dist.parallel.comm import split_rows
from deqir_dist.sampling.schedule import ChainCoefficients, null_coordinates
from deqir_dist.sampling.serial import ddnm_step
from deqir_dist.solvers.driver import IterationTiming

COARSE_KINDS = ("normalized", "unrolled", "ddim", "ab2")
STOP_RULES = ("final", "none")
DEFAULT_STOP_TOL = {"final": 40.0, "none": 0.0}


@dataclass(frozen=True)
class PararealOptions:
    blocks: int
    coarse_steps: int = 1           # m: coarse calls per block (at most the block's rows)
    coarse: str = "normalized"      # how G jumps (``CoarseJump``)
    layout: float = 1.0             # block boundaries at N (j / B)^layout: > 1 shortens the early (noisy) blocks
    stop: str = "final"
    stop_tol: float = 40.0
    max_iter: int = 0               # iterations after the coarse pass, at most B (0: B)
    data_std: float | None = 0.5    # the normalised coordinates of the null-space recurrence
    secant: int = 2                 # corrections remembered per block for the secant-corrected G (0: plain)

    @staticmethod
    def make(steps: int, blocks=None, coarse_steps=None, stop: str = "final", stop_tol=None, max_iter=None,
             coarse: str = "normalized", layout=1.0, data_std=0.5, secant=2, **unknown) -> PararealOptions:
        """Validated options (DeqirError on bad ones); blocks None: ``default_blocks``."""
        if unknown:
            raise DeqirError(f"unknown parareal option(s) {', '.join(sorted(unknown))}; valid: blocks, coarse_steps, "
                             "coarse, layout, data_std, secant")
        if blocks is None:
            blocks = default_blocks(steps)
        if not is_int(blocks) or not 1 <= blocks <= steps:
            raise DeqirError(f"blocks must be an integer in 1..{steps} (the steps), got {blocks!r}")
        blocks = int(blocks)
        m = 1 if coarse_steps is None else coarse_steps
        if not is_int(m) or m < 1:
            raise DeqirError(f"coarse_steps must be an integer >= 1, got {coarse_steps!r}")
        if coarse not in COARSE_KINDS:
            raise DeqirError(f"unknown coarse propagator {coarse!r}; choose from {', '.join(COARSE_KINDS)}")
        if stop == "rows" and stop_tol is None:     # restore's default rule: parareal's own default
            stop = "final"
        if stop not in STOP_RULES:
            raise DeqirError(f"parareal stops on 'final' (the final state's change in dB) or 'none', got {stop!r}")
        tol = DEFAULT_STOP_TOL[stop] if stop_tol is None else stop_tol
        if not is_real(tol) or not math.isfinite(tol) or (stop == "final" and tol <= 0):
            raise DeqirError(f"stop_tol must be a finite number (dB > 0 for 'final'), got {stop_tol!r}")
        k = blocks if max_iter is None else max_iter
        if not is_int(k) or k < 0:
            raise DeqirError(f"max_iter must be an integer >= 0 (parareal iterations), got {max_iter!r}")
        if not is_real(layout) or not 0.25 <= layout <= 4:
            raise DeqirError(f"layout must be a number in [0.25, 4], got {layout!r}")
        if data_std is not None and (not is_real(data_std) or not 0 < data_std < math.inf):
            raise DeqirError(f"data_std must be a positive number or None, got {data_std!r}")
        if not is_int(secant) or not 0 <= secant <= 8:
            raise DeqirError(f"secant must be an integer in 0..8 (remembered corrections), got {secant!r}")
        return PararealOptions(blocks, int(m), coarse, float(layout), stop, float(tol), min(int(k), blocks),
                               None if data_std is None else float(data_std), int(secant))


def default_blocks(steps: int) -> int:
    """B = round(N / 5): about five rows per block. Measured on the built-in prior (every task, worst
    image, etw 0): N = 100 with B = 20 needs K = 3-6 (2.0-2.9x modelled) where B = 10 needs 4-6
    (1.4-2.0x); N = 25 with B = 8 beats B = 6 (bench/results/parareal-builtin*-cpu.json)."""
    return max(1, min(steps, round(steps / 5)))


def block_bounds(steps: int, blocks: int, layout: float = 1.0) -> list[tuple[int, int]]:
    """[lo_n, hi_n) of the B blocks: boundaries at round(N (j / B)^layout), each block >= 1 row."""
    if layout == 1.0:
        return split_rows(steps, blocks)
    cuts = [0]
    for j in range(1, blocks + 1):
        c = round(steps * (j / blocks) ** layout)
        cuts.append(min(max(c, cuts[-1] + 1), steps - (blocks - j)))
    cuts[-1] = steps
    return list(itertools.pairwise(cuts))


class CoarseJump:
    """One coarse step of G over rows [a, b): from U (the input of row a) to the output of row b - 1.

    Every kind evaluates eps once, at (U, tau_a) (``ab2`` also reuses the previous jump's d).
    The range-space part is the DDNM jump (``ddnm_step`` from tau_a straight to row b-1's output
    time); the null-space part:
    * ``ddim``: the same DDNM jump (plain DDIM in the null space);
    * ``unrolled`` / ``normalized``: the null-space recurrence (``schedule.null_coordinates``, with
      data_std None / c) summed over the rows with d held at its value at row a: exact for a
      Gaussian prior of std c (``normalized``), and exact for every prior when b = a + 1;
    * ``ab2``: ``normalized`` with d extrapolated linearly from the previous jump of the block
      (second order; the block's first jump is ``normalized``).
    """

    def __init__(self, coeffs: ChainCoefficients, a: int, b: int, kind: str, data_std):
        self.a, self.b, self.kind = a, b, kind
        self.coeffs = coeffs
        nc = null_coordinates(coeffs, None if kind == "unrolled" else data_std)
        dec, coef = nc.decay[a:b], nc.coef[a:b]
        # weight of row j's term at the end: prod_{l > j} decay_l
        tail = torch.cat([torch.flip(torch.cumprod(torch.flip(dec[1:], [0]), 0), [0]), torch.ones(1, dtype=dec.dtype)])
        self.D = float(torch.prod(dec))
        self.C = float((tail * coef).sum())
        rel = torch.arange(b - a, dtype=torch.float64)
        self.C1 = float((tail * coef * rel).sum())           # weight of the slope of d (per row)
        self.noise_w = (tail * nc.noise[a:b]).tolist()       # exact: z is known
        self.n_in, self.n_out, self.shift = float(nc.n_in[a]), float(nc.n_out[b - 1]), float(nc.shift[a])

    def __call__(self, op, u: torch.Tensor, eps: torch.Tensor, y: torch.Tensor, z: torch.Tensor | None,
                 d_prev: torch.Tensor | None = None, gap: int = 0):
        """(state at the output of row b-1, d at row a); z (b, rows of the jump, ...) or None."""
        c = self.coeffs
        zb = None if z is None else z[:, -1]
        jump = ddnm_step(op, u, eps, y, float(c.a[self.a]), float(c.a_next[self.b - 1]), float(c.lam[self.b - 1]),
                         c.etw, c.nw, zb)
        if self.kind == "ddim":
            return jump, None
        d = eps - self.shift * u
        w = self.D * (u / self.n_in) + self.C * d
        if self.kind == "ab2" and d_prev is not None and gap > 0:
            w = w + (self.C1 / gap) * (d - d_prev)
        if z is not None and c.nw > 0:
            for j, wz in enumerate(self.noise_w):
                w = w + wz * z[:, j].to(w)
        return jump + op.P(self.n_out * w - jump), d


@dataclass
class PararealOutput:
    final: torch.Tensor                     # (B, C, H, W): U_B of each image at its stop
    iterations: list[int]                   # K per image (after the coarse pass)
    trace: list[list[float]]                # per iteration, each image's stopping quantity (nan: stopped)
    blocks: list[tuple[int, int]]
    coarse_steps: int
    calls: int = 0                          # denoiser evaluations (image rows) this process ran
    boundaries: list = field(default_factory=list)   # (only with keep=True) U_B of every image per iteration
    critical_path: float | None = None      # pipelined schedule at max K, one worker per block (run_parareal)
    schedule_calls: int | None = None       # its denoiser calls per image
    # this process's wall time per pass: [0] the coarse pass, [k] iteration k (its fine solves and
    # corrections); denoiser and communication seconds, bytes sent and denoiser rows inside each
    timings: list[IterationTiming] = field(default_factory=list)


class Parareal:
    """The propagators of one chain: F_n and G_n over the blocks (``block_bounds``)."""

    def __init__(self, eps_fn, op, coeffs: ChainCoefficients, y: torch.Tensor, opts: PararealOptions,
                 step_noise: torch.Tensor | None = None):
        self.eps_fn, self.op, self.coeffs, self.y, self.opts = eps_fn, op, coeffs, y, opts
        self.z = step_noise if coeffs.nw > 0 else None
        self.bounds = block_bounds(coeffs.steps, opts.blocks, opts.layout)
        self.jumps = []
        for lo, hi in self.bounds:
            subs = split_rows(hi - lo, min(opts.coarse_steps, hi - lo))
            self.jumps.append([CoarseJump(coeffs, lo + a, lo + b, opts.coarse, opts.data_std) for a, b in subs])
        self.calls = 0      # denoiser evaluations (image rows)
        self.denoiser_s = 0.0   # wall time inside the denoiser

    def coarse_calls(self, n: int) -> int:
        return len(self.jumps[n])

    def eps(self, h: torch.Tensor, rows: list[int], per: int) -> torch.Tensor:
        """eps of the stacked states h (len(rows) groups of ``per`` images; group g at row rows[g])."""
        t = self.coeffs.taus[torch.tensor(rows)].repeat_interleave(per).to(h.device)
        self.calls += h.shape[0]
        t0 = time.perf_counter()
        out = self.eps_fn(h, t)
        self.denoiser_s += time.perf_counter() - t0
        return out

    def timing(self, since: tuple, active: int, comm=None) -> IterationTiming:
        """The IterationTiming of a pass that began at ``since`` = :meth:`mark`."""
        t0, den0, calls0, comm0, bytes0 = since
        comm_s = 0.0 if comm is None else comm.stats.seconds - comm0
        sent = 0 if comm is None else comm.stats.bytes_sent - bytes0
        return IterationTiming(time.perf_counter() - t0, self.denoiser_s - den0, comm_s, sent, active,
                               self.calls - calls0)

    def mark(self, comm=None) -> tuple:
        """The counters at the start of a pass (for :meth:`timing`)."""
        return (time.perf_counter(), self.denoiser_s, self.calls, 0.0 if comm is None else comm.stats.seconds,
                0 if comm is None else comm.stats.bytes_sent)

    def coarse(self, n: int, u: torch.Tensor, ids, eps0: torch.Tensor | None = None):
        """G_n(u) for images ``ids``; eps0 = eps(u, tau_lo) if known. Returns (G_n(u), eps(u, tau_lo))."""
        y = self.y[ids]
        first, d_prev, prev_a = None, None, None
        for j, jump in enumerate(self.jumps[n]):
            e = eps0 if (j == 0 and eps0 is not None) else self.eps(u, [jump.a], len(ids))
            if j == 0:
                first = e
            z = None if self.z is None else self.z[ids, jump.a:jump.b]
            u, d = jump(self.op, u, e, y, z, d_prev, 0 if prev_a is None else jump.a - prev_a)
            d_prev, prev_a = d, jump.a
        return u, first

    def fine(self, ns: list[int], u: torch.Tensor, eps0: torch.Tensor, ids) -> torch.Tensor:
        """F_n for the blocks ns at once: u, eps0 (len(ns) * len(ids), ...) block-major, eps0 = eps(u, tau_lo)."""
        per, c = len(ids), self.coeffs
        y = self.y[ids].repeat(len(ns), *([1] * (self.y.dim() - 1)))
        lens = [self.bounds[n][1] - self.bounds[n][0] for n in ns]
        h = u.clone()
        for j in range(max(lens)):
            live = [g for g in range(len(ns)) if lens[g] > j]
            sel = torch.cat([torch.arange(g * per, (g + 1) * per) for g in live]).to(u.device)
            rows = [self.bounds[ns[g]][0] + j for g in live]
            hs = h[sel]
            e = eps0[sel] if j == 0 else self.eps(hs, rows, per)
            idx = torch.tensor(rows).repeat_interleave(per)
            col = (hs.shape[0],) + (1,) * (u.dim() - 1)
            a, an, lam = (v[idx].to(u).view(col) for v in (c.a, c.a_next, c.lam))
            z = None if self.z is None else torch.stack([self.z[i, r] for r in rows for i in ids]).to(u)
            h[sel] = ddnm_step(self.op, hs, e, y[sel], a, an, lam, c.etw, c.nw, z)
        return h


def change_quantity(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """Per image: the PSNR (dB, images in [-1, 1]) of U_B^k against U_B^{k-1} (+inf: no change)."""
    mse = (new - old).double().flatten(1).pow(2).mean(1)
    return 10 * torch.log10(4.0 / mse)


def done(stop: str, q: torch.Tensor, tol: float) -> torch.Tensor:
    if stop == "final":
        return q >= tol
    return torch.zeros_like(q, dtype=torch.bool)


def secant_correction(hist, u: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """(F - G)(u) from the remembered pairs (x_j, c_j = (F - G)(x_j)), newest last: c_last +
    sum_j a_j (c_j - c_last), a = the least-squares fit (ridge relative to the Gram diagonal) of
    u - x_last by the x_j - x_last, per image. With one pair it is plain parareal's c_last."""
    x_last, c_last = hist[-1]
    if len(hist) < 2:
        return c_last
    b = u.shape[0]
    d = torch.stack([(x - x_last).reshape(b, -1) for x, _ in hist[:-1]], 1).double()   # (b, j, D)
    r = (u - x_last).reshape(b, -1).double()
    gram = d @ d.transpose(1, 2)
    lam = ridge * gram.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-300)
    gram = gram + lam[:, None, None] * torch.eye(gram.shape[1], dtype=gram.dtype)
    a = torch.linalg.solve(gram, (d @ r[:, :, None]))[:, :, 0]                          # (b, j)
    dc = torch.stack([c - c_last for _, c in hist[:-1]], 1)
    return c_last + (a.to(dc).view(b, -1, *([1] * (u.dim() - 1))) * dc).sum(1)


@torch.no_grad()
def solve_parareal(eps_fn, op, coeffs: ChainCoefficients, y: torch.Tensor, xi: torch.Tensor,
                   opts: PararealOptions, step_noise: torch.Tensor | None = None, callback=None,
                   keep: bool = False) -> PararealOutput:
    """Single process: every block in this process, the fine solves of an iteration batched together.

    ``callback(k, ids, final, q)`` after the coarse pass (k = 0, q None) and each iteration;
    ``keep``: record every iteration's U_B for all images (benchmarks)."""
    y = y.to(device=xi.device, dtype=xi.dtype)
    pr = Parareal(eps_fn, op, coeffs, y, opts, step_noise)
    nb, batch = opts.blocks, xi.shape[0]
    ids = list(range(batch))
    # coarse pass: U^0, G_n(U^0_{n-1}) and the shared first evaluations
    U, G, E = [xi], [None] * nb, [None] * nb
    H = [[] for _ in range(nb)]               # per block: (input, F - G at it), newest last (secant)
    since = pr.mark()
    for n in range(nb):
        g, E[n] = pr.coarse(n, U[n], ids)
        G[n] = g
        U.append(g)
    timings = [pr.timing(since, batch)]
    final = U[-1].clone()
    iters, trace, kept = [0] * batch, [], ([U[-1].clone()] if keep else [])
    if callback is not None:
        callback(0, ids, U[-1], None)
    for k in range(1, opts.max_iter + 1):
        if not ids:
            break
        todo = list(range(k - 1, nb))          # blocks whose input changed in the last iteration
        per = len(ids)
        since = pr.mark()
        Fv = pr.fine(todo, torch.cat([U[n] for n in todo]), torch.cat([E[n] for n in todo]), ids)
        Fv = {n: Fv[j * per:(j + 1) * per] for j, n in enumerate(todo)}
        newU = U[:k] + [Fv[k - 1]]             # U_k^k = F_k(U_{k-1}): exact
        for n in range(k, nb):
            corr = Fv[n] - G[n]
            if opts.secant:
                H[n].append((U[n], corr))
                del H[n][:-(opts.secant + 1)]
                corr = secant_correction(H[n], newU[n])
            g, E[n] = pr.coarse(n, newU[n], ids)
            newU.append(g + corr)
            G[n] = g
        q = change_quantity(newU[-1], U[-1])
        if k == nb:
            q = torch.full_like(q, math.inf)   # exact: nothing left to change
        row = [math.nan] * batch
        for j, i in enumerate(ids):
            row[i] = float(q[j])
            iters[i] = k
        trace.append(row)
        U = newU
        if keep:
            full = kept[-1].clone()
            full[ids] = U[-1]
            kept.append(full)
        timings.append(pr.timing(since, per))
        if callback is not None:
            callback(k, list(ids), U[-1], q)
        stop = done(opts.stop, q, opts.stop_tol) if k < opts.max_iter else torch.ones_like(q, dtype=torch.bool)
        keepj = [j for j in range(per) if not bool(stop[j])]
        for j in range(per):
            if bool(stop[j]):
                final[ids[j]] = U[-1][j]
        if len(keepj) < per:
            sel = torch.tensor(keepj, dtype=torch.long, device=xi.device)
            U = [u[sel] for u in U]
            G = [None if g is None else g[sel] for g in G]
            E = [None if e is None else e[sel] for e in E]
            H = [[(x[sel], c[sel]) for x, c in h] for h in H]
            ids = [ids[j] for j in keepj]
    if opts.max_iter == 0:
        final = U[-1]
    return PararealOutput(final, iters, trace, pr.bounds, opts.coarse_steps, pr.calls, kept, timings=timings)


def block_owners(blocks: int, procs: int) -> list[int]:
    """The worker of each block: contiguous groups (``split_rows`` of the blocks over the workers)."""
    owner = []
    for w, (a, b) in enumerate(split_rows(blocks, min(procs, blocks))):
        owner += [w] * (b - a)
    return owner


def parareal_schedule(bounds, coarse_calls, iterations: int, procs: int | None = None,
                      stop_lag: int = 0) -> dict:
    """The pipelined schedule of K = ``iterations`` in units of one denoiser call (batch 1).

    Worker w owns the blocks ``block_owners``; in iteration k it first runs G_n(U_n^k) for its
    blocks (as soon as U_n^k arrives: the correction travels along the workers), then the fine
    solves F_n(U_n^k) (s_n - 1 calls: the first is G's) that iteration k + 1 needs. Block n <= k
    has an exact input and needs nothing more. ``stop_lag`` L > 0: every worker waits at the start
    of iteration k > L for iteration k - L's stopping decision (when U_B^{k-L} is known), as
    ``solvers.parareal_dist`` runs it with L = 2; 0: no decision waits (the pure pipeline).
    Returns {"critical_path": when U_B^K is known,
    "calls": denoiser calls of the schedule, "per_worker": busy calls of each worker}."""
    nb = len(bounds)
    iterations = min(iterations, nb)          # K = B is the serial answer: nothing runs after it
    procs = nb if procs is None else procs
    owner = block_owners(nb, procs)
    lens = [hi - lo for lo, hi in bounds]
    m = list(coarse_calls)
    free = [0.0] * (max(owner) + 1)
    busy = [0.0] * len(free)
    calls = 0
    g_end, f_end = [0.0] * nb, [0.0] * nb      # of the latest G / F of each block
    avail = [0.0] * (nb + 1)                  # U_n of the current iteration
    final_at = []                             # when U_B^k is known
    for k in range(iterations + 1):
        if stop_lag and k > stop_lag:
            free = [max(f, final_at[k - stop_lag]) for f in free]
        prev_f = list(f_end)
        new = [0.0] * (nb + 1)
        if k:
            new[:k] = avail[:k]
            new[k] = prev_f[k - 1]             # U_k^k = F_{k-1}(U_{k-1}^{k-1})
        for n in range(k, nb):                 # G pass
            w = owner[n]
            start = max(free[w], new[n])
            free[w] = g_end[n] = start + m[n]
            busy[w] += m[n]
            calls += m[n]
            new[n + 1] = g_end[n] if k == 0 else max(g_end[n], prev_f[n])
        avail = new
        final_at.append(avail[nb])
        if k == iterations:
            break
        for n in range(k, nb):                 # F pass (for iteration k + 1)
            w = owner[n]
            free[w] = f_end[n] = free[w] + lens[n] - 1
            busy[w] += lens[n] - 1
            calls += lens[n] - 1
    return {"critical_path": avail[nb], "calls": calls, "per_worker": busy}


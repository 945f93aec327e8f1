"""Picard over a sliding window of rows with the converged prefix frozen (ParaDiGMS-style).

The chain's rows are causal, so rows that have settled need no more denoiser calls:

* the state is the window [F, E) of at most W rows; rows < F are frozen (their last values,
  summarised by the frozen row h_{F-1}, the denoiser input of row F, and the scan state entering
  row F) and rows >= E are not evaluated yet;
* each iteration is one Picard sweep of the window: ONE batched denoiser call on its rows only,
  the two scans started from the frozen state, f = F(x) on the window;
* then the prefix advances over every leading row whose change is within ``freeze`` (default 0.1) x
  ``stop_tol`` of its noise level (|f_i - x_i|_rms / sigma_i), and always over row F, whose
  input was frozen, so its value is final: F grows by at least one row per iteration, so the
  solve ends within N iterations, like plain Picard (exact only as far as the frozen rows are:
  they are within freeze x the tolerance, not equal to serial);
* the window end moves to min(F + W, N); new rows start as copies of the old window's last row,
  or from a trajectory the caller gives (``entering``: ``restore(init=...)``). Copies beat the
  one-call warm start's rows (oracle, N = 100, windows N/2 and N/4: K 42 / 64 against 50 / 71);
* an image is done when the window has reached row N and the ``rows`` rule holds on its active
  rows (max_i |f_i - x_i|_rms / sigma_i <= stop_tol), or when every row is frozen; the batch
  shares one window (the least converged image's prefix).

Sharded (``DistComm``), the window, not the chain, is split: rank r owns block r of
``offset_split(F, E, P)``, so every rank keeps evaluating about W / P rows while the window
moves. The choice costs a re-split per iteration, point-to-point moves of the rows that change
owner (``comm.reshard_plan``: at most the rows the window advanced, plus copies, per boundary),
one broadcast of the new frozen row from its owner, and one of the final rows of images that
finish; the alternative, a fixed split of the chain, would leave the ranks behind the window
idle. A window shorter than P leaves the last ranks without rows (they skip the denoiser and the
halo, and add a zero summary to the carry's all_gather). Every rank keeps the loop-invariant rows
(A+y, noise terms) and ``x0`` of the whole chain, so that memory still grows with N; the chain
state (x, f, the scans) is W / P rows per rank.

With W >= N nothing slides; only the frozen prefix saves denoiser calls.
"""
from __future__ import annotations

import time

import torch

from deqir_dist.parallel.comm import offset_split
from deqir_dist.sampling.chain import ACC, Carry, Summary
from deqir_dist.solvers.driver import SolveOutput, run
from deqir_dist.solvers.options import SolverOptions


def _prefix(counts: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Per image, leading settled rows of the window from each rank's count of leading settled
    rows in its block: ranks add up while the one before was settled to its end."""
    total = torch.zeros(counts.shape[0], dtype=torch.long)
    going = torch.ones(counts.shape[0], dtype=torch.bool)
    for r, n in enumerate(sizes):
        c = counts[:, r].round().long()
        total += torch.where(going, c, torch.zeros_like(c))
        going &= c >= n
    return total


class WindowSweep:
    """Picard over the window [F, E) with the settled prefix frozen: a ``driver.Rule``.

    Statistics columns: per rank, its max_i |r_i|^2 / sigma_i^2, then per rank its leading
    settled rows."""

    def __init__(self, block, comm, opts: SolverOptions, x0: torch.Tensor | None, entering: torch.Tensor | None):
        self.block, self.comm, self.opts, self.entering = block, comm, opts, entering
        xi = block.xi
        nimg, self.n_total = xi.shape[0], block.total_rows
        self.width = min(opts.window, self.n_total)
        self.numel_row = xi[0].numel()
        self.lo_w, self.hi_w = 0, self.width                      # the window [F, E)
        self.split = offset_split(self.lo_w, self.hi_w, comm.size)
        self.a, self.b = self.split[comm.rank]
        init = x0 if x0 is not None else xi.unsqueeze(1).expand(nimg, self.n_total, *xi.shape[1:])
        self.x = init[:, self.a:self.b].clone()
        self.frozen_row = xi.clone()                               # h_{F-1}: the denoiser input of row F
        self.frozen_state = Carry(block.carry0.p.clone(), block.carry0.q.clone())   # scan state entering row F
        self.state_rows = 0

    def evaluate(self, k: int, idx: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        block, comm, opts = self.block, self.comm, self.opts
        size, rank, a, b, x = comm.size, comm.rank, self.a, self.b, self.x
        self.idx = idx
        self.active = sum(1 for lo, hi in self.split if hi > lo)
        self.state_rows = max(self.state_rows, b - a)
        if size > 1:
            comm.block_decays = block.decay_products(self.split)
        halo = comm.halo(x[:, -1] if b > a else self.frozen_row, self.frozen_row, self.active)
        t_den = 0.0
        bsz = idx.numel()
        # columns: per rank, its max_i |r_i|^2 / sigma_i^2, then per rank its leading settled rows
        stats = torch.zeros((bsz, 2 * size), dtype=torch.float64, device=block.xi.device)
        if b > a:
            sub = block.view(a, b)
            t0 = time.perf_counter()
            inputs = sub.inputs(x, halo)
            eps = sub.denoise(inputs)
            t_den = time.perf_counter() - t0
            bp, bq = sub.increments(eps, inputs, idx)
            summary = sub.summary(bp, bq)
        else:
            zero = torch.zeros_like(self.frozen_state.p)
            summary = Summary(zero, zero, 1.0, 1.0)
        carry = comm.carry(self.frozen_state, summary, block.range_recurrent) if size > 1 else self.frozen_state
        if b > a:
            self.state = sub.scans(bp, bq, carry)
            self.f = f = sub.combine(self.state, x.dtype)
            r2 = (f - x).flatten(2).pow(2).sum(2).double()           # (bsz, rows)
            rel = r2 * sub.row_weight.view(1, -1).double()            # |f_i - x_i|^2 / sigma_i^2
            settled = rel / self.numel_row <= (opts.freeze * opts.stop_tol) ** 2
            if a == self.lo_w:
                settled[:, 0] = True        # its input was frozen: row F is final after one sweep
            stats[:, rank] = rel.max(1).values
            stats[:, size + rank] = torch.cumprod(settled.long(), 1).sum(1).double()
        return stats, t_den, bsz * (b - a)

    def decide(self, k: int, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        size = self.comm.size
        q = torch.sqrt(stats[:, :size].max(1).values / self.numel_row)
        self.prefix = self.lo_w + _prefix(stats[:, size:], [hi - lo for lo, hi in self.split])
        done = (self.prefix >= self.n_total) | ((q <= self.opts.stop_tol) & (self.hi_w == self.n_total))
        self.owner_end = self.active - 1                # holds the window's last row
        return q, done

    def callback_rows(self) -> torch.Tensor | None:
        return self.f[:, -1] if self.comm.rank == self.owner_end else None

    def final_rows(self, d: torch.Tensor) -> torch.Tensor:
        xi = self.block.xi
        rows_d = self.f[d.to(self.f.device), -1] if self.comm.rank == self.owner_end else torch.zeros_like(xi[: d.numel()])
        return self.comm.from_rank(rows_d.contiguous(), self.owner_end)

    def advance(self, k: int, keep: torch.Tensor, q: torch.Tensor) -> None:
        block, comm, xi = self.block, self.comm, self.block.xi
        rank, a, b = comm.rank, self.a, self.b
        kd = keep.to(xi.device)
        new_lo = int(self.prefix[keep].min())              # the batch shares the least converged image's window
        new_hi = min(new_lo + self.width, self.n_total)
        # the new frozen row h_{new_lo - 1} and the scan state after it, from the rank that owns it
        # (without range-space memory the scan ignores the Q part of the state: not sent)
        src = next(r for r, (lo, hi) in enumerate(self.split) if lo <= new_lo - 1 < hi)
        planes = 3 if block.range_recurrent else 2
        if rank == src:
            j = new_lo - 1 - a
            st = self.state
            packed = torch.stack([self.f[kd, j].to(ACC), st.p[kd, j], st.q[kd, j]][:planes], 1)
        else:
            packed = torch.zeros((keep.numel(), planes, *xi.shape[1:]), dtype=ACC, device=xi.device)
        packed = comm.from_rank(packed.contiguous(), src)
        self.frozen_row = packed[:, 0].to(xi.dtype)
        self.frozen_state = Carry(packed[:, 1], packed[:, 2] if planes == 3 else torch.zeros_like(packed[:, 1]))
        new_split = offset_split(new_lo, new_hi, comm.size)
        x = comm.reshard(self.f[kd] if b > a else self.x[kd], self.split, new_split, self.hi_w)
        na, nb = new_split[rank]
        if self.entering is not None and nb > max(na, self.hi_w):     # rows entering the window
            fresh = max(na, self.hi_w)
            x[:, fresh - na:] = self.entering[self.idx[kd], fresh:nb]
        self.x = x
        self.split, (self.lo_w, self.hi_w) = new_split, (new_lo, new_hi)
        self.a, self.b = self.split[rank]

    def postfix(self, q: torch.Tensor) -> str:
        return f"rows={float(q.max()):.3g} window=[{self.lo_w},{self.hi_w})"

    def finish(self, final: torch.Tensor) -> torch.Tensor:
        return final


def solve_window(block, comm, opts: SolverOptions, x0: torch.Tensor | None = None,
                 progress: bool = False, callback=None, entering: torch.Tensor | None = None) -> SolveOutput:
    """Picard with a frozen prefix and a window of ``opts.window`` rows.

    ``block`` holds ALL rows of the chain (every rank); ``x0`` (B, N, C, H, W) or None (xi
    everywhere) starts the first window; ``entering`` (B, N, C, H, W) or None (copy forward)
    the rows that enter it later. Returns the final row of every image on every rank. ``callback(k, ids, rows,
    q)`` runs on the rank that holds the window's last row (it moves as the window shrinks) and
    sees that row: h_N's current value once the window has reached row N, h_E before.
    """
    return run(WindowSweep(block, comm, opts, x0, entering), comm, opts.max_iter, block.xi, progress, callback)

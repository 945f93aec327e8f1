"""The sweep solver over a block of rows: picard or anderson updates, per-image stopping.

Both are update rules of the driver loop (``driver.run``) that evaluate F on every row of the
block in every sweep (``BlockSweep``); they differ in ``step``: Picard takes f, Anderson mixes
the last m iterates (``anderson.AndersonHistory``).
"""
from __future__ import annotations

import time

import torch

from deqir_dist.solvers.anderson import AndersonHistory
from deqir_dist.solvers.driver import SolveOutput, _is_done, run, stop_quantity
from deqir_dist.solvers.options import SolverOptions


class BlockSweep:
    """Picard over every row of the block: x_{k+1} = F(x_k). A ``driver.Rule``.

    Statistics columns (all-summed over ranks): [|r|^2, |f|^2, |r_N|^2], then ``extra``
    columns of the subclass (from ``EXTRA_AT``), then, under the ``rows`` rule, one slot per
    rank for its max_i |r_i|^2 / sigma_i^2 (``driver.stop_quantity``)."""

    EXTRA_AT = 3

    def __init__(self, block, comm, opts: SolverOptions, x0: torch.Tensor | None, extra: int = 0):
        self.block, self.comm, self.opts = block, comm, opts
        xi = block.xi
        self.numel_row = xi[0].numel()
        self.x = x0.clone() if x0 is not None else xi.unsqueeze(1).expand(xi.shape[0], block.rows,
                                                                           *xi.shape[1:]).clone()
        self.rows_at = self.EXTRA_AT + extra         # first per-rank slot of the "rows" statistic
        self.width = self.rows_at + (comm.size if opts.stop == "rows" else 0)
        self.inv_var = block.row_weight.view(1, -1).double()      # 1 / sigma_i^2 of the block's rows
        self.state_rows = block.rows

    def evaluate(self, k: int, idx: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        block, comm, x = self.block, self.comm, self.x
        self.idx = idx
        halo = comm.halo(x[:, -1], block.xi[idx])
        t0 = time.perf_counter()
        inputs = block.inputs(x, halo)
        eps = block.denoise(inputs)
        t_den = time.perf_counter() - t0
        bp, bq = block.increments(eps, inputs, idx)
        carry0 = block.carry0.index(idx)
        carry = carry0 if comm.size == 1 else comm.carry(carry0, block.summary(bp, bq), block.range_recurrent)
        self.f = f = block.outputs(bp, bq, carry)
        self.r = r = f - x
        stats = torch.zeros((x.shape[0], self.width), dtype=torch.float64, device=x.device)
        # per-row sums (independent of how rows are split), then summed over rows in float64
        self.r2 = r2 = r.flatten(2).pow(2).sum(2).double()
        stats[:, 0] = r2.sum(1)
        stats[:, 1] = f.flatten(2).pow(2).sum(2).double().sum(1)
        if comm.is_last:
            stats[:, 2] = r2[:, -1]
        if self.opts.stop == "rows":
            stats[:, self.rows_at + comm.rank] = (r2 * self.inv_var).max(1).values
        self.local_stats(k, stats)
        return stats, t_den, x.shape[0] * block.rows

    def local_stats(self, k: int, stats: torch.Tensor) -> None:
        """The subclass's extra columns of this iteration's statistics."""

    def decide(self, k: int, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        opts = self.opts
        self.stats = stats
        q = stop_quantity(opts.stop, stats, self.numel_row, self.rows_at)
        done = _is_done(opts.stop, q, opts.stop_tol)
        if opts.stop != "none" and k + 1 >= self.block.total_rows:
            done[:] = True                       # exact: every row has been swept (Anderson keeps exact rows)
        return q, done

    def callback_rows(self) -> torch.Tensor:
        return self.f[:, -1]

    def final_rows(self, d: torch.Tensor) -> torch.Tensor:
        return self.f[d.to(self.f.device), -1]

    def advance(self, k: int, keep: torch.Tensor, q: torch.Tensor) -> None:
        self.x = self.step(k, q)
        if keep.numel() < self.x.shape[0]:     # drop the images that stopped
            self.x = self.x[keep.to(self.x.device)]
            self.drop(keep)

    def step(self, k: int, q: torch.Tensor) -> torch.Tensor:
        """The next iterate of every image in the batch (Picard: f)."""
        return self.f

    def drop(self, keep: torch.Tensor) -> None:
        """Keep the subclass's per-image state of the images at batch positions ``keep`` only."""

    def postfix(self, q: torch.Tensor) -> str:
        finite = q[torch.isfinite(q)]
        if not finite.numel():
            return ""
        return f"{self.opts.stop}={float(finite.min() if self.opts.stop == 'final' else finite.max()):.3g}"

    def finish(self, final: torch.Tensor) -> torch.Tensor:
        return self.comm.from_last(final)


PicardSweep = BlockSweep


class AndersonSweep(BlockSweep):
    """Anderson mixing over the whole block with one set of weights per image (``driver`` doc):
    the Gram row of the newest residual is in the iteration's statistics (columns 3..3+m)."""

    def __init__(self, block, comm, opts: SolverOptions, x0: torch.Tensor | None):
        super().__init__(block, comm, opts, x0, extra=opts.m)
        nimg = self.x.shape[0]
        self.hist = AndersonHistory(opts.m, self.x, nimg)
        self.best = torch.full((nimg,), float("inf"), dtype=torch.float64)
        self.q_best = torch.full((nimg,), float("inf"), dtype=torch.float64)
        self.q_stale = torch.zeros((nimg,), dtype=torch.long)
        self.picard_only = torch.zeros((nimg,), dtype=torch.bool)

    def local_stats(self, k: int, stats: torch.Tensor) -> None:
        nh = self.hist.push(k, self.x, self.r)
        stats[:, self.EXTRA_AT:self.EXTRA_AT + nh] = self.hist.dots(self.r * self.block.row_weight)

    def step(self, k: int, q: torch.Tensor) -> torch.Tensor:
        opts, stats, hist = self.opts, self.stats, self.hist
        res = stats[:, 0].sqrt()
        hist.add_gram_row(stats[:, self.EXTRA_AT:self.EXTRA_AT + hist.filled])
        restart = res > opts.safeguard * self.best
        self.best = torch.minimum(self.best, res)
        if opts.stop == "rows":    # the stopping quantity stalls: Picard steps from here on
            self.q_stale = torch.where(q < 0.9 * self.q_best, torch.zeros_like(self.q_stale), self.q_stale + 1)
            self.q_best = torch.minimum(self.q_best, q)
            self.picard_only |= self.q_stale > opts.m
            restart |= self.picard_only
        hist.restart(restart)
        x = hist.mix(hist.weights(opts.ridge, restart), opts.beta)
        exact = min(max(k + 1 - self.block.lo, 0), self.block.rows)   # rows whose inputs were all exact
        if exact:
            x[:, :exact] = self.f[:, :exact]
        return x

    def drop(self, keep: torch.Tensor) -> None:
        self.hist.keep(keep)
        self.best, self.q_best = self.best[keep], self.q_best[keep]
        self.q_stale, self.picard_only = self.q_stale[keep], self.picard_only[keep]


def solve_chain(block, comm, opts: SolverOptions, x0: torch.Tensor | None = None,
                progress: bool = False, callback=None) -> SolveOutput:
    """Solve the block's joint fixed point for all images; every rank returns the same result.

    ``callback(k, image_ids, final_rows, q)``, if given, sees each evaluation's final rows
    (meaningful on the last rank) and the stopping quantity of the active images.
    """
    rule = AndersonSweep(block, comm, opts, x0) if opts.solver == "anderson" else PicardSweep(block, comm, opts, x0)
    return run(rule, comm, opts.max_iter, block.xi, progress, callback)

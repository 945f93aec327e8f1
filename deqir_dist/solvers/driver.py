"""The one driver loop of the fixed-point solvers for the joint chain map, and the stopping rules.

Every solver iterates x_{k+1} = update(x_k, f_k), f_k = F(x_k), over the rows of one block
(the whole chain in a single process). Each image is its own problem: its own Anderson weights,
its own stopping decision; once an image stops it leaves the batch. ``run`` is that loop (per
image stopping, dropping finished images, timings, progress, the callback); what differs
between solvers is an update rule plugged into it (``Rule``): ``chain.PicardSweep`` and
``chain.AndersonSweep`` (every row, every sweep), ``window.WindowSweep`` (a sliding window).

* ``picard``: x_{k+1} = f_k. Exact after N evaluations (the map is causal). With the ``rows``
  rule it runs in ``window.solve_window`` by default (``window`` rows, default N): rows whose
  change is far below the tolerance are frozen and leave the denoiser batch.
* ``anderson``: one set of mixing weights per image for the whole chain (docs/design.md section 3.2):
  alpha = argmin |sum_j alpha_j R_j|_W^2 + lam |alpha|^2 s.t. sum alpha = 1, over the last m
  residuals R_j = f_j - x_j, with lam = ridge * mean(diag Gram) (relative, so it scales with the
  residual) and the row weights W_i = 1 / max(1 - a'_i, 1e-3) (each row's residual in units of
  its noise variance, so the nearly clean rows that decide the output are not drowned by the
  noisy ones); x_{k+1} = sum_j alpha_j (x_j + beta R_j). Two safeguards: rows whose inputs are
  already exact (rows 1..k after k evaluations, by causality) take the Picard value, so Anderson
  is exact after N evaluations like Picard; and when an image's residual grows past
  ``safeguard`` times its best so far, its history restarts and it takes a Picard step. Under
  the ``rows`` rule an image whose stopping quantity has not improved by 10% for more than m
  evaluations takes Picard steps from then on (global mixing weights can stall single rows).

Stopping rules, evaluated per image after every evaluation of F:
* ``rows`` (default): every row has settled in units of its noise level,
  max_i rms(f_k[i] - x_k[i]) / sigma_i <= stop_tol with sigma_i = sqrt(max(1 - a'_i, 1e-3))
  (ParaDiGMS' per-row tolerance). Measured (README): the output stays >= 40 dB from serial on
  the analytic oracle and on the built-in prior at N = 25..100;
* ``final``: the final row is within ``stop_tol`` dB PSNR of its own image under F,
  10 log10(4 / mse(f_k[N], x_k[N])) >= stop_tol (images in [-1, 1]): cheap and safe on the
  oracle, but with a learned prior the final row can sit still while earlier rows are still
  moving (32-38 dB from serial measured), so it is not the default;
* ``residual``: |f_k - x_k| / |f_k| <= stop_tol over all rows;
* ``none``: run exactly ``max_iter`` evaluations.
The result of an image is the final row of its last f_k.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass
class IterationTiming:
    total_s: float
    denoiser_s: float
    comm_s: float
    bytes_sent: int
    active: int                 # images in the batch
    rows: int = 0               # denoiser evaluations (image rows) on this process

    @property
    def solver_s(self) -> float:
        return max(self.total_s - self.denoiser_s - self.comm_s, 0.0)


@dataclass
class SolveOutput:
    final: torch.Tensor                  # (B, C, H, W): h_N of every image, on every rank
    iterations: list[int]                # evaluations of F per image
    trace: list[list[float]]             # per evaluation, the stopping quantity per image (nan: inactive)
    timings: list[IterationTiming] = field(default_factory=list)
    state_rows: int = 0                  # rows of chain state this process held


def stop_quantity(stop: str, stats: torch.Tensor, numel_row: int, rows_at: int) -> torch.Tensor:
    """Per-image stopping quantity from the summed statistics.

    Columns: [|r|^2, |f|^2, |r_N|^2, ...]; from ``rows_at`` on, one slot per rank holding that
    rank's max_i |r_i|^2 / sigma_i^2 (zero elsewhere, so the all-sum gathers them).
    """
    if stop == "final":
        mse = stats[:, 2] / numel_row
        return 10 * torch.log10(4.0 / mse)      # +inf when the final row did not change
    if stop == "rows":
        return torch.sqrt(stats[:, rows_at:].max(1).values / numel_row)
    return torch.sqrt(stats[:, 0] / stats[:, 1].clamp_min(1e-300))


def record_evaluation(trace: list, iterations: list[int], ids: list[int], q: torch.Tensor) -> None:
    """One evaluation of F for the active images ``ids``: count it, trace q (nan for the others)."""
    row = [float("nan")] * len(iterations)
    for j, i in enumerate(ids):
        row[i] = float(q[j])
        iterations[i] += 1
    trace.append(row)


def _is_done(stop: str, q: torch.Tensor, tol: float) -> torch.Tensor:
    if stop == "final":
        return q >= tol
    if stop in ("rows", "residual"):
        return q <= tol
    return torch.zeros_like(q, dtype=torch.bool)


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from deqir_dist.sampling.progress import progress_bar
    return progress_bar(total, "fixed point", "it", leave=False)


class Rule(Protocol):
    """An update rule of ``run``: the state of the active images and how one iteration changes it.

    Per iteration ``run`` calls ``evaluate`` (one evaluation of F on the state, the local
    statistics), all-sums the statistics (the one host synchronisation), ``decide``, then
    ``final_rows`` for the images that stopped (every rank calls it: it may broadcast) and
    ``advance`` with the rest (positions in the current batch, a CPU tensor; never empty): the
    rule drops the other images from its state. ``finish`` turns the collected final rows into
    every rank's result."""

    state_rows: int                      # rows of chain state this process held (SolveOutput.state_rows)

    def evaluate(self, k: int, idx: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """(local statistics (batch, columns) float64, denoiser seconds, rows evaluated)."""

    def decide(self, k: int, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stopping quantity q (batch,), done (batch,) bool) from the all-summed statistics."""

    def callback_rows(self) -> torch.Tensor | None:
        """The rows the callback sees on this rank (None: not on this rank)."""

    def final_rows(self, d: torch.Tensor) -> torch.Tensor:
        """The final rows of the images at batch positions ``d`` that stopped."""

    def advance(self, k: int, keep: torch.Tensor, q: torch.Tensor) -> None:
        """The update for the images at batch positions ``keep``; the others leave the state."""

    def postfix(self, q: torch.Tensor) -> str:
        """The progress bar's text after an iteration."""

    def finish(self, final: torch.Tensor) -> torch.Tensor:
        """Every rank's (B, C, H, W) result from this rank's collected final rows."""


def run(rule: Rule, comm, max_iter: int, xi: torch.Tensor, progress: bool = False, callback=None) -> SolveOutput:
    """The driver loop: at most ``max_iter`` evaluations of F for the images of ``xi`` (B, C, H, W).

    ``callback(k, image_ids, rows, q)``, if given, sees each evaluation's rows
    (``rule.callback_rows``) and the stopping quantity of the active images."""
    nimg = xi.shape[0]
    ids = list(range(nimg))                      # original image index of each active image
    idx = torch.arange(nimg, device=xi.device)
    final = torch.zeros_like(xi)
    iterations = [0] * nimg
    trace: list[list[float]] = []
    timings: list[IterationTiming] = []
    bar = _progress(progress and comm.is_first, max_iter)
    for k in range(max_iter):
        t_start = time.perf_counter()
        comm_s0, bytes0 = comm.stats.seconds, comm.stats.bytes_sent
        stats, t_den, evaluated = rule.evaluate(k, idx)
        stats = comm.all_sum(stats).cpu()        # the one host synchronisation of an iteration
        q, done = rule.decide(k, stats)
        if k + 1 == max_iter:
            done[:] = True
        record_evaluation(trace, iterations, ids, q)
        rows = rule.callback_rows() if callback is not None else None
        if rows is not None:
            callback(k, list(ids), rows, q)
        if done.any():
            d = torch.nonzero(done).flatten()
            final[idx[d.to(idx.device)]] = rule.final_rows(d)
        keep = torch.nonzero(~done).flatten()
        if keep.numel() == 0:
            ids = []
        else:
            rule.advance(k, keep, q)
            if keep.numel() < len(ids):
                idx = idx[keep.to(idx.device)]
                ids = [ids[j] for j in keep.tolist()]
        timings.append(IterationTiming(time.perf_counter() - t_start, t_den, comm.stats.seconds - comm_s0,
                                       comm.stats.bytes_sent - bytes0, int(done.numel()), evaluated))
        if bar is not None:
            bar.set_postfix_str(rule.postfix(q))
            bar.update(1)
        if not ids:
            break
    if bar is not None:
        bar.close()
    return SolveOutput(rule.finish(final), iterations, trace, timings, rule.state_rows)

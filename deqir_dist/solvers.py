"""Fixed-point solvers for the joint chain map, and the stopping rules.

Both solvers iterate x_{k+1} = update(x_k, f_k), f_k = F(x_k), over the rows of one block
(the whole chain in a single process). Each image is its own problem: its own Anderson weights,
its own stopping decision; once an image stops it leaves the batch.

* ``picard``: x_{k+1} = f_k. Exact after N evaluations (the map is causal). With the ``rows``
  rule it runs in ``window.solve_window`` by default (``window`` rows, default N): rows whose
  change is far below the tolerance are frozen and leave the denoiser batch.
* ``anderson``: one set of mixing weights per image for the whole chain (DESIGN section 3):
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

import math
import time
from dataclasses import dataclass, field

import torch

from .errors import DeqirError, is_int, is_real

SOLVERS = ("picard", "anderson")
STOP_RULES = ("final", "rows", "residual", "none")
DEFAULT_STOP_TOL = {"final": 43.0, "rows": 0.03, "residual": 1e-3, "none": 0.0}


@dataclass(frozen=True)
class SolverOptions:
    solver: str = "picard"
    stop: str = "rows"
    stop_tol: float = 0.03
    max_iter: int = 25
    m: int = 5
    ridge: float = 1e-4
    beta: float = 1.0
    safeguard: float = 2.0
    data_std: float | None = 0.5
    window: int = 0             # rows of the sliding window (window.solve_window); 0: every row, every sweep
    #                             (``make`` fills in N for picard + rows, the documented default)
    freeze: float = 0.1         # window: a row freezes when its change is <= freeze x stop_tol of its noise level

    @staticmethod
    def make(solver: str, stop: str, stop_tol: float | None, max_iter: int | None, steps: int,
             **kw) -> "SolverOptions":
        """Validated options with the documented defaults filled in."""
        if solver not in SOLVERS:
            raise DeqirError(f"unknown solver {solver!r}; choose from serial, {', '.join(SOLVERS)}")
        if stop not in STOP_RULES:
            raise DeqirError(f"unknown stop rule {stop!r}; choose from {', '.join(STOP_RULES)}")
        tol = DEFAULT_STOP_TOL[stop] if stop_tol is None else stop_tol
        if not is_real(tol) or not math.isfinite(tol) or (stop in ("rows", "residual") and tol <= 0):
            raise DeqirError(f"stop_tol must be a finite number (> 0 for '{stop}'), got {stop_tol!r}")
        k = steps if max_iter is None else max_iter
        if not is_int(k) or k < 1:
            raise DeqirError(f"max_iter must be a positive integer, got {max_iter!r}")
        unknown = sorted(set(kw) - {"m", "ridge", "beta", "safeguard", "data_std", "window", "freeze"})
        if unknown:
            raise DeqirError(f"unknown solver option(s) {', '.join(unknown)}; "
                             "valid: m, ridge, beta, safeguard, data_std, window, freeze")
        w = kw.get("window")
        if w is None:       # default: the frozen prefix for picard + rows, plain sweeps otherwise
            kw["window"] = steps if solver == "picard" and stop == "rows" else 0
        elif not is_int(w) or w < 0:
            raise DeqirError(f"window must be a number of rows >= 0 (0: every row every sweep), got {w!r}")
        elif w and (solver != "picard" or stop != "rows"):
            raise DeqirError(f"window={w} needs solver='picard' and stop='rows' (got {solver!r}, {stop!r})")
        elif 0 < w < steps and k < steps:
            raise DeqirError(f"a window of {w} < {steps} rows needs max_iter >= {steps}: stopped earlier, rows "
                             "past the window would never have been evaluated")
        c = kw.get("data_std", SolverOptions.data_std)
        if c is not None and (not is_real(c) or not 0 < c < math.inf):
            raise DeqirError(f"data_std must be a positive number or None, got {c!r}")
        m = kw.get("m", SolverOptions.m)
        if not is_int(m) or m < 1:
            raise DeqirError(f"m (Anderson history) must be an integer >= 1, got {m!r}")
        fr = kw.get("freeze", SolverOptions.freeze)
        if not is_real(fr) or not 0 < fr <= 1:
            raise DeqirError(f"freeze must be a number in (0, 1], got {fr!r}")
        for key, low in (("ridge", 0.0), ("beta", 0.0), ("safeguard", 1.0)):
            v = kw.get(key, getattr(SolverOptions, key))
            if not is_real(v) or not low < v < math.inf:
                raise DeqirError(f"{key} must be a finite number > {low:g}, got {v!r}")
        kw = {key: (None if v is None else (int(v) if key in ("m", "window") else float(v))) for key, v in kw.items()}
        return SolverOptions(solver=solver, stop=stop, stop_tol=float(tol), max_iter=int(k), **kw)


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


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="fixed point", unit="it", leave=False)

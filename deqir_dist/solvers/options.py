"""Solver options: the single home of every solver default, validated."""
from __future__ import annotations

import math
from dataclasses import dataclass

from deqir_dist.errors import DeqirError, is_int, is_real

# restore(), the CLI's --solver (deqir restore, ray-restore), Ray jobs and dataset items: the latency
# model chooses (api.planner; serial unless a parallel solver is predicted faster by a margin)
DEFAULT_SOLVER = "auto"
STOP_RULES = ("final", "rows", "residual", "none")
DEFAULT_STOP_TOL = {"final": 43.0, "rows": 0.03, "residual": 1e-3, "none": 0.0}
TAA_HISTORY = 2     # solver="parataa": ParaTAA's history, two entries (one difference), unless m is given

# noise_gradient (api.inversion): the forward solve and the adjoint solve
FORWARD_STOP = "final"          # the forward fixed point's stop rule ...
DEFAULT_FORWARD_TOL = 80.0      # ... at this many dB (a tight default: gradients)
FORWARD_DATA_STD = None         # the forward's null-space coordinates: the eps form the adjoint is written in
DEFAULT_ADJOINT_TOL = 0.0       # relative adjoint residual; 0: run to the exact end (N evaluations)
ADJOINT_M = 5                   # adjoint Anderson: history entries
ADJOINT_RIDGE = 1e-8            # adjoint Anderson: ridge, relative to the mean Gram diagonal


@dataclass(frozen=True)
class SolverOptions:
    solver: str                 # the chain solver these options run (never "auto": restore resolves it first)
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
        """Validated options with the documented defaults filled in.

        ``solver`` is a name of ``solvers.registry`` (the caller looked it up there: the registry,
        not this module, lists the solvers)."""
        if not isinstance(solver, str) or not solver:
            raise DeqirError(f"solver must be a solver name, got {solver!r}")
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
        if solver == "parataa" and "m" not in kw:
            kw["m"] = TAA_HISTORY
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

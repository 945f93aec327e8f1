"""The solvers by name: the one table that every list of solver choices derives from.

``restore(solver=...)`` (``api.restore.METHODS``), the CLI's ``--solver`` choices and help
(``apps.flags``) and ``noise_gradient``'s ``solver=`` / ``adjoint=`` choices (``api.inversion``)
are all read from ``SOLVERS`` below; nothing else lists solver names.

Shape: ``SOLVERS`` maps a name to a ``SolverEntry``:

* ``name``: what the user passes (``restore(solver=name)``, ``--solver name``);
* ``help``: one line for the CLI's ``--solver`` help;
* ``solve``: the fixed-point solver restore calls, with the signature of ``SolveFn``::

      solve(block, comm, opts, x0=None, progress=False, callback=None, entering=None) -> SolveOutput

  ``block`` a ``sampling.chain.ChainBlock`` (the rows of ``rows(opts)``), ``comm`` a
  ``parallel.comm.Comm`` (``LocalComm`` for one process), ``opts`` the ``SolverOptions``,
  ``x0`` the starting trajectory of the block's rows (None: xi in every row), ``entering``
  a full trajectory for rows that enter later (only solvers that slide use it).
  ``None`` for "serial" (restore runs ``sampling.serial.sample_serial``) and "auto"
  (restore asks the planner, then runs the entry it chose);
* ``all_rows(opts)``: True when every rank's block holds ALL rows of the chain (the sliding
  window re-splits them itself); False (default): rank r holds ``split_rows(N, P)[r]``;
* ``restore``: offered by ``restore`` and the CLI (default True);
* ``inversion``: usable as ``noise_gradient``'s forward solver (its ``solve`` is called with
  a recording block over this rank's rows, stop rule "final", no window);
* ``adjoint``: usable as ``noise_gradient``'s adjoint solver (``solvers.adjoint``).

To add a solver: write ``solvers/<name>.py`` with a ``solve`` of that signature (update rules
plug into ``solvers.driver``), import it here and add one ``SolverEntry`` to ``_ENTRIES``;
the order of ``_ENTRIES`` is the order of the CLI's choices. Its options and their defaults go
in ``solvers.options`` (the single home of every solver default).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from deqir_dist.errors import DeqirError
from deqir_dist.solvers.chain import solve_chain
from deqir_dist.solvers.driver import SolveOutput
from deqir_dist.solvers.options import DEFAULT_SOLVER, SolverOptions
from deqir_dist.solvers.triangular import solve_triangular
from deqir_dist.solvers.window import solve_window


class SolveFn(Protocol):
    def __call__(self, block, comm, opts: SolverOptions, x0: torch.Tensor | None = None,
                 progress: bool = False, callback=None,
                 entering: torch.Tensor | None = None) -> SolveOutput: ...


def _whole_block(opts: SolverOptions) -> bool:
    return False


@dataclass(frozen=True)
class SolverEntry:
    name: str
    help: str
    solve: SolveFn | None = None
    all_rows: Callable[[SolverOptions], bool] = _whole_block
    restore: bool = True
    inversion: bool = False
    adjoint: bool = False


def solve_picard(block, comm, opts: SolverOptions, x0: torch.Tensor | None = None, progress: bool = False,
                 callback=None, entering: torch.Tensor | None = None) -> SolveOutput:
    """Picard: the sliding window (``window.solve_window``) when ``opts.window`` > 0, else full sweeps."""
    if opts.window:
        return solve_window(block, comm, opts, x0=x0, progress=progress, callback=callback, entering=entering)
    return solve_chain(block, comm, opts, x0=x0, progress=progress, callback=callback)


def solve_anderson(block, comm, opts: SolverOptions, x0: torch.Tensor | None = None, progress: bool = False,
                   callback=None, entering: torch.Tensor | None = None) -> SolveOutput:
    """Anderson over the whole block (``chain.solve_chain``); ``entering`` does not apply (nothing slides)."""
    return solve_chain(block, comm, opts, x0=x0, progress=progress, callback=callback)


def _window_rows(opts: SolverOptions) -> bool:
    return opts.window > 0


def _all_rows(opts) -> bool:
    return True


_ENTRIES = (
    SolverEntry("serial", "the reference sampler, one step after another", None,
                inversion=True, adjoint=True),
    SolverEntry("picard", "chain-parallel fixed-point sweeps (sliding window with the rows rule)",
                solve_picard, _window_rows, inversion=True, adjoint=True),
    SolverEntry("anderson", "chain-parallel sweeps with Anderson mixing", solve_anderson,
                inversion=True, adjoint=True),
    SolverEntry("auto", "serial, picard or parareal, whichever the cost model (measured c(b), the benchmarks' K) "
                "predicts is fastest by a margin over serial (on a CPU: almost always serial)", None),
    SolverEntry("parataa", "triangular Anderson (ParaTAA, history m = 2): per-row weights over the noisier "
                "rows (solvers.triangular)", solve_triangular),
    # two-level: restore runs solvers.parareal_dist.run_parareal itself (its own options, no ChainBlock)
    SolverEntry("parareal", "two-level pipelined blocks (--blocks B, --coarse-steps m): coarse jumps predict "
                "each block's start, the blocks' serial steps correct them (solvers.parareal)", None,
                _all_rows),
)

SOLVERS: dict[str, SolverEntry] = {e.name: e for e in _ENTRIES}


def names(purpose: str = "restore") -> tuple[str, ...]:
    """The solver names for ``purpose``: "restore" (restore and the CLI), "inversion" (the
    forward solve of noise_gradient) or "adjoint" (its adjoint solve), in table order."""
    if purpose not in ("restore", "inversion", "adjoint"):
        raise ValueError(f"unknown purpose {purpose!r}")
    return tuple(name for name, e in SOLVERS.items() if getattr(e, purpose))


def get(name: str, purpose: str = "restore", what: str = "solver") -> SolverEntry:
    """The entry of ``name``; DeqirError naming the choices when it is not one for ``purpose``."""
    choices = names(purpose)
    if not isinstance(name, str) or name not in choices:
        raise DeqirError(f"unknown {what} {name!r}; choose from {', '.join(choices)}")
    return SOLVERS[name]


def help_text(purpose: str = "restore") -> str:
    """'name: help; name: help ...' for the CLI (the default, ``options.DEFAULT_SOLVER``, marked)."""
    return "; ".join(f"{n}{' (default)' if n == DEFAULT_SOLVER and purpose == 'restore' else ''}: {SOLVERS[n].help}"
                     for n in names(purpose))

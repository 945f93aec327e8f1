"""``restore``: the public entry point, serial or chain-parallel, one or many processes."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .chain import ChainBlock
from .comm import LocalComm
from .denoiser import EpsFn, model_device
from .errors import DeqirError
from .schedule import chain_coefficients
from .serial import sample_serial
from .solvers import SolverOptions, solve_chain

METHODS = ("serial", "picard", "anderson")


@dataclass
class RestoreResult:
    image: torch.Tensor                  # (B, C, H, W) in the solver dtype (float32 unless asked), [-1, 1], not clipped
    iterations: int                      # joint-map evaluations K (max over images; serial: N)
    iterations_per_image: list[int]
    trace: list[list[float]]             # per iteration, the stopping quantity of each image
    solver: str
    steps: int
    stop: str
    stop_tol: float
    seconds: float
    timings: list = field(default_factory=list)   # per-iteration IterationTiming (parallel only)
    rank_rows: tuple[int, int] | None = None      # rows this process owned (parallel only)


def check_tensor(t, name: str, shape: tuple | None = None) -> torch.Tensor:
    """A floating tensor, finite, of the given shape (None entries match anything)."""
    if not isinstance(t, torch.Tensor):
        raise DeqirError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise DeqirError(f"{name} must be a floating tensor, got {t.dtype}")
    if shape is not None and (t.dim() != len(shape)
                              or any(s is not None and s != d for s, d in zip(shape, t.shape))):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise DeqirError(f"{name} has shape {tuple(t.shape)}, expected {want}")
    if not torch.isfinite(t).all():
        raise DeqirError(f"{name} contains NaN or Inf")
    return t


def draw_noise(batch: int, image_shape, steps: int, nw: float, generator: torch.Generator | None):
    """xi (B, C, H, W) then, when nw > 0, z (B, N, C, H, W): CPU float32 draws, in that order."""
    xi = torch.randn((batch, *image_shape), generator=generator)
    z = torch.randn((batch, steps, *image_shape), generator=generator) if nw > 0 else None
    return xi, z


@torch.no_grad()
def restore(denoiser, y: torch.Tensor, op, steps: int = 25, solver: str = "anderson",
            noise: torch.Tensor | None = None, etw: float = 0.0, nw: float = 0.0, start: int = 1000,
            stop: str = "final", stop_tol: float | None = None, max_iter: int | None = None,
            generator: torch.Generator | None = None, alphas_cumprod: torch.Tensor | None = None,
            sigma_y: float = 0.0, step_noise: torch.Tensor | None = None, init: torch.Tensor | None = None,
            progress: bool = False, callback=None, dtype: torch.dtype = torch.float32,
            **solver_options) -> RestoreResult:
    """Restore images from measurements y = A(x) (+ noise of std sigma_y).

    denoiser(x, t) -> eps (C or 2C channels); y (B, *op.measurement_shape); op from
    ``make_operator``. solver "serial" runs the N steps one after another; "picard" and
    "anderson" solve the joint fixed point over all N rows (see ``solvers``). ``noise`` is xi
    (B, C, H, W) and ``step_noise`` the z rows (B, N, C, H, W); missing ones are drawn from
    ``generator`` (xi first). ``init`` warm-starts the parallel solvers with a trajectory
    (B, N, C, H, W). Extra keyword arguments (m, ridge, beta, safeguard) tune Anderson.
    """
    if solver not in METHODS:
        raise DeqirError(f"unknown solver {solver!r}; choose from {', '.join(METHODS)}")
    coeffs = chain_coefficients(steps, start, etw, nw, sigma_y, alphas_cumprod)
    image_shape = tuple(op.image_shape)
    y = check_tensor(y, "y", (None, *op.measurement_shape))
    batch = y.shape[0]
    if noise is None or (step_noise is None and nw > 0):
        xi_draw, z_draw = draw_noise(batch, image_shape, steps, nw, generator)
        noise = xi_draw if noise is None else noise
        step_noise = z_draw if step_noise is None else step_noise
    noise = check_tensor(noise, "noise", (batch, *image_shape))
    if nw > 0:
        step_noise = check_tensor(step_noise, "step_noise", (batch, steps, *image_shape))
    device = model_device(denoiser, default=y.device)
    xi = noise.to(device=device, dtype=dtype)
    y = y.to(device=device, dtype=dtype)
    eps_fn = EpsFn(denoiser, image_shape[0], dtype)
    t0 = time.perf_counter()
    if solver == "serial":
        out = sample_serial(eps_fn, op, coeffs, y, xi, step_noise, progress=progress, callback=callback)
        return RestoreResult(out, steps, [steps] * batch, [], "serial", steps, "none", 0.0,
                             time.perf_counter() - t0)
    opts = SolverOptions.make(solver, stop, stop_tol, max_iter, steps, **solver_options)
    comm = LocalComm()
    lo, hi = 0, steps
    block = ChainBlock(eps_fn, op, coeffs, y, xi, lo, hi,
                       None if step_noise is None else step_noise[:, lo:hi])
    x0 = None
    if init is not None:
        x0 = check_tensor(init, "init", (batch, steps, *image_shape))[:, lo:hi].to(device=device, dtype=dtype)
    sol = solve_chain(block, comm, opts, x0=x0, progress=progress, callback=callback)
    return RestoreResult(sol.final, max(sol.iterations), sol.iterations, sol.trace, solver, steps,
                         opts.stop, opts.stop_tol, time.perf_counter() - t0, sol.timings, (lo, hi))

"""``restore``: the public entry point, serial or chain-parallel, one or many processes."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from deqir_dist.api.planner import choose_solver, cost_table, load_profile, measure_cost
from deqir_dist.errors import DeqirError, check_int, check_tensor
from deqir_dist.parallel.comm import LocalComm, offset_split, split_rows
from deqir_dist.parallel.dist import DistComm, check_same_inputs, problem_digest
from deqir_dist.sampling.chain import ChainBlock, block_decays
from deqir_dist.sampling.denoiser import EpsFn, model_device
from deqir_dist.sampling.noise import draw_noise
from deqir_dist.sampling.schedule import chain_coefficients, linear_alphas_cumprod
from deqir_dist.sampling.serial import coarse_trajectory, sample_serial
from deqir_dist.solvers.chain import solve_chain
from deqir_dist.solvers.options import SolverOptions
from deqir_dist.solvers.window import solve_window

METHODS = ("serial", "picard", "anderson", "auto")


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
    rank_rows: tuple[int, int] | None = None      # rows [lo, hi) this process owned (parallel only;
    #                                               with a window: in the first sweep, the most it holds)
    state_rows: int | None = None                 # rows of chain state this process held
    plan: dict | None = None                      # solver="auto": the prediction it chose by

    @property
    def images(self) -> torch.Tensor:
        """(B, C, H, W) float32 on the CPU, clipped to the valid range [-1, 1]."""
        return self.image.detach().to("cpu", torch.float32).clamp(-1, 1)

    def to_pil(self) -> list:
        """One 8-bit PIL image per restored image (RGB, or L for one channel)."""
        from PIL import Image
        u8 = ((self.images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in u8]


def check_settings(steps: int, solver: str = "picard", start: int = 1000, etw: float = 0.0, nw: float = 0.0,
                   sigma_y: float = 0.0, stop: str = "rows", stop_tol: float | None = None,
                   max_iter: int | None = None, alphas_cumprod=None, warm_start: int = 1, profile=None,
                   clip_x0: bool = False, **solver_options):
    """Validate the sampler settings (DeqirError on bad ones): (ChainCoefficients, SolverOptions | None).

    ``solver="auto"`` is validated as "picard" (what it may choose besides serial)."""
    if solver not in METHODS:
        raise DeqirError(f"unknown solver {solver!r}; choose from {', '.join(METHODS)}")
    if solver == "auto":
        solver = "picard"
    check_int("warm_start", warm_start, 0)
    if not isinstance(clip_x0, bool):
        raise DeqirError(f"clip_x0 must be True or False, got {clip_x0!r}")
    coeffs = chain_coefficients(steps, start, etw, nw, sigma_y, alphas_cumprod)
    if warm_start > coeffs.steps:
        raise DeqirError(f"warm_start={warm_start} is more than the {coeffs.steps} steps of the chain")
    # the serial sampler ignores the solver options, but a typo in them is still an error
    opts = SolverOptions.make("picard" if solver == "serial" else solver, stop, stop_tol, max_iter, coeffs.steps,
                              **solver_options)
    return coeffs, (None if solver == "serial" else opts)


@torch.no_grad()
def restore(denoiser, y: torch.Tensor, op, steps: int = 25, solver: str = "picard",
            noise: torch.Tensor | None = None, etw: float = 0.0, nw: float = 0.0, start: int = 1000,
            stop: str = "rows", stop_tol: float | None = None, max_iter: int | None = None,
            generator: torch.Generator | None = None, alphas_cumprod: torch.Tensor | None = None,
            sigma_y: float = 0.0, step_noise: torch.Tensor | None = None, init: torch.Tensor | None = None,
            warm_start: int = 1, progress: bool = False, callback=None, dtype: torch.dtype = torch.float32,
            distributed: bool = False, group=None, profile=None, clip_x0: bool = False,
            **solver_options) -> RestoreResult:
    """Restore images from measurements y = A(x) (+ noise of std sigma_y).

    denoiser(x, t) -> eps (C or 2C channels); y (B, *op.measurement_shape); op from
    ``make_operator``. solver "serial" runs the N steps one after another; "picard" and
    "anderson" solve the joint fixed point over all N rows (see ``solvers``). ``noise`` is xi
    (B, C, H, W) and ``step_noise`` the z rows (B, N, C, H, W); missing ones are drawn from
    ``generator`` (xi first). ``init`` warm-starts the parallel solvers with a trajectory
    (B, N, C, H, W); ``warm_start=S`` builds one from a deterministic serial pass over S of the
    N timesteps (S single-row denoiser calls, not counted in K; every rank computes it).
    ``callback(k, image_ids, rows, q)``, for every solver, sees the newest estimate after
    evaluation (parallel) or step (serial) k = 0, 1, ...: for picard / anderson the final rows of
    the active images ``image_ids`` and their stopping quantities q (on the rank holding the final
    row); for serial the state h_{k+1} of every image, with q = None.
    Extra keyword arguments: ``data_std`` (the null-space coordinates of the joint map,
    ``schedule.null_coordinates``; None: DeqIR's prefix sum of eps), ``window`` (picard with the
    "rows" rule: rows of the sliding window, ``window.solve_window``; default N, the settled
    prefix is frozen and nothing slides; 0: every row in every sweep), ``freeze`` (window: a row
    freezes once its change is <= freeze x stop_tol of its noise level; default 0.1), and m, ridge, beta,
    safeguard tune Anderson. The default stop rule is "rows" (see ``solvers``).

    ``clip_x0=True`` clamps every x0 prediction to [-1, 1] inside the denoiser (``EpsFn``): all
    solvers then share the clipped trajectory. DDNM/DeqIR do not clip; it keeps the null space
    from running away with a weak prior (the built-in one on colorisation).

    ``solver="auto"`` picks serial or picard from the cost model of DESIGN section 5 with
    measured c(b): ``profile`` (a dict {b: ms} or a JSON file from ``deqir bench --profile``),
    or, in a single process without one, two quick timings of this denoiser on this input size.

    ``distributed=True`` (inside an initialised torch.distributed group, or ``group``): this
    rank owns a contiguous block of the rows and evaluates the denoiser on them only; every
    rank must pass the same inputs (checked) and every rank returns the same image. The serial
    solver runs in full on every rank.
    """
    plan = None
    if dtype not in (torch.float32, torch.float64):
        raise DeqirError(f"dtype is the precision of the chain state: torch.float32 or torch.float64, got {dtype!r} "
                         "(the denoiser runs in its own precision)")
    if solver == "auto":    # validate before the planner times anything
        check_settings(steps, solver, start, etw, nw, sigma_y, stop, stop_tol, max_iter, alphas_cumprod, warm_start,
                       clip_x0=clip_x0, **solver_options)
        solver, plan = _plan(denoiser, op, steps, profile, distributed, group, stop == "rows")
        if solver == "picard" and stop == "rows" and "window" not in solver_options and \
                (max_iter is None or max_iter >= steps or plan["window"] >= steps):
            solver_options["window"] = plan["window"]
    coeffs, opts = check_settings(steps, solver, start, etw, nw, sigma_y, stop, stop_tol, max_iter,
                                  alphas_cumprod, warm_start, clip_x0=clip_x0, **solver_options)
    steps = coeffs.steps
    image_shape = tuple(op.image_shape)
    y = check_tensor(y, "y", (None, *op.measurement_shape))
    batch = y.shape[0]
    if batch < 1:
        raise DeqirError("y holds no images (a batch of 0)")
    device = model_device(denoiser, default=y.device)
    comm, blocks = LocalComm(), [(0, steps)]
    if distributed and solver != "serial":
        comm = DistComm(group, device)
        if comm.size == 1:
            comm = LocalComm()          # P = 1: the same code, no collectives
        elif comm.size > steps:
            raise DeqirError(f"{comm.size} ranks for a chain of {steps} rows: use at most one rank per row")
        else:
            blocks = split_rows(steps, comm.size)
            comm.block_decays = block_decays(coeffs, blocks, opts.data_std)
    lo, hi = (0, steps) if opts is not None and opts.window else blocks[comm.rank]   # a window holds all rows
    z_check = None
    if step_noise is not None:
        step_noise = check_tensor(step_noise, "step_noise", (batch, steps, *image_shape))
        z_check = [float(step_noise.double().sum()), float(step_noise.double().abs().sum())]
        step_noise = step_noise[:, lo:hi]
    if noise is None or (step_noise is None and nw > 0):
        xi_draw, z_draw = draw_noise(batch, image_shape, steps, nw, generator, (lo, hi))
        noise = xi_draw if noise is None else noise
        step_noise = z_draw if step_noise is None else step_noise
    noise = check_tensor(noise, "noise", (batch, *image_shape))
    xi = noise.to(device=device, dtype=dtype)
    y = y.to(device=device, dtype=dtype)
    abar = (linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod) if clip_x0 else None
    eps_fn = EpsFn(denoiser, image_shape[0], dtype, clip_abar=abar)
    t0 = time.perf_counter()
    if solver == "serial":
        step_cb = None if callback is None else (lambda i, h: callback(i - 1, list(range(batch)), h, None))
        out = sample_serial(eps_fn, op, coeffs, y, xi, step_noise, progress=progress, callback=step_cb)
        return RestoreResult(out, steps, [steps] * batch, [], "serial", steps, "none", 0.0,
                             time.perf_counter() - t0, plan=plan)
    if comm.size > 1:
        config = {"steps": steps, "start": start, "etw": etw, "nw": nw, "sigma_y": sigma_y, "dtype": str(dtype),
                  "clip_x0": clip_x0,
                  "options": opts.__dict__, "a": coeffs.a.tolist(), "z": z_check}
        check_same_inputs(comm, problem_digest(y, xi, op, config))
    block = ChainBlock(eps_fn, op, coeffs, y, xi, lo, hi, step_noise, opts.data_std)
    x0 = None
    if init is not None:
        x0 = check_tensor(init, "init", (batch, steps, *image_shape))[:, lo:hi].to(device=device, dtype=dtype)
    elif warm_start:
        x0 = coarse_trajectory(eps_fn, op, coeffs, warm_start, y, xi, alphas_cumprod)[:, lo:hi]
    if opts.window:     # a given trajectory also seeds the rows that enter the window later
        sol = solve_window(block, comm, opts, x0=x0, progress=progress, callback=callback,
                           entering=x0 if init is not None else None)
    else:
        sol = solve_chain(block, comm, opts, x0=x0, progress=progress, callback=callback)
    owned = offset_split(0, min(opts.window, steps), comm.size)[comm.rank] if opts.window else (lo, hi)
    return RestoreResult(sol.final, max(sol.iterations), sol.iterations, sol.trace, solver, steps,
                         opts.stop, opts.stop_tol, time.perf_counter() - t0, sol.timings, owned,
                         sol.state_rows, plan)



def _plan(denoiser, op, steps: int, profile, distributed: bool, group, windows: bool) -> tuple[str, dict]:
    """solver="auto": serial or picard, whichever the latency model predicts is faster."""
    procs = 1
    if distributed:
        import torch.distributed as dist
        procs = dist.get_world_size(group)
    if profile is None:
        if procs > 1:
            raise DeqirError("solver='auto' with distributed=True needs a cost profile (deqir bench --profile), "
                             "so that every rank makes the same choice")
        c_ms = measure_cost(denoiser, tuple(op.image_shape), batches=(1, steps), repeats=3, warmup=1)
    elif isinstance(profile, dict):
        c_ms = cost_table(profile, "profile")
    else:
        c_ms = load_profile(profile)
    choice, prediction = choose_solver(c_ms, steps, procs, windows=windows)
    return choice, {**prediction, "chosen": choice, "c_ms": c_ms}

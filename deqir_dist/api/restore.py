"""``restore``: the public entry point, serial or chain-parallel, one or many processes."""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field

import torch

from deqir_dist.api import k_observed
from deqir_dist.api.budget import plan_budget, solver_rows
from deqir_dist.api.conventions import (
    apply_value_range,
    canvas,
    diffusers_names,
    place_model,
    resolve_eta,
    sampling_problem,
)
from deqir_dist.api.planner import choose_solver, cost_table, load_profile, profile_batches, serial_is_certain
from deqir_dist.api.profile_cache import cost_until_decided, plan_reason
from deqir_dist.errors import DeqirError, check_int, check_tensor, one_line
from deqir_dist.parallel.comm import LocalComm, offset_split, split_rows
from deqir_dist.models.scheduled import as_denoiser, chain_schedule
from deqir_dist.models.settings import LIBRARY_DEFAULTS, resolve_settings
from deqir_dist.models.tiled import TiledDenoiser
from deqir_dist.parallel.dist import DistComm, check_same_inputs, problem_digest
from deqir_dist.sampling.chain import ChainBlock, block_decays
from deqir_dist.sampling.denoiser import EpsFn
from deqir_dist.sampling.noise import draw_noise
from deqir_dist.sampling.schedule import TRAIN_STEPS, chain_coefficients
from deqir_dist.sampling.serial import coarse_trajectory, sample_serial
from deqir_dist.solvers import registry
from deqir_dist.solvers.options import DEFAULT_SOLVER, SolverOptions
from deqir_dist.solvers.parareal import PararealOptions
from deqir_dist.solvers.parareal_dist import run_parareal

METHODS = registry.names("restore")     # ("serial", "picard", "anderson", "auto", ...): solvers.registry


@dataclass(repr=False)
class RestoreResult:
    """What :func:`restore` returns. Fields:

    * ``image``: (B, C, H, W) restored images in the solver's dtype, in [-1, 1], not clipped
      (``images``: float32 on the CPU, clipped; ``to_pil()``: 8-bit PIL images).
    * ``iterations``: joint-map evaluations K (the most over the images; serial: N);
      ``iterations_per_image``: K of each; ``trace``: per iteration, each image's stopping quantity.
    * ``solver``, ``steps``, ``stop``, ``stop_tol``: what ran (solver "auto": the solver it chose).
    * ``seconds``: the sampling (solver "auto": its planning, the model timed, is ``plan["seconds"]``).
    * ``timings``: per-iteration IterationTiming (parallel solvers; parareal: its coarse pass first).
    * ``rank_rows``, ``state_rows``: the rows [lo, hi) this process owned and held (parallel only).
    * ``plan``: solver "auto": the prediction it chose by (K, modelled times, the reason).
    * ``settings`` / ``settings_source``: the sampler settings used (steps, etw, nw, clip_x0,
      sigma_y) and where each came from ("user", the model card, ...).
    * ``blocks``, ``coarse_steps``, ``critical_path_calls``, ``denoiser_calls``: parareal's B, m
      and its schedule (``solvers.parareal.parareal_schedule``).
    """

    image: torch.Tensor                  # (B, C, H, W) in the solver dtype (float32 unless asked), [-1, 1], not clipped
    iterations: int                      # joint-map evaluations K (max over images; serial: N)
    iterations_per_image: list[int]
    trace: list[list[float]]             # per iteration, the stopping quantity of each image
    solver: str
    steps: int
    stop: str
    stop_tol: float
    seconds: float                       # the sampling (solver="auto": its planning, the model timed, is plan["seconds"])
    timings: list = field(default_factory=list)   # per-iteration IterationTiming (parallel only;
    #                                               parareal: [0] its coarse pass, then one per iteration)
    rank_rows: tuple[int, int] | None = None      # rows [lo, hi) this process owned (parallel only;
    #                                               with a window: in the first sweep, the most it holds)
    state_rows: int | None = None                 # rows of chain state this process held
    plan: dict | None = None                      # solver="auto": the prediction it chose by
    settings: dict = field(default_factory=dict)  # the sampler settings used (steps, etw, nw, clip_x0, sigma_y)
    settings_source: dict = field(default_factory=dict)   # where each came from: "user", a model card, ...
    blocks: int | None = None                     # parareal: B, m, and of the schedule that ran (max K; pipelined,
    coarse_steps: int | None = None               # one batch-1 call as the unit): the critical path and the
    critical_path_calls: float | None = None      # denoiser calls per image (solvers.parareal.parareal_schedule)
    denoiser_calls: int | None = None
    budget: dict | None = None                    # the memory and time estimate checked before any work
    #                                               (api.budget.Budget.as_dict(); tile set: restored in tiles)

    def __repr__(self) -> str:              # the fields that say what ran, never the tensor's values
        shape = "x".join(map(str, self.image.shape)) if isinstance(self.image, torch.Tensor) else "?"
        return (f"RestoreResult(image=<{shape} {str(getattr(self.image, 'dtype', '?')).replace('torch.', '')}>, "
                f"solver={self.solver!r}, steps={self.steps}, iterations={self.iterations}, "
                f"seconds={self.seconds:.3f})")

    @property
    def images(self) -> torch.Tensor:
        """(B, C, H, W) float32 on the CPU, clipped to the valid range [-1, 1]."""
        return self.image.detach().to("cpu", torch.float32).clamp(-1, 1)

    def to_pil(self) -> list:
        """One 8-bit PIL image per restored image (RGB, or L for one channel)."""
        from PIL import Image
        u8 = ((self.images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in u8]


def check_settings(steps: int | None = None, solver: str = DEFAULT_SOLVER, start: int = 1000, etw: float | None = None,
                   nw: float | None = None, sigma_y: float = 0.0, stop: str = "rows", stop_tol: float | None = None,
                   max_iter: int | None = None, alphas_cumprod=None, warm_start: int = 1, profile=None,
                   clip_x0: bool | None = None, spacing: str = "leading", offset: int = 0, **solver_options):
    """Validate the sampler settings (DeqirError on bad ones): (ChainCoefficients, SolverOptions | None).

    ``solver="auto"`` (the default) is validated as "picard" (the options it may run with). None (not
    given) stands for ``settings.LIBRARY_DEFAULTS``; ``restore`` resolves None from the model card."""
    steps, etw, nw, clip_x0 = (LIBRARY_DEFAULTS[k] if v is None else v
                               for k, v in (("steps", steps), ("etw", etw), ("nw", nw), ("clip_x0", clip_x0)))
    registry.get(solver)            # DeqirError naming the choices
    if solver == "auto":
        solver = "picard"
    check_int("warm_start", warm_start, 0)
    if not isinstance(clip_x0, bool):
        raise DeqirError(f"clip_x0 must be True or False, got {clip_x0!r}")
    start = TRAIN_STEPS if start is None else start
    coeffs = chain_coefficients(steps, start, etw, nw, sigma_y, alphas_cumprod, spacing, offset)
    if warm_start > coeffs.steps:
        raise DeqirError(f"warm_start={warm_start} is more than the {coeffs.steps} steps of the chain")
    if solver == "parareal":            # its own options (solvers.parareal)
        return coeffs, PararealOptions.make(coeffs.steps, stop=stop, stop_tol=stop_tol, max_iter=max_iter,
                                            **solver_options)
    # the serial sampler ignores the solver options, but a typo in them is still an error
    opts = SolverOptions.make("picard" if solver == "serial" else solver, stop, stop_tol, max_iter, coeffs.steps,
                              **solver_options)
    return coeffs, (None if solver == "serial" else opts)


_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _allocator_errors_are_one_line(fn):
    """An allocation failure anywhere in ``fn`` (torch's CPU or CUDA allocator, Python's) becomes
    a one-line DeqirError: the estimate is a model, and another process may take the memory."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (_OOM, MemoryError) as e:
            raise DeqirError(f"out of memory while restoring: {one_line(e)}; lower --max-memory "
                             "(max_memory=) to have the estimate tile or refuse sooner") from None
        except RuntimeError as e:
            if "can't allocate memory" not in str(e) and "out of memory" not in str(e).lower():
                raise
            raise DeqirError(f"out of memory while restoring: {one_line(e)}; lower --max-memory "
                             "(max_memory=) to have the estimate tile or refuse sooner") from None
    return wrapped


@_allocator_errors_are_one_line
@torch.no_grad()
def restore(denoiser, y: torch.Tensor, op, steps: int | None = None, solver: str = DEFAULT_SOLVER,
            noise: torch.Tensor | None = None, etw: float | None = None, nw: float | None = None, start: int | None = None,
            stop: str = "rows", stop_tol: float | None = None, max_iter: int | None = None,
            generator: torch.Generator | None = None, alphas_cumprod: torch.Tensor | None = None,
            sigma_y: float = 0.0, step_noise: torch.Tensor | None = None, init: torch.Tensor | None = None,
            warm_start: int = 1, progress: bool = False, callback=None, dtype: torch.dtype = torch.float32,
            distributed: bool = False, group=None, profile=None, clip_x0: bool | None = None,
            eta: float | None = None, device=None, value_range=None, scheduler=None, prediction_type: str | None = None,
            max_memory=None, tile=None, max_time=None, plan_only: bool = False,
            **solver_options) -> RestoreResult:
    """Restore images from measurements y = A(x) (+ noise of std sigma_y).

    denoiser(x, t) -> eps (C or 2C channels); y (B, *op.measurement_shape); op from
    ``make_operator``. solver "auto" (the default) asks the latency model which of the others is
    fastest here (below); "serial" runs the N steps one after another; "picard" and
    "anderson" solve the joint fixed point over all N rows (see ``solvers``); "parareal" cuts the
    rows into ``blocks`` B (default N / 5) whose starts ``coarse_steps`` m DDNM jumps per
    block predict and the blocks' serial steps correct (``solvers.parareal``: K = B is the serial
    answer; stop "final" at 40 dB by default, restore's stop="rows" included; with
    ``distributed=True`` one block per rank, pipelined; the result's ``blocks``, ``coarse_steps``,
    ``critical_path_calls`` and ``denoiser_calls`` describe the schedule that ran). ``noise`` is xi
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

    ``steps``, ``etw``, ``nw`` and ``clip_x0`` left at None take the model's recommended settings
    (its card: ``denoiser.sampler_card``, see ``models.settings``; else etw = nw = 0, no clip,
    25 steps); ``result.settings`` / ``result.settings_source`` say what was used and why.
    ``sigma_y > 0``: the operator drops the directions the noise swamps and the range-space
    target is the Tikhonov estimate (``Operator.for_noise`` / ``filter_measurement``). An image
    size that is not a multiple of ``denoiser.size_multiple`` is padded (``PaddedOperator``: the
    padding is null space) and the result cropped back; ``noise``, ``step_noise`` and ``init``
    then have the padded size.

    ``solver="auto"`` (the default) picks serial, picard or parareal from the cost model of
    docs/design.md section 5 with measured c(b) and the K the benchmarks measured (shipped in
    ``api/planner_k``): ``profile`` (a dict {b: ms} or a JSON file from ``deqir bench --profile``),
    or, without one, a few timings of this denoiser on this input size, taken once per model,
    device, dtype and size and cached (``api.profile_cache``). A parallel solver must beat serial
    by a margin (``planner.MARGIN``); on a CPU that is rare, so auto mostly runs serial there.
    ``result.solver`` is what ran, ``result.plan`` why. With ``distributed=True`` rank 0 alone
    times (or reads the profile) and decides; every rank runs its choice.

    ``distributed=True`` (inside an initialised torch.distributed group, or ``group``): this
    rank owns a contiguous block of the rows and evaluates the denoiser on them only; every
    rank must pass the same inputs (checked) and every rank returns the same image. The serial
    solver runs in full on every rank.

    Conventions (``api.conventions``): ``eta`` is diffusers' name for ``etw`` (default 0);
    ``device`` runs the chain there (a torch module elsewhere is moved, in place); y is in
    [-1, 1]: data that looks like [0, 1] is warned about, ``value_range=(0, 1)`` converts it.
    A model returning an object with a ``.sample`` tensor (diffusers) is unwrapped.

    Schedules and prediction types (``models.scheduled``): the chain runs on the model's own
    schedule (a diffusers folder's scheduler, a pipeline's ``.scheduler``), or on ``scheduler``
    (a diffusers scheduler, its config dict, or a scheduler_config.json path) given here: betas,
    ``num_train_timesteps`` (the default ``start``), ``timestep_spacing``, ``clip_sample`` (the
    default of clip_x0) and ``prediction_type`` (epsilon, v_prediction, sample; or given alone),
    turned into eps exactly. ``alphas_cumprod`` given wins; ``start`` not given is the schedule's
    length. ``result.settings["schedule"]`` records it when it is not the library's linear-1000.
    ``model`` may be a pipeline-like object (``.unet`` and ``.scheduler``); ``num_inference_steps``
    is diffusers' name for ``steps``.

    Memory (``api.budget``): before any work the restore's peak memory and time are estimated
    from the canvas, the model's measured cost per pixel and the rows the solver holds, and
    checked against ``max_memory`` (the peak resident size allowed: bytes or "6G"; default half
    the available memory, or less under a cgroup or ``ulimit -v``). ``tile`` None: a canvas that
    does not fit whole is restored in overlapping tiles of the model's native size
    (``models.tiled.TiledDenoiser``: one chain, the tiles' eps blended at every step) when the
    model is fully convolutional, else refused in one line naming the size that fits; ``tile=0``
    never tiles; ``tile=P`` always tiles at P pixels. ``result.budget`` is the estimate.
    ``max_time`` caps the work the same way: a restore whose modelled time is over it (minutes, or
    "90m", "3h"; default ``api.budget.DEFAULT_MAX_MINUTES``, 3 h; 0: no cap) is refused in one line
    naming the size and the steps that fit. An allocation failure anyway is a one-line DeqirError.

    ``plan_only=True`` stops once the solver is decided (with ``distributed=True``, auto's plan
    is collective): the result has ``solver``, ``plan`` and ``budget`` and an empty ``image``
    (``dataset.items`` deals serial images over torchrun's ranks with it).
    """
    plan = None
    denoiser = as_denoiser(denoiser, scheduler, prediction_type, alphas_cumprod)
    steps = diffusers_names(steps, solver_options)      # num_inference_steps, output_type (api.conventions)
    given = {"steps": steps, "etw": etw if etw is not None else eta, "nw": nw, "clip_x0": clip_x0,
             "alphas_cumprod": alphas_cumprod, "start": start}
    settings, sources = resolve_settings(denoiser, getattr(op, "name", None), given)
    alphas_cumprod, start, spacing, offset, _, _ = chain_schedule(denoiser, alphas_cumprod, start)
    steps, etw, nw, clip_x0 = (settings[k] for k in ("steps", "etw", "nw", "clip_x0"))
    k_settings = {**settings, "chain": k_observed.chain_id(start, alphas_cumprod, spacing, offset)}
    etw = resolve_eta(etw, eta)
    y, sigma_y = apply_value_range(y, op, value_range, sigma_y)
    device = place_model(denoiser, device, y.device)
    if dtype not in (torch.float32, torch.float64):
        raise DeqirError(f"dtype is the precision of the chain state: torch.float32 or torch.float64, got {dtype!r} "
                         "(the denoiser runs in its own precision)")
    y = check_tensor(y, "y", (None, *op.measurement_shape))
    if y.shape[0] < 1:
        raise DeqirError("y holds no images (a batch of 0)")
    dcomm = None
    check_settings(steps, solver, start, etw, nw, sigma_y, stop, stop_tol, max_iter, alphas_cumprod, warm_start,
                   clip_x0=clip_x0, spacing=spacing, offset=offset, **solver_options)   # before the estimate times the model
    budget = _memory_plan(denoiser, op, y.shape[0], steps, solver, dtype, max_memory, tile, device, solver_options,
                          max_time)
    if budget.tile:
        denoiser = TiledDenoiser(denoiser, budget.canvas[1:], budget.tile, budget.overlap, budget.tiles_per_call)
        if solver == "auto" and profile is None:     # modelled: timing every tile of a row would be the work
            profile = {b: b * budget.ms_per_call / budget.batch for b in (1, 2, 4, steps)}
    if solver == "auto":    # validate before the planner times anything
        if distributed:
            dcomm = DistComm(group, device)
        t_plan = time.perf_counter()
        solver, plan = _plan(denoiser, op, steps, profile, dcomm, etw, stop, max_iter, "window" in solver_options,
                             k_settings, budget.probe_batches)
        plan["seconds"] = round(time.perf_counter() - t_plan, 4)    # timing the model (or reading its profile)
        solver_options = apply_plan(solver, plan, stop, max_iter, steps, solver_options)
        if solver != "serial":     # the plan's rows, checked again
            cap_s = budget.max_seconds
            budget = _memory_plan(denoiser, op, y.shape[0], steps, solver, dtype, max_memory, 0, device,
                                  solver_options, 0)    # its time: predicted below serial's, checked above
            budget.max_seconds = cap_s
    if plan_only:
        return RestoreResult(torch.empty(0), 0, [], [], solver, steps, stop, 0.0, 0.0, plan=plan, settings=settings,
                             settings_source=sources, budget=budget.as_dict())
    coeffs, opts = check_settings(steps, solver, start, etw, nw, sigma_y, stop, stop_tol, max_iter,
                                  alphas_cumprod, warm_start, clip_x0=clip_x0, spacing=spacing, offset=offset,
                                  **solver_options)
    steps = coeffs.steps
    batch = y.shape[0]
    settings["sigma_y"], sources["sigma_y"] = float(sigma_y), "user"
    # sigma_y > 0: the directions the noise swamps go to the prior; any size: the model's canvas
    task_op = op
    op, y, crop = sampling_problem(denoiser, op, y, sigma_y)
    image_shape = tuple(op.image_shape)
    if distributed and solver == "serial" and isinstance(denoiser, TiledDenoiser) and tile:
        denoiser.shard(group)      # tile given, so every rank tiles alike: each call's tiles are split
    comm, blocks = LocalComm(), [(0, steps)]
    if distributed and solver != "serial":
        comm = dcomm or DistComm(group, device)
        if comm.size == 1:
            comm = LocalComm()          # P = 1: the same code, no collectives
        elif comm.size > steps:
            raise DeqirError(f"{comm.size} ranks for a chain of {steps} rows: use at most one rank per row")
        else:
            blocks = split_rows(steps, comm.size)
            comm.block_decays = block_decays(coeffs, blocks, opts.data_std)
    entry = registry.get(solver)
    all_rows = opts is not None and entry.all_rows(opts)
    lo, hi = (0, steps) if all_rows else blocks[comm.rank]   # a window holds all rows
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
    eps_fn = EpsFn.for_chain(denoiser, image_shape[0], dtype, clip_x0, alphas_cumprod)
    t0 = time.perf_counter()

    def learn(k: int) -> None:      # the planner's regime: what auto will plan with next time (api.k_observed)
        pid = k_observed.run_plan_id(solver, opts, steps)
        if pid and comm.rank == 0 and stop == "rows" and stop_tol is None and max_iter is None:
            k_observed.record(denoiser, task_op, k_settings, pid, int(k))
    if solver == "serial":
        step_cb = None if callback is None else (lambda i, h: callback(i - 1, list(range(batch)), h, None))
        out = sample_serial(eps_fn, op, coeffs, y, xi, step_noise, progress=progress, callback=step_cb)
        return RestoreResult(crop(out), steps, [steps] * batch, [], "serial", steps, "none", 0.0,
                             time.perf_counter() - t0, plan=plan, settings=settings, settings_source=sources,
                             budget=budget.as_dict())
    if comm.size > 1:
        config = {"steps": steps, "start": start, "etw": etw, "nw": nw, "sigma_y": sigma_y, "dtype": str(dtype),
                  "clip_x0": clip_x0,
                  "options": opts.__dict__, "a": coeffs.a.tolist(), "z": z_check}
        check_same_inputs(comm, problem_digest(y, xi, op, config))
    if solver == "parareal":            # solvers.parareal: its own propagators over blocks of rows
        if init is not None:
            raise DeqirError("init (a starting trajectory) does not apply to solver='parareal'")
        sol = run_parareal(eps_fn, op, coeffs, y, xi, opts, step_noise, comm, callback=callback)
        learn(max(sol.iterations))
        return RestoreResult(crop(sol.final), max(sol.iterations), sol.iterations, sol.trace, solver, steps,
                             opts.stop, opts.stop_tol, time.perf_counter() - t0, plan=plan, settings=settings,
                             settings_source=sources, blocks=opts.blocks, coarse_steps=opts.coarse_steps,
                             critical_path_calls=sol.critical_path, denoiser_calls=sol.schedule_calls,
                             timings=sol.timings, budget=budget.as_dict())
    block = ChainBlock(eps_fn, op, coeffs, y, xi, lo, hi, step_noise, opts.data_std)
    x0 = None
    if init is not None:
        x0 = check_tensor(init, "init", (batch, steps, *image_shape))[:, lo:hi].to(device=device, dtype=dtype)
    elif warm_start:
        x0 = coarse_trajectory(eps_fn, op, coeffs, warm_start, y, xi, alphas_cumprod)[:, lo:hi]
    # a given trajectory also seeds the rows that enter a sliding window later
    sol = entry.solve(block, comm, opts, x0=x0, progress=progress, callback=callback,
                      entering=x0 if init is not None else None)
    learn(max(sol.iterations))
    owned = offset_split(0, min(opts.window, steps), comm.size)[comm.rank] if opts.window else (lo, hi)
    return RestoreResult(crop(sol.final), max(sol.iterations), sol.iterations, sol.trace, solver, steps,
                         opts.stop, opts.stop_tol, time.perf_counter() - t0, sol.timings, owned,
                         sol.state_rows, plan, settings, sources, budget=budget.as_dict())


def apply_plan(solver: str, plan: dict, stop: str, max_iter: int | None, steps: int, solver_options: dict) -> dict:
    """The solver options ``restore`` runs auto's choice with: picard over the planner's window (the
    rows rule, unless the user gave one or a max_iter too short for it), parareal with its (B, m)."""
    out = dict(solver_options)
    if solver == "picard" and stop == "rows" and "window" not in out and \
            (max_iter is None or max_iter >= steps or plan["window"] >= steps):
        out["window"] = plan["window"]
    if solver == "parareal":
        out.setdefault("blocks", plan["blocks"])
        out.setdefault("coarse_steps", plan["coarse_steps"])
    return out


def plan_auto(denoiser, op, procs: int = 1, profile=None, steps: int = 25, etw: float | None = None,
              stop: str = "rows", max_iter: int | None = None, window_given: bool = False,
              settings: dict | None = None, max_batch: int | None = None) -> tuple[str, dict]:
    """What ``restore(solver="auto")`` chooses for ``op`` on ``procs`` devices, in one process and
    without restoring: (choice, plan). ``steps`` and ``etw`` as restore resolved them (the model
    card's where not given). From ``profile`` (a dict {b: ms} or a ``deqir bench --profile`` file)
    or, without one, c(b) of this denoiser on the padded image size, measured once per key
    (``api.profile_cache``), smallest batch first and only until serial is certain
    (``planner.serial_is_certain``: on a CPU a few rows decide it). Candidates: picard's windows with the rows rule; parareal with the rows
    rule, no max_iter and no window given. A candidate this model has run before on this task,
    canvas and ``settings`` (restore's resolved steps, etw, nw, clip_x0; default: the card's) is
    planned with the K it needed (``api.k_observed``), the others with the benchmarks' K. Ray's
    driver asks one worker for this plan and hands its c(b) to every worker, so that all choose alike.
    ``max_batch``: the most rows that fit in memory (``api.budget``): no larger batch is timed or planned."""
    padded = canvas(denoiser, op)
    windows = stop == "rows"
    parareal = windows and max_iter is None and not window_given
    if settings is None:
        settings = resolve_settings(denoiser, getattr(op, "name", None), {"steps": steps, "etw": etw})[0]
    seen = k_observed.observed(denoiser, op, settings) if windows and max_iter is None else {}
    if profile is None:
        def decided(c_ms):
            return serial_is_certain(c_ms, steps, procs, windows=windows, parareal=parareal, etw=etw,
                                     observed=seen, max_batch=max_batch)
        c_ms, source = cost_until_decided(denoiser, tuple(padded.image_shape),
                                          profile_batches(steps, procs, max_batch), decided)
    elif isinstance(profile, dict):
        c_ms, source = cost_table(profile, "profile"), {"source": "profile (dict)"}
    else:
        c_ms, source = load_profile(profile), {"source": "profile", "file": str(profile)}
    choice, prediction = choose_solver(c_ms, steps, procs, windows=windows, parareal=parareal, etw=etw,
                                       observed=seen, max_batch=max_batch)
    return choice, {**prediction, "chosen": choice, "c_ms": c_ms, "profile": source,
                    "reason": plan_reason(choice, prediction)}


def _plan(denoiser, op, steps: int, profile, comm, etw, stop, max_iter, window_given,
          settings: dict, max_batch: int | None = None) -> tuple[str, dict]:
    """serial, picard or parareal, whichever the latency model predicts is fastest (by a margin over
    serial: api.planner.choose_solver). Sharded over a group (``comm``, a DistComm), rank 0 alone
    times the model (or reads the profile) and decides; every rank receives its plan
    (``Comm.share``), so all ranks run the same solver with the same options."""
    procs = 1 if comm is None else comm.size
    args = (denoiser, op, procs, profile, steps, etw, stop, max_iter, window_given, settings, max_batch)
    if procs == 1:
        return plan_auto(*args)
    payload, err = b"", None
    if comm.rank == 0:
        try:
            choice, plan = plan_auto(*args)
            payload = json.dumps({"choice": choice, "plan": plan}).encode()
        except Exception as e:         # the others learn of it at once, instead of at their timeout
            err = e
            payload = json.dumps({"error": one_line(e, bare_deqir=True)}).encode()
    got = json.loads(comm.share(payload).decode())
    if err is not None:
        raise err
    if "error" in got:
        raise DeqirError(f"solver='auto': rank 0 could not plan: {got['error']}")
    plan = got["plan"]
    plan["c_ms"] = {int(b): float(v) for b, v in plan["c_ms"].items()}     # JSON keys are strings
    return got["choice"], plan


def _memory_plan(denoiser, op, batch: int, steps: int, solver: str, dtype, max_memory, tile, device,
                 solver_options: dict, max_time=None):
    """``api.budget.plan_budget`` for this restore, with the rows ``solver`` holds (``solver_rows``).
    Sharded, each rank decides for itself (no collective before the solve's own checks)."""
    rows, call_rows, m = solver_rows(solver, steps, solver_options)
    return plan_budget(denoiser, tuple(canvas(denoiser, op).image_shape), batch, steps, solver, rows, dtype,
                       max_memory, tile, device=device, call_rows=call_rows, anderson_m=m, max_time=max_time)

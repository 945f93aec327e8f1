"""DEQ inversion: exact gradients of a loss on the restored image w.r.t. the initial noise xi.

The whole chain is one fixed point h* = F(h*; xi) over the rows h_1..h_N (``chain.ChainBlock``),
and F is causal; it is the chain ``restore`` samples for the same settings (its measurement model
under noise and its padded canvas, ``api.conventions.sampling_problem``). For a loss L(h*_N) the
implicit function theorem gives

    dL/dxi = J_xi^T lam,    lam = dL/dh + J_h^T lam                                  (adjoint)

with J_h = dF/dh and J_xi = dF/dxi at h*. J_h is strictly block-LOWER-triangular (row i reads
rows < i), so J_h^T is strictly upper-triangular and nilpotent: the adjoint is a reverse-order
causal system, lam_N = dL/dh_N exactly, and after k sweeps rows N-k..N are exact; Picard on it
is exact after N - 1 sweeps (N evaluations counting the one that turns lam into dL/dxi).

**One adjoint evaluation in terms of per-row pieces** (u_i = h_i / g_i, g_i = sqrt(a'_i), d_i =
1 - lam_i the range-space decay, P and Q symmetric projectors, docs/design.md sections 1-2):

    w_i    = g_i lam_i                                       (adjoint of u_i)
    mu^P_i = sum_{i' >= i} w_i'                              (reverse cumsum: adjoint of P u_i)
    mu^Q_i = w_i + d_{i+1} mu^Q_{i+1}                         (reverse linear scan; = w_i if lam = 1)
    a_i    = coef_p_i P mu^P_i + coef_q_i Q mu^Q_i            (adjoint of eps_i)
    v_{i-1} = (d eps_theta(h_{i-1}, tau_i) / d h_{i-1})^T a_i (ONE batched denoiser VJP, all rows)

then (J_h^T lam)_j = v_j for j = 1..N-1 (row N feeds nothing) and

    J_xi^T lam = v_0 + (P mu^P_1 + d_1 Q mu^Q_1) / sqrt(a_1)

where v_0 is the denoiser path (xi is the input row of eps_1, the "halo" of the first block) and
the second term the linear path (xi enters the carry P u_0, Q u_0 with u_0 = xi / sqrt(a_1)).
Only the reverse scans couple rows; everything else is per row. ``AdjointBlock`` holds these
pieces for a block of rows [lo, hi) with an incoming reverse carry (mu^P, mu^Q of row hi), so it
can be sharded like the forward map (see ``AdjointBlock``). Memory is one linearisation of the
denoiser at h* (or a chunk of rows of it, ``vjp_chunk``), independent of the number of iterations.

**Solving the adjoint** (``adjoint=``): "serial" is back-substitution of the triangular system,
row N down to row 1, one single-row VJP each (the cost of backprop through the serial chain, but
from the stored fixed point: no graph through the loop, one row's graph alive at a time);
"picard" and "anderson" evaluate the whole adjoint map at once (one batched VJP over all rows per
evaluation, Anderson with one set of weights per image and the exact rows kept, as the forward)
and are exact after N evaluations. Early stopping is NOT safe here, measured on the analytic
oracle (N = 25): the xi-gradient is a small difference of large terms (the linear path
r_N P dL/dh_N against the paths through all N denoiser Jacobians; truncated sums are off by 1e4x
the true gradient before they converge), and the long paths arrive last, after plateaus (inpaint:
the gradient changed by 1e-3 between evaluations 20 and 21 with a 70% error, then jumped). So
"serial" is the default (exact, N row-VJPs, always cheapest in one process; with N evaluations
the batched variants cost N times the work and are never faster in latency either, because each
evaluation costs at least one row-VJP). ``adjoint_tol`` > 0 enables the documented early stop
(relative adjoint residual |Phi(lam) - lam| / |Phi(lam)| <= tol) for experiments.

The gradient is only as exact as the forward fixed point: with the default forward (Anderson,
final-row rule at 80 dB) it was within 1.5e-3 relative error of the exact one in float64; use
``solver="serial"`` for the exact trajectory.

``method="phantom"`` is the official code's one-step "phantom gradient": from the detached fixed
point take k damped steps x <- (1 - tau) x + tau F(x; xi) with autograd and backpropagate the
loss of the last row. With k = 1 the denoiser sees only detached rows (its input row 0 is the
detached copy of xi, as in the official (N+1)-row layout), so the gradient is tau times the linear
path alone, tau * P(dL/dh_N) / sqrt(a_1) when lam_1 = 1: no denoiser Jacobian at all.

``optimize_noise`` runs Adam on xi with these gradients for three losses (see its docstring for
when the blind consistency loss means anything; the ``oracle`` loss uses the ground truth).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from deqir_dist.api.conventions import check_on_canvas, sampling_problem
from deqir_dist.errors import DeqirError, check_tensor
from deqir_dist.models.scheduled import chain_schedule
from deqir_dist.models.settings import resolve_settings
from deqir_dist.parallel.comm import LocalComm, split_rows
from deqir_dist.parallel.dist import DistComm, check_same_inputs, problem_digest
from deqir_dist.sampling.adjoint import AdjointBlock, _eps_rows, _Linearization
from deqir_dist.sampling.chain import ChainBlock, block_decays
from deqir_dist.sampling.denoiser import EpsFn, model_device
from deqir_dist.sampling.schedule import ChainCoefficients, chain_coefficients
from deqir_dist.sampling.serial import sample_serial
from deqir_dist.solvers import registry
from deqir_dist.solvers.adjoint import reverse_decays, solve_adjoint
from deqir_dist.solvers.options import (
    DEFAULT_ADJOINT_TOL,
    DEFAULT_FORWARD_TOL,
    FORWARD_DATA_STD,
    FORWARD_STOP,
    SolverOptions,
)

METHODS = ("implicit", "phantom")
FORWARD_SOLVERS = registry.names("inversion")       # solvers.registry
ADJOINT_SOLVERS = registry.names("adjoint")
__all__ = ["ADJOINT_SOLVERS", "DEFAULT_ADJOINT_TOL", "DEFAULT_FORWARD_TOL", "FORWARD_SOLVERS", "METHODS",
           "NoiseGradient", "noise_gradient"]


# ---------------------------------------------------------------------------- results

@dataclass
class NoiseGradient:
    """dL/dxi at xi, and what came with it.

    grad: (B, C, H, W) gradient of sum(loss) w.r.t. xi (per image independent; xi's shape, the
    model's canvas when the image is padded); loss: the loss values as ``loss_fn`` returned them
    (scalar or (B,)), detached; image: the restored h*_N in the user's size (implicit: F(h*)_N,
    one exact sweep past the solver's fixed point; phantom: the last row of the damped phantom
    state), detached; trajectory: h*_1..h*_N (B, N, C, H, W) on the canvas, detached (a warm
    start for the next solve); forward_iterations: joint-map evaluations of the forward solve (max
    over images; serial: N); adjoint_iterations: adjoint evaluations, each one batched denoiser VJP
    over all rows (serial: N single-row VJPs; phantom: phantom_steps); adjoint_trace: the relative
    adjoint residual after each evaluation.
    """

    grad: torch.Tensor
    loss: torch.Tensor
    image: torch.Tensor
    forward_iterations: int
    adjoint_iterations: int
    method: str = "implicit"
    trajectory: torch.Tensor | None = None
    adjoint_trace: list[float] = field(default_factory=list)
    forward_residual: float = 0.0           # max over images of |F(h*) - h*| / |F(h*)| (implicit)
    rank_rows: tuple[int, int] | None = None  # distributed: the rows [lo, hi) of ``trajectory`` (else all)
    settings: dict = field(default_factory=dict)   # steps, etw, nw, clip_x0, sigma_y: the chain's
    settings_source: dict = field(default_factory=dict)   # where each came from: "user", the model card, ...


# ---------------------------------------------------------------------------- forward

class _RecordingBlock(ChainBlock):
    """A ChainBlock that keeps, per image, the rows of its last evaluation of F (the trajectory)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.traj = torch.zeros((self.xi.shape[0], self.rows, *self.xi.shape[1:]),
                                dtype=self.xi.dtype, device=self.xi.device)
        self._idx = None

    def increments(self, eps, inputs, idx):
        self._idx = idx
        return super().increments(eps, inputs, idx)

    def outputs(self, bp, bq, carry):
        f = super().outputs(bp, bq, carry)
        if self._idx is not None:
            self.traj[self._idx] = f
        return f


@dataclass
class _Problem:
    coeffs: ChainCoefficients
    eps_fn: EpsFn
    op: object
    y: torch.Tensor
    xi: torch.Tensor
    z: torch.Tensor | None
    steps: int
    crop: Callable[[torch.Tensor], torch.Tensor]      # the model's canvas -> the user's image


def _setup(denoiser, y, op, xi, steps, etw, nw, step_noise, start, sigma_y, dtype, alphas_cumprod,
           clip_x0) -> _Problem:
    """The chain ``restore`` runs for the same arguments: its coefficients (sigma_y included), its
    measurement model (``conventions.sampling_problem``: for_noise, filter_measurement, the
    model's canvas) and its denoiser (``EpsFn``, x0 clipped when ``clip_x0``), on the model's
    schedule (``models.scheduled.chain_schedule``) unless ``alphas_cumprod`` is given."""
    alphas_cumprod, start, spacing, offset, _, _ = chain_schedule(denoiser, alphas_cumprod, start)
    coeffs = chain_coefficients(steps, start, etw, nw, sigma_y, alphas_cumprod, spacing, offset)
    if not isinstance(clip_x0, bool):
        raise DeqirError(f"clip_x0 must be True or False, got {clip_x0!r}")
    y = check_tensor(y, "y", (None, *op.measurement_shape))
    b = y.shape[0]
    user = tuple(op.image_shape)
    op, y, crop = sampling_problem(denoiser, op, y, sigma_y)
    shape = tuple(op.image_shape)
    xi = check_on_canvas(xi, "xi", (b,), shape, user, denoiser)
    if nw > 0:
        if step_noise is None:
            raise DeqirError("nw > 0 needs step_noise (B, N, C, H, W): the z rows must stay fixed")
        step_noise = check_on_canvas(step_noise, "step_noise", (b, steps), shape, user, denoiser)
    dev = model_device(denoiser, default=y.device)
    z = None if step_noise is None or nw == 0 else step_noise.to(device=dev, dtype=dtype)
    return _Problem(coeffs, EpsFn.for_chain(denoiser, shape[0], dtype, clip_x0, alphas_cumprod), op,
                    y.detach().to(device=dev, dtype=dtype), xi.detach().to(device=dev, dtype=dtype), z, steps, crop)


def _forward(pb: _Problem, comm, blocks, solver: str, opts: SolverOptions,
             init: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """This rank's rows h*_lo+1..h*_hi of the fixed point (B, hi - lo, C, H, W) and the number of
    joint-map evaluations: solver "serial" runs the whole chain on every rank, keeping its rows;
    the others solve the rank's block (prefix scan over ranks as in ``restore``)."""
    lo, hi = blocks[comm.rank]
    n, b = pb.steps, pb.xi.shape[0]
    with torch.no_grad():
        if solver == "serial":
            kept = {}
            sample_serial(pb.eps_fn, pb.op, pb.coeffs, pb.y, pb.xi, pb.z,
                          callback=lambda i, h: kept.__setitem__(i, h) if lo < i <= hi else None)
            return torch.stack([kept[i] for i in range(lo + 1, hi + 1)], 1), n
        if comm.size > 1:
            comm.block_decays = block_decays(pb.coeffs, blocks, opts.data_std)
        z_local = None if pb.z is None else pb.z[:, lo:hi]
        block = _RecordingBlock(pb.eps_fn, pb.op, pb.coeffs, pb.y, pb.xi, lo, hi, z_local, opts.data_std)
        x0 = None
        if init is not None:
            init = check_tensor(init, "init", (b, None, *pb.xi.shape[1:]))
            if init.shape[1] == n:
                init = init[:, lo:hi]
            elif init.shape[1] != hi - lo:
                raise DeqirError(f"init has {init.shape[1]} rows: expected the full trajectory ({n}) "
                                 f"or this rank's rows ({hi - lo})")
            x0 = init.detach().to(pb.xi)
        sol = registry.get(solver, "inversion").solve(block, comm, opts, x0=x0)
        if comm.is_last and not torch.equal(block.traj[:, -1], sol.final):
            raise DeqirError("internal: the recorded trajectory does not end in the solver's result")
        return block.traj, max(sol.iterations)


def _loss_grad(loss_fn, image: torch.Tensor):
    img = image.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(img)
        if not isinstance(loss, torch.Tensor) or loss.dim() > 1:
            raise DeqirError("loss_fn must return a scalar or a (B,) tensor")
        dl, = torch.autograd.grad(loss.sum(), img)
    return loss.detach(), dl


# ---------------------------------------------------------------------------- public API

def noise_gradient(denoiser, y: torch.Tensor, op, xi: torch.Tensor, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                   steps: int | None = None, method: str = "implicit", solver: str = "anderson",
                   etw: float | None = None, nw: float | None = None, step_noise: torch.Tensor | None = None, start: int | None = None,
                   sigma_y: float = 0.0, tau: float = 0.1, phantom_steps: int = 1, tol: float | None = None,
                   max_iter: int | None = None, dtype: torch.dtype = torch.float32,
                   alphas_cumprod: torch.Tensor | None = None, adjoint: str = "serial",
                   adjoint_tol: float = DEFAULT_ADJOINT_TOL, adjoint_max_iter: int | None = None,
                   vjp_chunk: int | None = None, init: torch.Tensor | None = None, clip_x0: bool | None = None,
                   distributed: bool = False, group=None, **solver_options) -> NoiseGradient:
    """Gradient of sum(loss_fn(h*_N)) w.r.t. the initial noise xi (B, C, H, W).

    The chain is the one ``restore(..., noise=xi, solver="serial")`` runs with the same settings
    (``_setup``): ``sigma_y > 0`` samples with ``op.for_noise(sigma_y)`` and the Tikhonov-filtered
    y (``filter_measurement``; and chain_coefficients' lam from the same sigma_y), through
    ``api.conventions.sampling_problem``, the one place restore takes them from too. An image size
    that is not a multiple of ``denoiser.size_multiple`` runs on restore's padded canvas
    (``PaddedOperator``: the padding is null space): then ``xi``, ``step_noise``, ``init``, the
    returned ``grad`` and ``trajectory`` have the canvas size (restore's ``noise`` has it too),
    while ``loss_fn`` and the returned ``image`` see the user's image, the canvas cropped back.
    ``steps``, ``etw``, ``nw`` and ``clip_x0`` left None are the model card's for this task, as in
    ``restore`` (``models.settings.resolve_settings``; a model without a card: the library defaults,
    etw = nw = 0, no clipping, 25 steps); ``result.settings`` and ``result.settings_source`` say
    which ran and where each came from. ``clip_x0=True`` clamps every
    x0 prediction as ``restore``'s does (``EpsFn``); the gradient then goes through the clamp
    (zero where it is active).

    The forward fixed point is solved without a graph (``solver`` "serial", "picard" or
    "anderson", stop rule "final" at ``tol`` dB, default 80; ``max_iter`` evaluations at most;
    ``init`` warm-starts it with a trajectory; extra keywords are ``restore``'s solver options:
    m, ridge, beta, safeguard tune Anderson, and ``data_std`` sets the null-space coordinates
    the parallel forward iterates in, as in ``restore``, but with default None here (the eps form
    the adjoint is written in; ``solvers.options.FORWARD_DATA_STD``): the fixed point, and so the
    gradient, does not depend on it, only the forward's path to it does; the serial sampler has no
    such coordinates and ignores it). ``loss_fn(image)`` takes (B, C, H, W) and returns a scalar
    or one value per image.

    method "implicit" (exact): solves the adjoint system lam = dL/dh + J_h^T lam at h* with
    ``adjoint`` = "serial" (default: exact back-substitution, N single-row VJPs), "picard" or
    "anderson" (one batched denoiser VJP over all rows per evaluation; exact after N evaluations,
    or earlier at relative adjoint residual <= ``adjoint_tol`` when that is > 0, which the module
    doc explains is unreliable). Memory does not grow with the iterations: one linearisation of
    the denoiser at h* is kept (its graph over all rows, reused with retain_graph, or recomputed
    ``vjp_chunk`` rows at a time; "serial" recomputes one row at a time).

    method "phantom" (the official approximation): ``phantom_steps`` damped steps
    x <- (1 - tau) x + tau F(x; xi) from the detached fixed point, with autograd; see module doc.

    ``distributed=True`` (inside an initialised torch.distributed group, or ``group``, of P ranks;
    the same pipeline as one process, whose collectives are identities): rank r owns rows
    ``split_rows(N, P)[r]`` of the forward AND of the adjoint, no rank holds all rows (``_implicit``).
    Every rank must pass the same inputs (checked) and the same ``loss_fn``; every rank returns
    the same grad, loss and image, and its own rows of the trajectory (``rank_rows``; ``init``
    may be the full trajectory or this rank's rows). Only method "implicit"; the sharded adjoint
    is always Picard (exact after N evaluations, the same gradient as any exact adjoint):
    ``adjoint`` "serial" (the default) or "picard" run it, "anderson" is refused (not sharded).
    """
    if method not in METHODS:
        raise DeqirError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    registry.get(solver, "inversion")
    registry.get(adjoint, "adjoint", "adjoint solver")
    if method == "phantom" and (not 0 < tau <= 1 or isinstance(phantom_steps, bool)
                                or not isinstance(phantom_steps, int) or phantom_steps < 1):
        raise DeqirError("phantom needs 0 < tau <= 1 and an integer phantom_steps >= 1")
    if vjp_chunk is not None and (isinstance(vjp_chunk, bool) or not isinstance(vjp_chunk, int) or vjp_chunk < 1):
        raise DeqirError(f"vjp_chunk must be a positive integer or None, got {vjp_chunk!r}")
    settings, sources = resolve_settings(denoiser, getattr(op, "name", None),
                                         {"steps": steps, "etw": etw, "nw": nw, "clip_x0": clip_x0})
    steps, etw, nw, clip_x0 = (settings[k] for k in ("steps", "etw", "nw", "clip_x0"))
    pb = _setup(denoiser, y, op, xi, steps, etw, nw, step_noise, start, sigma_y, dtype, alphas_cumprod, clip_x0)

    def canvas_loss(h):                 # the loss sees the user's image: the canvas cropped back
        return loss_fn(pb.crop(h))
    comm = _comm(distributed, group, pb, method, adjoint)
    blocks = split_rows(pb.steps, comm.size)
    if comm.size > 1:
        config = {"steps": steps, "start": start, "etw": etw, "nw": nw, "sigma_y": sigma_y, "dtype": str(dtype),
                  "clip_x0": clip_x0, "solver": solver, "tol": tol, "max_iter": max_iter, "adjoint": adjoint, "adjoint_tol": adjoint_tol,
                  "adjoint_max_iter": adjoint_max_iter, "options": solver_options}
        z_check = None if pb.z is None else [float(pb.z.double().sum()), float(pb.z.double().abs().sum())]
        check_same_inputs(comm, problem_digest(pb.y, pb.xi, pb.op,
                                               {**config, "a": pb.coeffs.a.tolist(), "z": z_check}))
    # the forward's options; the serial sampler ignores them, but a typo in them is still an error
    opts = SolverOptions.make("picard" if solver == "serial" else solver, FORWARD_STOP,
                              DEFAULT_FORWARD_TOL if tol is None else tol, max_iter, pb.steps,
                              **{"data_std": FORWARD_DATA_STD, **solver_options})
    traj, k_fwd = _forward(pb, comm, blocks, solver, opts, init)
    if method == "phantom":
        res = _phantom(pb, traj, k_fwd, canvas_loss, tau, phantom_steps)
    else:
        res = _implicit(pb, comm, blocks, traj, k_fwd, canvas_loss, adjoint, adjoint_tol, adjoint_max_iter, vjp_chunk)
    res.settings = {**settings, "sigma_y": float(sigma_y)}
    res.settings_source = {**sources, "sigma_y": "user"}
    return res


def _comm(distributed: bool, group, pb: _Problem, method: str, adjoint: str):
    """LocalComm in one process (and for a group of one); DistComm for P > 1, refusing what is not sharded."""
    if not distributed:
        return LocalComm()
    comm = DistComm(group, model_device(pb.eps_fn.model, default=pb.xi.device))
    if comm.size == 1:
        return LocalComm()
    if method != "implicit":
        raise DeqirError("distributed=True supports method='implicit' only (the phantom gradient "
                         "is not sharded)")
    if adjoint == "anderson":
        raise DeqirError("distributed=True shards the Picard adjoint only: use adjoint='picard' "
                         "(or the default 'serial', which runs as Picard when sharded)")
    if comm.size > pb.steps:
        raise DeqirError(f"{comm.size} ranks for a chain of {pb.steps} rows: use at most one rank per row")
    return comm


def _implicit(pb: _Problem, comm, blocks, traj: torch.Tensor, k_fwd: int, loss_fn, adjoint: str,
              adjoint_tol: float, adjoint_max_iter: int | None, vjp_chunk: int | None) -> NoiseGradient:
    """The implicit gradient from this rank's rows [lo, hi) of h* (any P; one process: all rows):

      1. one halo exchange so that the rank knows h*_{lo-1} (rank 0: xi), and the linearisation
         of the denoiser at its input rows h*_{lo-1}..h*_{hi-2};
      2. one exact sweep F(h*) on its rows (prefix carry over ranks), the final image broadcast
         from the last rank: every rank computes the same loss; dL/dh_N lives in the last rank's
         last row;
      3. the adjoint on its rows (``solvers.adjoint.solve_adjoint``: reverse carry, local scans,
         one batched VJP, the VJP's first row to the previous rank), the stopping statistics
         all-summed (the same trace as one process); dL/dxi formed on rank 0, broadcast.
    """
    n, b = pb.steps, pb.xi.shape[0]
    lo, hi = blocks[comm.rank]
    if comm.size > 1:
        comm.block_decays = block_decays(pb.coeffs, blocks, None)     # the eps form the adjoint is written for
    if adjoint == "serial" and comm.size == 1 and vjp_chunk is None:
        vjp_chunk = 1                      # one row per VJP: no point in keeping the whole graph
    with torch.no_grad():
        h_prev = comm.halo(traj[:, -1], pb.xi)
    lin = _Linearization(pb.eps_fn, torch.cat([h_prev.unsqueeze(1), traj[:, :-1]], 1),
                         pb.coeffs.taus[lo:hi].to(pb.xi.device), vjp_chunk)
    z_local = None if pb.z is None else pb.z[:, lo:hi]
    fblock = ChainBlock(pb.eps_fn, pb.op, pb.coeffs, pb.y, pb.xi, lo, hi, z_local)
    idx = torch.arange(b, device=pb.xi.device)
    with torch.no_grad():
        bp, bq = fblock.increments(lin.eps, lin.inputs, idx)
        carry = fblock.carry0 if comm.size == 1 else comm.carry(fblock.carry0, fblock.summary(bp, bq),
                                                                fblock.range_recurrent)
        f = fblock.outputs(bp, bq, carry)
        sq = comm.all_sum(torch.stack([(f - traj).flatten(1).double().pow(2).sum(1),
                                       f.flatten(1).double().pow(2).sum(1)]))
        fres = float((sq[0].sqrt() / sq[1].sqrt().clamp_min(1e-300)).max())
        image = comm.from_last(f[:, -1].contiguous())
    loss, dl_last = _loss_grad(loss_fn, image)
    adj = AdjointBlock(pb.op, pb.coeffs, lo, hi, dtype=pb.xi.dtype, device=pb.xi.device)
    dl = torch.zeros_like(traj)
    if comm.is_last:
        dl[:, -1] = dl_last
    with torch.no_grad():
        grad, k_adj, trace = solve_adjoint(adj, lin, dl, comm, adjoint, adjoint_tol,
                                           n if adjoint_max_iter is None else adjoint_max_iter, n,
                                           reverse_decays(pb.coeffs, blocks, adj.range_recurrent))
    return NoiseGradient(grad.detach(), loss, pb.crop(image).detach(), k_fwd, k_adj, "implicit", f.detach(), trace,
                         fres, rank_rows=(lo, hi) if comm.size > 1 else None)


def _phantom(pb: _Problem, traj: torch.Tensor, k_fwd: int, loss_fn, tau: float, k: int) -> NoiseGradient:
    """The official phantom gradient on the (N+1)-row state [row 0 = xi, h_1..h_N]."""
    n = pb.steps
    taus = pb.coeffs.taus.to(pb.xi.device)
    xi = pb.xi.clone().requires_grad_(True)
    idx = torch.arange(xi.shape[0], device=xi.device)
    with torch.enable_grad():
        block = ChainBlock(pb.eps_fn, pb.op, pb.coeffs, pb.y, xi, 0, n, pb.z)   # carry0 differentiable
        row0 = pb.xi.detach()                 # the state's row 0: the detached xi, re-inserted as xi by F
        x = traj.detach()
        for _ in range(k):
            inputs = torch.cat([row0.unsqueeze(1), x[:, :-1]], 1)
            f = block.outputs(*block.increments(_eps_rows(pb.eps_fn, inputs, taus), inputs, idx), block.carry0)
            x = (1 - tau) * x + tau * f
            row0 = (1 - tau) * row0 + tau * xi
        image = x[:, -1]
        loss = loss_fn(image)
        if not isinstance(loss, torch.Tensor) or loss.dim() > 1:
            raise DeqirError("loss_fn must return a scalar or a (B,) tensor")
        grad, = torch.autograd.grad(loss.sum(), xi)
    return NoiseGradient(grad.detach(), loss.detach(), pb.crop(image).detach(), k_fwd, k, "phantom", traj.detach())

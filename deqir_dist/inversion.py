"""DEQ inversion: exact gradients of a loss on the restored image w.r.t. the initial noise xi.

The whole chain is one fixed point h* = F(h*; xi) over the rows h_1..h_N (``chain.ChainBlock``),
and F is causal. For a loss L(h*_N) the implicit function theorem gives

    dL/dxi = J_xi^T lam,    lam = dL/dh + J_h^T lam                                  (adjoint)

with J_h = dF/dh and J_xi = dF/dxi at h*. J_h is strictly block-LOWER-triangular (row i reads
rows < i), so J_h^T is strictly upper-triangular and nilpotent: the adjoint is a reverse-order
causal system, lam_N = dL/dh_N exactly, and after k sweeps rows N-k..N are exact; Picard on it
is exact after N - 1 sweeps (N evaluations counting the one that turns lam into dL/dxi).

**One adjoint evaluation in terms of per-row pieces** (u_i = h_i / g_i, g_i = sqrt(a'_i), d_i =
1 - lam_i the range-space decay, P and Q symmetric projectors, DESIGN section 2):

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

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .chain import ChainBlock, block_decays, linear_scan
from .comm import LocalComm
from .denoiser import EpsFn, model_device
from .errors import DeqirError
from .restore import check_tensor, draw_noise
from .schedule import ChainCoefficients, chain_coefficients
from .serial import sample_serial
from .solvers import SolverOptions, solve_chain

METHODS = ("implicit", "phantom")
FORWARD_SOLVERS = ("serial", "picard", "anderson")
ADJOINT_SOLVERS = ("serial", "picard", "anderson")
LOSSES = ("consistency", "reference", "oracle")
DEFAULT_FORWARD_TOL = 80.0      # dB, the "final" stop rule of ``solvers`` (a tight default: gradients)
DEFAULT_ADJOINT_TOL = 0.0       # relative adjoint residual; 0: run to the exact end (N evaluations)


# ---------------------------------------------------------------------------- results

@dataclass
class NoiseGradient:
    """dL/dxi at xi, and what came with it.

    grad: (B, C, H, W) gradient of sum(loss) w.r.t. xi (per image independent); loss: the loss
    values as ``loss_fn`` returned them (scalar or (B,)), detached; image: the restored h*_N
    (implicit: F(h*)_N, one exact sweep past the solver's fixed point; phantom: the last row of
    the damped phantom state), detached; trajectory: h*_1..h*_N (B, N, C, H, W), detached (a warm
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


@dataclass
class NoiseOptimization:
    """Result of ``optimize_noise``.

    image/xi: per image, the iterate with the lowest loss (B, C, H, W); history: one dict per
    evaluation (``loss`` and ``consistency`` = ||A x0 - y|| per image, ``forward_iterations``,
    ``adjoint_iterations``, ``seconds``); entry 0 is the starting noise. ``oracle`` is True when
    the loss used the ground truth (``loss="oracle"``): then the result is an upper bound on what
    optimisation can do, NOT a blind restoration.
    """

    image: torch.Tensor
    xi: torch.Tensor
    history: list[dict]
    oracle: bool
    loss: str = "consistency"
    best_iteration: list[int] = field(default_factory=list)
    initial_image: torch.Tensor | None = None


# ---------------------------------------------------------------------------- adjoint pieces

def reverse_scan(decay_next: torch.Tensor, w: torch.Tensor, init: torch.Tensor | None) -> torch.Tensor:
    """mu_i = w_i + decay_next_i mu_{i+1} along dim 1 of w (B, n, ...), mu_n = init or 0.

    The forward ``linear_scan`` run on the reversed rows (``decay_next`` is a host (n,) tensor).
    """
    return torch.flip(linear_scan(torch.flip(decay_next, [0]), torch.flip(w, [1]), init), [1])


@dataclass
class ReverseCarry:
    """The adjoint entering a block from the rows after it: mu^P and mu^Q of row hi, (B, C, H, W)."""

    p: torch.Tensor
    q: torch.Tensor


@dataclass
class ReverseSummary:
    """What a block contributes to the reverse carry of the blocks BEFORE it.

    carry_out (mu of row lo) = (carry.p + p_total, q_head + q_decay * carry.q).
    """

    p_total: torch.Tensor
    q_head: torch.Tensor
    q_decay: float

    def apply(self, carry: ReverseCarry) -> ReverseCarry:
        return ReverseCarry(carry.p + self.p_total, self.q_head + self.q_decay * carry.q)


class AdjointBlock:
    """The adjoint of the joint map for rows [lo, hi): everything except the denoiser VJP.

    Sharding (mirror image of the forward block, DESIGN section 4): rank r owns rows [lo, hi)
    and the adjoint rows lam_lo..lam_{hi-1}. Per adjoint evaluation:
      1. reverse carry: ``summary(lam)`` of every block, an exclusive REVERSE scan over ranks
         (rank r gets the sum over ranks > r; ``ReverseSummary.apply``), the mirror of the forward
         prefix scan;
      2. ``scan(lam, carry)`` then ``eps_adjoint``: local, per row;
      3. one batched denoiser VJP on the local rows (inputs h_{lo-1}..h_{hi-2}, the same input
         rows as the forward denoise): its first row v_{lo-1} belongs to the previous rank's last
         row, a reverse halo sent to rank r-1 (rank 0 keeps it: it is the xi denoiser path);
      4. rank 0 adds ``xi_linear`` to get dL/dxi; the stopping test all_reduces a few scalars.
    """

    def __init__(self, op, coeffs: ChainCoefficients, lo: int, hi: int, dtype=torch.float64, device=None):
        if not 0 <= lo < hi <= coeffs.steps:
            raise ValueError(f"bad block [{lo}, {hi}) for {coeffs.steps} rows")
        self.op, self.lo, self.hi = op, lo, hi
        n = hi - lo

        def rows(v):
            return v[lo:hi].to(device=device, dtype=dtype).view(1, n, 1, 1, 1)

        self.g = rows(coeffs.g)
        self.coef_p = rows(coeffs.k2 - coeffs.k1)
        self.coef_q = rows(coeffs.k2 - (1 - coeffs.lam) * coeffs.k1)
        decay = (1 - coeffs.lam).clone()
        self.range_recurrent = coeffs.range_recurrent
        # decay_next_i = d_{i+1}; the row after the last one of the chain does not exist
        self.decay_next = torch.cat([decay, torch.zeros(1, dtype=decay.dtype)])[lo + 1:hi + 1]
        self.first_decay = float(decay[0])
        # host copies for the row-by-row sweep (no device synchronisation per row)
        self.host = {"g": coeffs.g[lo:hi].tolist(), "coef_p": (coeffs.k2 - coeffs.k1)[lo:hi].tolist(),
                     "coef_q": (coeffs.k2 - (1 - coeffs.lam) * coeffs.k1)[lo:hi].tolist(),
                     "decay_next": self.decay_next.tolist()}
        self.xi_scale = 1.0 / float(coeffs.a[0]) ** 0.5

    def summary(self, lam: torch.Tensor) -> ReverseSummary:
        w = self.g * lam
        if self.range_recurrent:
            head = reverse_scan(self.decay_next, w, None)[:, 0]
            q_decay = float(torch.prod(self.decay_next))     # mu^Q_lo = head + prod(d_{lo+1..hi}) mu^Q_hi
        else:
            head, q_decay = w[:, 0], 0.0
        return ReverseSummary(w.sum(1), head, q_decay)

    def scan(self, lam: torch.Tensor, carry: ReverseCarry | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu^P, mu^Q) of the block's rows from lam (B, n, C, H, W) and the carry of row hi."""
        w = self.g * lam
        mu_p = torch.flip(torch.cumsum(torch.flip(w, [1]), 1), [1])
        if carry is not None:
            mu_p = mu_p + carry.p.unsqueeze(1)
        if self.range_recurrent:
            mu_q = reverse_scan(self.decay_next, w, None if carry is None else carry.q)
        else:
            mu_q = w
        return mu_p, mu_q

    def eps_adjoint(self, mu_p: torch.Tensor, mu_q: torch.Tensor) -> torch.Tensor:
        """a_i = coef_p P mu^P_i + coef_q Q mu^Q_i, with one Q application per row."""
        cp = self.coef_p * mu_p
        return cp + ChainBlock._apply(self.op.Q, self.coef_q * mu_q - cp)

    def xi_linear(self, mu_p: torch.Tensor, mu_q: torch.Tensor) -> torch.Tensor:
        """The linear path xi -> (P u_0, Q u_0) of the first block (lo == 0)."""
        if self.lo != 0:
            raise ValueError("xi_linear belongs to the block of row 1")
        m0 = mu_p[:, 0]
        if self.range_recurrent and self.first_decay != 0:
            out = m0 + self.op.Q(self.first_decay * mu_q[:, 0] - m0)
        else:
            out = m0 - self.op.Q(m0)
        return self.xi_scale * out


def _eps_rows(eps_fn, inp: torch.Tensor, taus: torch.Tensor) -> torch.Tensor:
    """eps for denoiser input rows inp (B, n, C, H, W) at times taus (n,)."""
    b, n = inp.shape[:2]
    return eps_fn(inp.flatten(0, 1), taus.repeat(b)).view(inp.shape)


class _Linearization:
    """The denoiser at the fixed point, ready for vector-Jacobian products.

    inputs: rows [xi, h*_1..h*_{N-1}] (B, N, C, H, W). With ``chunk`` None the graph of one batched
    call is built once and reused (retain_graph): memory = one batched forward's saved tensors.
    With ``chunk`` = c the rows are recomputed c at a time in every VJP (memory = c rows, cost +1
    forward per VJP). ``eps`` is the detached eps at the inputs (needed for F(h*)).
    """

    def __init__(self, eps_fn, inputs: torch.Tensor, taus: torch.Tensor, chunk: int | None):
        self.eps_fn, self.taus, self.chunk = eps_fn, taus, chunk
        self.inputs = inputs.detach()
        self.calls = 0
        if chunk is None:
            self._inp = self.inputs.clone().requires_grad_(True)
            with torch.enable_grad():
                self._out = _eps_rows(eps_fn, self._inp, taus)
            self.eps = self._out.detach()
        else:
            with torch.no_grad():
                self.eps = torch.cat([_eps_rows(eps_fn, self.inputs[:, a:a + chunk], taus[a:a + chunk])
                                      for a in range(0, taus.numel(), chunk)], 1)

    def vjp(self, a: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """v = (d eps / d inputs)^T a, (B, n, C, H, W); only the rows [r0, r1) when given."""
        self.calls += 1
        n = self.taus.numel()
        r0, r1 = (0, n) if rows is None else rows
        if self.chunk is None:
            if (r0, r1) != (0, n):
                a = torch.cat([torch.zeros_like(self._out[:, :r0]), a,
                               torch.zeros_like(self._out[:, r1:])], 1)
            v, = torch.autograd.grad(self._out, self._inp, grad_outputs=a, retain_graph=True)
            return v[:, r0:r1]
        out = []
        for s in range(r0, r1, self.chunk):
            e = min(s + self.chunk, r1)
            with torch.enable_grad():
                inp = self.inputs[:, s:e].clone().requires_grad_(True)
                eps = _eps_rows(self.eps_fn, inp, self.taus[s:e])
                v, = torch.autograd.grad(eps, inp, grad_outputs=a[:, s - r0:e - r0])
            out.append(v)
        return torch.cat(out, 1)


def _adjoint_eval(adj: AdjointBlock, lin: _Linearization, lam: torch.Tensor):
    """(J_h^T lam, J_xi^T lam) for the whole chain: one batched denoiser VJP."""
    mu_p, mu_q = adj.scan(lam)
    v = lin.vjp(adj.eps_adjoint(mu_p, mu_q))
    jt = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], 1)
    return jt, v[:, 0] + adj.xi_linear(mu_p, mu_q)


def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).double().norm(dim=1)


def _solve_adjoint(adj: AdjointBlock, lin: _Linearization, dl: torch.Tensor, solver: str, tol: float,
                   max_iter: int, m: int = 5, ridge: float = 1e-8):
    """Solve lam = dl + J_h^T lam (dl nonzero only in row N); returns (grad_xi, evaluations, trace).

    Stopping rule (documented): after each evaluation Phi(lam_k) = dl + J_h^T lam_k, stop when the
    relative residual |Phi(lam_k) - lam_k| / |Phi(lam_k)| <= tol for every image, or when lam_k is
    exact by causality (its rows N-k..N are exact after k evaluations: all of them at k = N-1).
    The gradient returned is J_xi^T lam_k of the last evaluation's input lam_k (computed in the
    same VJP). ``anderson``: one set of mixing weights per image for the whole chain (Gram summed
    over rows, ridge relative to the Gram diagonal), and rows already exact take the Picard value.
    """
    b, n = dl.shape[:2]
    if solver == "serial":
        return _adjoint_serial(adj, lin, dl[:, -1]) + ([],)
    x = dl.clone()
    trace: list[float] = []
    hist_x, hist_r = [], []
    k = 0
    while True:
        jt, g = _adjoint_eval(adj, lin, x)
        f = dl + jt
        r = f - x
        rel = _norms(r) / _norms(f).clamp_min(1e-300)
        trace.append(float(rel.max()))
        exact_rows = min(k + 2, n)                       # rows of f that are exact
        k += 1
        if k >= max_iter or k >= n or bool((rel <= tol).all()):
            return g, k, trace
        if solver == "picard":
            x = f
            continue
        hist_x.append(x)
        hist_r.append(r)
        if len(hist_x) > m:
            hist_x.pop(0)
            hist_r.pop(0)
        R = torch.stack([h.flatten(1) for h in hist_r], 1).double()          # (b, j, D)
        gram = R @ R.transpose(1, 2)
        j = gram.shape[1]
        scale = torch.diagonal(gram, dim1=1, dim2=2).mean(1).clamp_min(1e-300)
        eye = torch.eye(j, dtype=gram.dtype)
        alpha = torch.linalg.solve(gram + ridge * scale.view(-1, 1, 1) * eye,
                                   torch.ones(b, j, 1, dtype=gram.dtype)).squeeze(2)
        alpha = (alpha / alpha.sum(1, keepdim=True)).to(x.dtype)
        x = sum(alpha[:, i].view(b, 1, 1, 1, 1) * (hist_x[i] + hist_r[i]) for i in range(j))
        x[:, n - exact_rows:] = f[:, n - exact_rows:]


def _adjoint_serial(adj: AdjointBlock, lin: _Linearization, dl_last: torch.Tensor):
    """Exact reverse sweep, one row at a time: N single-row VJPs (= backprop through the serial chain)."""
    n = lin.taus.numel()
    lam_row = dl_last
    mu_p = torch.zeros_like(dl_last)
    mu_q = torch.zeros_like(dl_last)
    g, cpf, cqf, dn = (adj.host[k] for k in ("g", "coef_p", "coef_q", "decay_next"))
    for i in range(n - 1, -1, -1):
        w = g[i] * lam_row
        mu_p = mu_p + w
        mu_q = w + dn[i] * mu_q if adj.range_recurrent else w
        cp = cpf[i] * mu_p
        a = cp + adj.op.Q(cqf[i] * mu_q - cp)
        lam_row = lin.vjp(a.unsqueeze(1), rows=(i, i + 1))[:, 0]       # adjoint of h_{i} (row i-1 input)
    grad = lam_row + adj.xi_linear(mu_p.unsqueeze(1), mu_q.unsqueeze(1))
    return grad, n


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


def _setup(denoiser, y, op, xi, steps, etw, nw, step_noise, start, sigma_y, dtype, alphas_cumprod) -> _Problem:
    coeffs = chain_coefficients(steps, start, etw, nw, sigma_y, alphas_cumprod)
    shape = tuple(op.image_shape)
    y = check_tensor(y, "y", (None, *op.measurement_shape))
    b = y.shape[0]
    xi = check_tensor(xi, "xi", (b, *shape))
    if nw > 0:
        if step_noise is None:
            raise DeqirError("nw > 0 needs step_noise (B, N, C, H, W): the z rows must stay fixed")
        step_noise = check_tensor(step_noise, "step_noise", (b, steps, *shape))
    dev = model_device(denoiser, default=y.device)
    z = None if step_noise is None or nw == 0 else step_noise.to(device=dev, dtype=dtype)
    return _Problem(coeffs, EpsFn(denoiser, shape[0], dtype), op, y.detach().to(device=dev, dtype=dtype),
                    xi.detach().to(device=dev, dtype=dtype), z, steps)


def _forward(pb: _Problem, solver: str, tol: float | None, max_iter: int | None,
             init: torch.Tensor | None, solver_kw: dict) -> tuple[torch.Tensor, int]:
    """The fixed point h*_1..h*_N (B, N, C, H, W) and the number of joint-map evaluations."""
    with torch.no_grad():
        if solver == "serial":
            states = []
            sample_serial(pb.eps_fn, pb.op, pb.coeffs, pb.y, pb.xi, pb.z,
                          callback=lambda i, h: states.append(h))
            return torch.stack(states, 1), pb.steps
        opts = SolverOptions.make(solver, "final", DEFAULT_FORWARD_TOL if tol is None else tol,
                                  max_iter, pb.steps, **solver_kw)
        block = _RecordingBlock(pb.eps_fn, pb.op, pb.coeffs, pb.y, pb.xi, 0, pb.steps, pb.z)
        x0 = None if init is None else init.detach().to(pb.xi)
        sol = solve_chain(block, LocalComm(), opts, x0=x0)
        if not torch.equal(block.traj[:, -1], sol.final):
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
                   steps: int = 25, method: str = "implicit", solver: str = "anderson", etw: float = 0.0,
                   nw: float = 0.0, step_noise: torch.Tensor | None = None, start: int = 1000,
                   sigma_y: float = 0.0, tau: float = 0.1, phantom_steps: int = 1, tol: float | None = None,
                   max_iter: int | None = None, dtype: torch.dtype = torch.float32,
                   alphas_cumprod: torch.Tensor | None = None, adjoint: str = "serial",
                   adjoint_tol: float = DEFAULT_ADJOINT_TOL, adjoint_max_iter: int | None = None,
                   vjp_chunk: int | None = None, init: torch.Tensor | None = None,
                   distributed: bool = False, group=None, **solver_options) -> NoiseGradient:
    """Gradient of sum(loss_fn(h*_N)) w.r.t. the initial noise xi (B, C, H, W).

    The forward fixed point is solved without a graph (``solver`` "serial", "picard" or
    "anderson", stop rule "final" at ``tol`` dB, default 80; ``max_iter`` evaluations at most;
    ``init`` warm-starts it with a trajectory; extra keywords tune Anderson). ``loss_fn(image)``
    takes (B, C, H, W) and returns a scalar or one value per image.

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
    P = 1 is the single-process path above): rank r owns rows ``split_rows(N, P)[r]`` of the
    forward AND of the adjoint, no rank holds all rows (see ``_noise_gradient_distributed``).
    Every rank must pass the same inputs (checked) and the same ``loss_fn``; every rank returns
    the same grad, loss and image, and its own rows of the trajectory (``rank_rows``; ``init``
    may be the full trajectory or this rank's rows). Only method "implicit"; the sharded adjoint
    is always Picard (exact after N evaluations, the same gradient as any exact adjoint):
    ``adjoint`` "serial" (the default) or "picard" run it, "anderson" is refused (not sharded).
    """
    if method not in METHODS:
        raise DeqirError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if solver not in FORWARD_SOLVERS:
        raise DeqirError(f"unknown solver {solver!r}; choose from {', '.join(FORWARD_SOLVERS)}")
    if adjoint not in ADJOINT_SOLVERS:
        raise DeqirError(f"unknown adjoint solver {adjoint!r}; choose from {', '.join(ADJOINT_SOLVERS)}")
    if method == "phantom" and (not 0 < tau <= 1 or isinstance(phantom_steps, bool)
                                or not isinstance(phantom_steps, int) or phantom_steps < 1):
        raise DeqirError("phantom needs 0 < tau <= 1 and an integer phantom_steps >= 1")
    if vjp_chunk is not None and (isinstance(vjp_chunk, bool) or not isinstance(vjp_chunk, int) or vjp_chunk < 1):
        raise DeqirError(f"vjp_chunk must be a positive integer or None, got {vjp_chunk!r}")
    pb = _setup(denoiser, y, op, xi, steps, etw, nw, step_noise, start, sigma_y, dtype, alphas_cumprod)
    if distributed:
        from .distributed import DistComm
        comm = DistComm(group, model_device(denoiser, default=pb.xi.device))
        if comm.size > 1:
            if method != "implicit":
                raise DeqirError("distributed=True supports method='implicit' only (the phantom gradient "
                                 "is not sharded)")
            if adjoint == "anderson":
                raise DeqirError("distributed=True shards the Picard adjoint only: use adjoint='picard' "
                                 "(or the default 'serial', which runs as Picard when sharded)")
            if comm.size > steps:
                raise DeqirError(f"{comm.size} ranks for a chain of {steps} rows: use at most one rank per row")
            return _noise_gradient_distributed(pb, comm, loss_fn, solver, tol, max_iter, init, solver_options,
                                               adjoint, adjoint_tol, adjoint_max_iter, vjp_chunk,
                                               {"steps": steps, "start": start, "etw": etw, "nw": nw,
                                                "sigma_y": sigma_y, "dtype": str(dtype), "solver": solver,
                                                "tol": tol, "max_iter": max_iter, "adjoint": adjoint,
                                                "adjoint_tol": adjoint_tol, "adjoint_max_iter": adjoint_max_iter,
                                                "options": solver_options})
    traj, k_fwd = _forward(pb, solver, tol, max_iter, init, solver_options)
    if method == "phantom":
        return _phantom(pb, traj, k_fwd, loss_fn, tau, phantom_steps)
    n = pb.steps
    if adjoint == "serial" and vjp_chunk is None:
        vjp_chunk = 1                      # one row per VJP: no point in keeping the whole graph
    lin = _Linearization(pb.eps_fn, torch.cat([pb.xi.unsqueeze(1), traj[:, :-1]], 1),
                         pb.coeffs.taus.to(pb.xi.device), vjp_chunk)
    block = ChainBlock(pb.eps_fn, pb.op, pb.coeffs, pb.y, pb.xi, 0, n, pb.z)
    idx = torch.arange(pb.xi.shape[0], device=pb.xi.device)
    with torch.no_grad():
        f = block.outputs(*block.increments(lin.eps, lin.inputs, idx), block.carry0)
        fres = float((_norms(f - traj) / _norms(f).clamp_min(1e-300)).max())
    image = f[:, -1]
    loss, dl_last = _loss_grad(loss_fn, image)
    dl = torch.zeros_like(traj)
    dl[:, -1] = dl_last
    adj = AdjointBlock(pb.op, pb.coeffs, 0, n, dtype=pb.xi.dtype, device=pb.xi.device)
    k_adj_max = n if adjoint_max_iter is None else adjoint_max_iter
    with torch.no_grad():
        grad, k_adj, trace = _solve_adjoint(adj, lin, dl, adjoint, adjoint_tol, k_adj_max)
    return NoiseGradient(grad.detach(), loss, image.detach(), k_fwd, k_adj, "implicit", f.detach(), trace, fres)


def _noise_gradient_distributed(pb: _Problem, comm, loss_fn, solver: str, tol: float | None,
                                max_iter: int | None, init: torch.Tensor | None, solver_kw: dict,
                                adjoint: str, adjoint_tol: float, adjoint_max_iter: int | None,
                                vjp_chunk: int | None, config: dict) -> NoiseGradient:
    """The implicit gradient with the chain sharded over P > 1 ranks (``comm``: a ``DistComm``).

    Rank r owns rows [lo, hi) = split_rows(N, P)[r] of the forward and of the adjoint:
      1. forward: ``solve_chain`` on a ``_RecordingBlock`` of its rows (prefix scan over ranks as in
         ``restore``; solver "serial" runs the whole chain on every rank, keeping only rows
         lo-1..hi-1), then one halo exchange so that it knows h*_{lo-1} (rank 0: xi);
      2. one exact sweep F(h*) on its rows (prefix carry over ranks), the final image broadcast from
         the last rank: every rank computes the same loss; dL/dh_N lives in the last rank's last row;
      3. adjoint: Picard on its rows, at most N evaluations (exact by causality), each = reverse
         exclusive scan of ``AdjointBlock.summary`` over ranks (``DistComm.reverse_carry``), local
         ``scan`` + ``eps_adjoint``, one batched VJP of the local linearisation (inputs h*_{lo-1} and
         its rows but the last); the VJP's first row goes to rank r-1 (``DistComm.halo_back``),
         the rest plus the row received from rank r+1 is J_h^T lam on its rows; the stopping
         statistics are all-summed (the same trace as one process);
      4. rank 0 forms dL/dxi = v_0 + xi_linear at the last evaluation; broadcast from rank 0.
    """
    from .comm import split_rows
    from .distributed import check_same_inputs, problem_digest

    n, b = pb.steps, pb.xi.shape[0]
    blocks = split_rows(n, comm.size)
    lo, hi = blocks[comm.rank]
    comm.block_decays = block_decays(pb.coeffs, blocks, None)        # the eps form the adjoint is written for
    z_check = None if pb.z is None else [float(pb.z.double().sum()), float(pb.z.double().abs().sum())]
    check_same_inputs(comm, problem_digest(pb.y, pb.xi, pb.op,
                                           {**config, "a": pb.coeffs.a.tolist(), "z": z_check}))
    z_local = None if pb.z is None else pb.z[:, lo:hi]

    # 1. forward: this rank's rows of the fixed point, and the input row of its first row
    with torch.no_grad():
        if solver == "serial":
            kept = {}
            sample_serial(pb.eps_fn, pb.op, pb.coeffs, pb.y, pb.xi, pb.z,
                          callback=lambda i, h: kept.__setitem__(i, h) if lo < i <= hi else None)
            traj = torch.stack([kept[i] for i in range(lo + 1, hi + 1)], 1)
            k_fwd = n
        else:
            opts = SolverOptions.make(solver, "final", DEFAULT_FORWARD_TOL if tol is None else tol,
                                      max_iter, n, **solver_kw)
            block = _RecordingBlock(pb.eps_fn, pb.op, pb.coeffs, pb.y, pb.xi, lo, hi, z_local)
            x0 = None
            if init is not None:
                init = check_tensor(init, "init", (b, None, *pb.xi.shape[1:]))
                if init.shape[1] == n:
                    init = init[:, lo:hi]
                elif init.shape[1] != hi - lo:
                    raise DeqirError(f"init has {init.shape[1]} rows: expected the full trajectory ({n}) "
                                     f"or this rank's rows ({hi - lo})")
                x0 = init.detach().to(pb.xi)
            sol = solve_chain(block, comm, opts, x0=x0)
            if comm.is_last and not torch.equal(block.traj[:, -1], sol.final):
                raise DeqirError("internal: the recorded trajectory does not end in the solver's result")
            traj, k_fwd = block.traj, max(sol.iterations)
        h_prev = comm.halo(traj[:, -1], pb.xi)

    # 2. one exact sweep on the local rows, the image and the loss on every rank
    lin = _Linearization(pb.eps_fn, torch.cat([h_prev.unsqueeze(1), traj[:, :-1]], 1),
                         pb.coeffs.taus[lo:hi].to(pb.xi.device), vjp_chunk)
    fblock = ChainBlock(pb.eps_fn, pb.op, pb.coeffs, pb.y, pb.xi, lo, hi, z_local)
    idx = torch.arange(b, device=pb.xi.device)
    with torch.no_grad():
        bp, bq = fblock.increments(lin.eps, lin.inputs, idx)
        carry = comm.carry(fblock.carry0, fblock.summary(bp, bq), fblock.range_recurrent)
        f = fblock.outputs(bp, bq, carry)
        sq = comm.all_sum(torch.stack([(f - traj).flatten(1).double().pow(2).sum(1),
                                       f.flatten(1).double().pow(2).sum(1)]))
        fres = float((sq[0].sqrt() / sq[1].sqrt().clamp_min(1e-300)).max())
        image = comm.from_last(f[:, -1].contiguous())
    loss, dl_last = _loss_grad(loss_fn, image)

    # 3. the adjoint, Picard on the local rows
    adj = AdjointBlock(pb.op, pb.coeffs, lo, hi, dtype=pb.xi.dtype, device=pb.xi.device)
    rev_decays = []
    for a, c in blocks:
        dn = torch.cat([1 - pb.coeffs.lam, torch.zeros(1, dtype=pb.coeffs.lam.dtype)])[a + 1:c + 1]
        rev_decays.append(float(torch.prod(dn)) if adj.range_recurrent else 0.0)
    k_max = n if adjoint_max_iter is None else adjoint_max_iter
    dl = torch.zeros_like(traj)
    if comm.is_last:
        dl[:, -1] = dl_last
    zero_row = torch.zeros_like(pb.xi)
    trace: list[float] = []
    x = dl.clone()
    k = 0
    with torch.no_grad():
        while True:
            rcarry = comm.reverse_carry(adj.summary(x), rev_decays, adj.range_recurrent)
            mu_p, mu_q = adj.scan(x, rcarry)
            v = lin.vjp(adj.eps_adjoint(mu_p, mu_q))
            from_next = comm.halo_back(v[:, 0].contiguous(), zero_row)
            fx = dl + torch.cat([v[:, 1:], from_next.unsqueeze(1)], 1)
            sq = comm.all_sum(torch.stack([(fx - x).flatten(1).double().pow(2).sum(1),
                                           fx.flatten(1).double().pow(2).sum(1)]))
            rel = sq[0].sqrt() / sq[1].sqrt().clamp_min(1e-300)
            trace.append(float(rel.max()))
            k += 1
            if k >= k_max or k >= n or bool((rel <= adjoint_tol).all()):
                break
            x = fx
        # 4. dL/dxi on rank 0, broadcast
        grad = v[:, 0] + adj.xi_linear(mu_p, mu_q) if comm.is_first else torch.zeros_like(pb.xi)
        grad = comm.from_first(grad.contiguous())
    return NoiseGradient(grad.detach(), loss, image.detach(), k_fwd, k, "implicit", f.detach(), trace, fres,
                         rank_rows=(lo, hi))


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
    return NoiseGradient(grad.detach(), loss.detach(), image.detach(), k_fwd, k, "phantom", traj.detach())


# ---------------------------------------------------------------------------- optimisation

def consistency(op, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||A x - y|| per image, (B,)."""
    return (op.A(x) - y.to(x)).flatten(1).norm(dim=1)


def optimize_noise(denoiser, y: torch.Tensor, op, loss: str = "consistency", target: torch.Tensor | None = None,
                   steps: int = 25, iters: int = 50, lr: float = 0.1, xi: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, method: str = "implicit", callback=None,
                   **restore_kw) -> NoiseOptimization:
    """Adam on the initial noise xi to lower a loss of the restored image; keeps the best iterate.

    Losses (per image; the gradient of their sum is per image independent):

    * ``"consistency"``: ||A x0 - y||^2, blind (needs only y). Meaningful ONLY with noisy
      measurements, ``sigma_y > 0``: then lam_N = min(1, s(-1) / sigma_y) = 0, the last step does
      not project, and A x0 - y depends on xi. With ``sigma_y = 0`` every step projects exactly
      (lam = 1), A x0 = A A+ y whatever xi is, the gradient is identically zero: refused.
      Its minimum is not the goal: a clean restoration leaves a residual of about sigma_y^2 per
      measurement (the noise); driving it lower fits the noise.
    * ``"reference"``: mean squared distance to a reference image ``target`` (B or 1, C, H, W),
      e.g. another method's output or a style/colour guide ("control the generation direction").
    * ``"oracle"``: mean squared error to the GROUND TRUTH, which the caller must pass as
      ``target``. An oracle: it shows an upper bound on what noise optimisation can achieve, not
      a restoration method. The result has ``oracle=True``.
    * a callable ``loss(image) -> (B,)``: used as is (``oracle=False``: the caller vouches that it
      does not use the ground truth).

    ``iters`` gradient evaluations (entry 0 of the history is the starting noise, so iters - 1
    Adam steps, lr ``lr``, betas (0.9, 0.999)). ``xi`` is the starting noise (else drawn from
    ``generator`` as ``restore`` does, with the z rows when nw > 0). Every forward solve is warm-
    started from the previous trajectory. ``restore_kw`` go to ``noise_gradient`` (etw, nw,
    step_noise, start, sigma_y, solver, tol, max_iter, dtype, adjoint, tau, phantom_steps, ...).
    ``callback(i, record)`` sees each history record.
    """
    custom = callable(loss)
    if not custom and loss not in LOSSES:
        raise DeqirError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)} or pass a callable")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise DeqirError(f"iters must be a positive integer, got {iters!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise DeqirError(f"lr must be a positive finite number, got {lr!r}")
    sigma_y = float(restore_kw.get("sigma_y", 0.0))
    shape = tuple(op.image_shape)
    y = check_tensor(y, "y", (None, *op.measurement_shape))
    b = y.shape[0]
    if custom:
        if target is not None:
            raise DeqirError("a callable loss takes no target: close over it")
    elif loss == "consistency" and sigma_y <= 0:
        raise DeqirError("loss='consistency' needs noisy measurements (sigma_y > 0): with sigma_y = 0 the last "
                         "step projects onto A x = y exactly, so ||A x0 - y|| does not depend on the noise")
    if loss in ("reference", "oracle"):
        if target is None:
            what = "the ground-truth image (an oracle)" if loss == "oracle" else "a reference image"
            raise DeqirError(f"loss={loss!r} needs target= {what}")
        target = check_tensor(target, "target", (None, *shape))
        if target.shape[0] not in (1, b):
            raise DeqirError(f"target has {target.shape[0]} images, expected 1 or {b}")
    elif target is not None:
        raise DeqirError("loss='consistency' takes no target")
    nw = float(restore_kw.get("nw", 0.0))
    if xi is None or (nw > 0 and restore_kw.get("step_noise") is None):
        xi_d, z_d = draw_noise(b, shape, steps, nw, generator)
        xi = xi_d if xi is None else xi
        if nw > 0 and restore_kw.get("step_noise") is None:
            restore_kw["step_noise"] = z_d
    xi = check_tensor(xi, "xi", (b, *shape))
    dtype = restore_kw.get("dtype", torch.float32)

    if custom:
        loss_fn = loss
    elif loss == "consistency":
        def loss_fn(x):
            return (op.A(x) - y.to(x)).flatten(1).pow(2).sum(1)
    else:
        def loss_fn(x):
            return (x - target.to(x)).flatten(1).pow(2).mean(1)

    param = xi.detach().to(dtype).clone().requires_grad_(True)
    opt = torch.optim.Adam([param], lr=lr)
    best_loss = torch.full((b,), float("inf"), dtype=torch.float64)
    best_xi = param.detach().clone()
    best_img = None
    best_it = [0] * b
    history: list[dict] = []
    traj = None
    first_img = None
    for it in range(iters):
        t0 = time.perf_counter()
        res = noise_gradient(denoiser, y, op, param.detach(), loss_fn, steps=steps, method=method, init=traj,
                             **restore_kw)
        traj = res.trajectory
        img = res.image
        if first_img is None:
            first_img = img.clone()
            best_img = img.clone()
        lv = res.loss.detach().double().cpu().reshape(-1).expand(b)
        better = lv < best_loss
        if better.any():
            best_loss = torch.where(better, lv, best_loss)
            m = better.to(param.device)
            best_xi[m] = param.detach()[m].to(best_xi)
            best_img[m] = img[m].to(best_img)
            for i in torch.nonzero(better).flatten().tolist():
                best_it[i] = it
        rec = {"iter": it, "loss": lv.tolist(), "consistency": consistency(op, img, y).double().cpu().tolist(),
               "forward_iterations": res.forward_iterations, "adjoint_iterations": res.adjoint_iterations,
               "seconds": 0.0}
        if it + 1 < iters:
            opt.zero_grad(set_to_none=True)
            param.grad = res.grad.to(param)
            opt.step()
        rec["seconds"] = round(time.perf_counter() - t0, 4)
        history.append(rec)
        if callback is not None:
            callback(it, rec)
    return NoiseOptimization(best_img, best_xi, history, loss == "oracle", "custom" if custom else loss, best_it,
                             first_img)


__all__ = ["AdjointBlock", "NoiseGradient", "NoiseOptimization", "ReverseCarry", "ReverseSummary",
           "consistency", "noise_gradient", "optimize_noise", "reverse_scan"]

"""Noise optimisation: gradient descent on the initial noise through the chain's adjoint."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from deqir_dist.api.conventions import canvas, check_on_canvas
from deqir_dist.api.inversion import noise_gradient
from deqir_dist.errors import DeqirError, check_tensor
from deqir_dist.models.settings import resolve_settings
from deqir_dist.sampling.noise import draw_noise

LOSSES = ("consistency", "reference", "oracle")


@dataclass
class NoiseOptimization:
    """Result of ``optimize_noise``.

    image/xi: per image, the iterate with the lowest loss (B, C, H, W; image in the user's size, xi
    on the model's canvas, as ``restore``'s noise), and ``image`` is what
    ``restore(..., noise=xi, solver="serial", **settings)`` returns for it; history: one dict per
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
    settings: dict = field(default_factory=dict)          # steps, etw, nw, clip_x0, sigma_y used
    settings_source: dict = field(default_factory=dict)   # where each came from: "user", a model card, ...


# ---------------------------------------------------------------------------- optimisation

def consistency(op, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """||A x - y|| per image, (B,)."""
    return (op.A(x) - y.to(x)).flatten(1).norm(dim=1)


def optimize_noise(denoiser, y: torch.Tensor, op, loss: str = "consistency", target: torch.Tensor | None = None,
                   steps: int | None = None, iters: int = 50, lr: float = 0.1, xi: torch.Tensor | None = None,
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
    ``generator`` as ``restore`` does, with the z rows when nw > 0: the same xi restore would
    draw). Every forward solve is warm-started from the previous trajectory. ``restore_kw`` go to
    ``noise_gradient`` (etw, nw, clip_x0, step_noise, start, sigma_y, solver, tol, max_iter, dtype,
    adjoint, tau, phantom_steps, ...). ``callback(i, record)`` sees each history record.

    The chain is ``restore``'s: ``steps``, ``etw``, ``nw`` and ``clip_x0`` left at None come from
    the model card as restore takes them (``models.settings.resolve_settings``; ``result.settings``
    / ``settings_source`` say what was used), ``sigma_y > 0`` samples with restore's noise model
    and a size off ``denoiser.size_multiple`` runs on restore's padded canvas (``noise_gradient``):
    ``xi`` (given or drawn) then has the canvas size, ``target`` and the losses see the user's
    image. With the serial forward (``solver="serial"``) the returned image is restore's serial
    image for the returned xi; the parallel forwards stop at ``tol`` dB of it.
    """
    custom = callable(loss)
    if not custom and loss not in LOSSES:
        raise DeqirError(f"unknown loss {loss!r}; choose from {', '.join(LOSSES)} or pass a callable")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise DeqirError(f"iters must be a positive integer, got {iters!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise DeqirError(f"lr must be a positive finite number, got {lr!r}")
    sigma_y = float(restore_kw.get("sigma_y", 0.0))
    given = {"steps": steps, **{k: restore_kw.pop(k, None) for k in ("etw", "nw", "clip_x0")}}
    settings, sources = resolve_settings(denoiser, getattr(op, "name", None), given)
    settings["sigma_y"], sources["sigma_y"] = sigma_y, "user"
    steps = settings["steps"]
    sampler = {k: settings[k] for k in ("etw", "nw", "clip_x0")}
    shape = tuple(op.image_shape)              # the user's image: the losses and target
    noise_shape = tuple(canvas(denoiser, op).image_shape)   # xi: the chain's canvas, as restore's noise
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
    nw = sampler["nw"]
    if xi is None or (nw > 0 and restore_kw.get("step_noise") is None):
        xi_d, z_d = draw_noise(b, noise_shape, steps, nw, generator)
        xi = xi_d if xi is None else xi
        if nw > 0 and restore_kw.get("step_noise") is None:
            restore_kw["step_noise"] = z_d
    xi = check_on_canvas(xi, "xi", (b,), noise_shape, shape, denoiser)
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
                             **sampler, **restore_kw)
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
                             first_img, settings, sources)

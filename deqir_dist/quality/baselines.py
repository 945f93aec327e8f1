"""Classical (no learning) restorations, the yardstick for the diffusion prior.

All functions take measurements ``y = op.A(x)`` of (B, C, H, W) images in [-1, 1] and return
(B, C, H, W) estimates; none sees the ground truth. :func:`baselines_for` lists the candidates
for an operator; :func:`best_baseline` picks the one with the highest mean PSNR against the ground
truth (an oracle choice among classical methods, so the comparison favours the baselines).

* super-resolution (``sr_bicubic``, ``sr_avgpool``): ``bicubic`` (``F.interpolate`` bicubic
  upsampling of y, align_corners=False), ``pinv`` (A+ y) and ``bicubic+bp`` (bicubic, then
  projected onto the measurements: A+ y + (I - A+A) bicubic(y), the fixed point of iterative
  back-projection, exactly consistent with y);
* deblurring (``deblur_gauss``, ``deblur_uniform``, ``deblur_aniso``): ``pinv`` (the operator's
  truncated-SVD A+ y) and ``tikhonov(lam)``: argmin |A x - y|^2 + lam |x - m|^2 with m the
  per-image mean of y (a Wiener filter with a white prior around the mean), solved exactly in the
  SVD of the separable blur, for lam in 1e-2, 1e-3, 1e-4, 1e-5;
* inpainting: ``mean`` (missing pixels = mean of the observed ones, per channel), ``nearest``
  (onion-peel: missing pixels are filled ring by ring with the mean of their already-known
  4-neighbours) and ``harmonic`` (the missing pixels solve Laplace's equation with the observed
  pixels as boundary values, reflecting image borders; conjugate gradients);
* colorisation: ``pinv`` (the grey level repeated in R, G, B: A+ y);
* anything else: ``pinv``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from deqir_dist.errors import DeqirError
from deqir_dist.physics.blur import correlation_matrix, gaussian_kernel1d
from deqir_dist.quality.metrics import psnr

TIKHONOV_LAMBDAS = (1e-2, 1e-3, 1e-4, 1e-5)


# ----------------------------------------------------------------------------- super-resolution

def bicubic_up(y: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic upsampling by ``scale`` (PyTorch's Keys a = -0.75, align_corners=False)."""
    return F.interpolate(y, scale_factor=scale, mode="bicubic", align_corners=False)


def back_project(op, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x moved onto the measurement-consistent set: A+ y + (I - A+ A) x."""
    return x + op.A_pinv(y - op.A(x))


# ----------------------------------------------------------------------------- deblurring

def blur_matrices(op) -> tuple[torch.Tensor, torch.Tensor]:
    """The 1-D correlation matrices (Kh, Kw) of a blur operator, float64, rebuilt from its parameters."""
    _, H, W = op.image_shape
    p = op.params
    if op.name == "deblur_gauss":
        kh = kw = gaussian_kernel1d(p["size"], p["sigma"])
    elif op.name == "deblur_aniso":
        kh, kw = gaussian_kernel1d(p["size"], p["sigma_h"]), gaussian_kernel1d(p["size"], p["sigma_w"])
    elif op.name == "deblur_uniform":
        kh = kw = torch.full((p["size"],), 1.0 / p["size"], dtype=torch.float64)
    else:
        raise DeqirError(f"tikhonov_deblur needs a blur operator, got {op.name!r}")
    return correlation_matrix(kh, H), correlation_matrix(kw, W)


def tikhonov_deblur(op, y: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_x |Kh X Kw^T - Y|^2 + lam |X - m|^2 per channel, m = mean of Y (exact, via SVD)."""
    Kh, Kw = blur_matrices(op)
    Uh, sh, Vht = torch.linalg.svd(Kh)
    Uw, sw, Vwt = torch.linalg.svd(Kw)
    s = sh[:, None] * sw[None, :]
    yd = y.to(torch.float64)
    m = yd.mean(dim=(2, 3), keepdim=True)
    r = yd - Kh @ m.expand_as(yd) @ Kw.T            # residual after the mean's blur
    z = Uh.T @ r @ Uw
    x = Vht.T @ (z * (s / (s * s + lam))) @ Vwt
    return (x + m).to(y.dtype)


# ----------------------------------------------------------------------------- inpainting

def _mask_of(op, like: torch.Tensor) -> torch.Tensor:
    return op.mask.to(device=like.device, dtype=like.dtype)[None, None]


def fill_mean(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Missing pixels (mask 0) set to the per-channel mean of the observed ones."""
    mask = mask.expand_as(y)
    mean = (y * mask).sum((2, 3), keepdim=True) / mask.sum((2, 3), keepdim=True).clamp_min(1)
    return torch.where(mask > 0, y, mean.expand_as(y))


def fill_nearest(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Onion-peel fill: each ring of missing pixels takes the mean of its known 4-neighbours."""
    x = y * mask
    known = mask.expand(y.shape[0], 1, *y.shape[2:]).clone()
    kernel = torch.tensor([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=y.dtype, device=y.device)[None, None]
    for _ in range(y.shape[2] + y.shape[3]):
        if bool((known > 0).all()):
            break
        cnt = F.conv2d(known, kernel, padding=1)
        tot = F.conv2d((x * known).reshape(-1, 1, *y.shape[2:]), kernel, padding=1).reshape(y.shape)
        new = (known == 0) & (cnt > 0)
        x = torch.where(new.expand_as(x), tot / cnt.clamp_min(1).expand_as(x), x)
        known = torch.where(new, torch.ones_like(known), known)
    if not bool((known > 0).all()):     # nothing observed at all
        return fill_mean(y, mask)
    return x


def _laplacian(u: torch.Tensor) -> torch.Tensor:
    """5-point Laplacian with reflecting (Neumann) image borders: -(graph Laplacian) u."""
    p = F.pad(u, (1, 1, 1, 1), mode="replicate")
    return p[..., :-2, 1:-1] + p[..., 2:, 1:-1] + p[..., 1:-1, :-2] + p[..., 1:-1, 2:] - 4 * u


def fill_harmonic(y: torch.Tensor, mask: torch.Tensor, iters: int = 2000, tol: float = 1e-6) -> torch.Tensor:
    """Harmonic (membrane) inpainting: Laplace's equation in the hole, observed pixels fixed.

    Solves L_MM u = -L_MK y_K for the missing pixels M (L the graph Laplacian with reflecting
    borders) by conjugate gradients in float64, started from the onion-peel fill.
    """
    mask = mask.expand_as(y).to(torch.float64)
    miss = 1 - mask
    yk = y.to(torch.float64) * mask
    x0 = fill_nearest(y.to(torch.float64), mask[:, :1])

    def apply(v):                                    # -L restricted to missing pixels (SPD)
        return -_laplacian(v * miss) * miss

    b = _laplacian(yk) * miss                        # = -(-L) y_K on M
    u = x0 * miss
    r = b - apply(u)
    p = r.clone()
    rs = (r * r).sum((1, 2, 3), keepdim=True)
    b_norm = (b * b).sum((1, 2, 3), keepdim=True).sqrt().clamp_min(1e-30)
    for _ in range(iters):
        if bool(((rs.sqrt() / b_norm) < tol).all()):
            break
        ap = apply(p)
        alpha = rs / (p * ap).sum((1, 2, 3), keepdim=True).clamp_min(1e-300)
        u = u + alpha * p
        r = r - alpha * ap
        rs_new = (r * r).sum((1, 2, 3), keepdim=True)
        p = r + (rs_new / rs.clamp_min(1e-300)) * p
        rs = rs_new
    return (yk + u * miss).to(y.dtype)


# ----------------------------------------------------------------------------- selection

def baselines_for(op, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """name -> classical estimate of x from y, for every baseline that applies to ``op``."""
    name = op.name
    out = {}
    if name in ("sr_bicubic", "sr_avgpool"):
        up = bicubic_up(y, op.params["scale"])
        out["bicubic"] = up
        out["pinv"] = op.A_pinv(y)
        out["bicubic+bp"] = back_project(op, y, up)
    elif name in ("deblur_gauss", "deblur_uniform", "deblur_aniso"):
        out["pinv"] = op.A_pinv(y)
        for lam in TIKHONOV_LAMBDAS:
            out[f"tikhonov({lam:g})"] = tikhonov_deblur(op, y, lam)
    elif name == "inpaint":
        m = _mask_of(op, y)
        out["mean"] = fill_mean(y, m)
        out["nearest"] = fill_nearest(y, m)
        out["harmonic"] = fill_harmonic(y, m)
    else:
        out["pinv"] = op.A_pinv(y)
    return out


def best_baseline(op, y: torch.Tensor, truth: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(name, estimate) of the candidate with the highest mean PSNR against ``truth`` (clamped to [-1, 1])."""
    best = None
    for name, est in baselines_for(op, y).items():
        score = float(psnr(est.clamp(-1, 1), truth).mean())
        if best is None or score > best[0]:
            best = (score, name, est)
    return best[1], best[2]

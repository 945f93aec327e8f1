"""Image quality metrics (pure torch) for (B, C, H, W) images in [-1, 1].

Both metrics are computed in float64 on the inputs' device and return a
float64 tensor of shape (B,), one value per image. They agree with
scikit-image's ``peak_signal_noise_ratio`` and ``structural_similarity``
(Wang et al. 2004 settings, see :func:`ssim`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from deqir_dist.errors import DeqirError

_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5), scipy.ndimage's truncate=3.5 -> 11x11 window
_SSIM_WIN = 2 * _SSIM_RADIUS + 1
_K1 = 0.01
_K2 = 0.03


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Map [-1, 1] to [0, 1] (affine, no clamping)."""
    return (x + 1) / 2


def from_unit(x: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] to [-1, 1] (affine, no clamping)."""
    return x * 2 - 1


def _check_pair(x: torch.Tensor, y: torch.Tensor, data_range: float, name: str) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise DeqirError(f"{name}: inputs must be torch tensors")
    if x.ndim != 4:
        raise DeqirError(f"{name}: expected (B, C, H, W) tensors, got shape {tuple(x.shape)}")
    if x.shape != y.shape:
        raise DeqirError(f"{name}: shape mismatch {tuple(x.shape)} vs {tuple(y.shape)}")
    if x.numel() == 0:
        raise DeqirError(f"{name}: empty images of shape {tuple(x.shape)}")
    if not (data_range > 0 and math.isfinite(data_range)):
        raise DeqirError(f"{name}: data_range must be a positive finite number, got {data_range}")


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB: ``10 * log10(data_range**2 / MSE)`` over C, H, W.

    ``x`` and ``y`` are (B, C, H, W); returns a float64 tensor of shape (B,).
    Identical images (MSE == 0) give ``+inf``.
    """
    _check_pair(x, y, data_range, "psnr")
    diff = x.to(torch.float64) - y.to(torch.float64)
    mse = diff.square().mean(dim=(1, 2, 3))
    return 10 * torch.log10(data_range**2 / mse)


def _gaussian_1d(device: torch.device) -> torch.Tensor:
    t = torch.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=torch.float64, device=device)
    w = torch.exp(-0.5 * (t / _SSIM_SIGMA) ** 2)
    return w / w.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image mean SSIM, averaged over channels; float64 tensor of shape (B,).

    SSIM is not shift-invariant (its luminance term compares means), so it is computed where
    everyone computes it: on images in [0, 1]. ``data_range=2`` (the default) takes the
    library's [-1, 1] images and maps them to [0, 1] first; any other ``data_range`` takes
    images in [0, data_range]. On images decoded from 8-bit files this equals scikit-image on
    the uint8 arrays: ``structural_similarity(a_u8, b_u8, data_range=255, channel_axis=...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``.

    Settings of Wang et al. (2004): 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
    K2 = 0.03, population covariances. Local statistics are taken only where the
    window fits inside the image (the 5-pixel border is excluded). H and W must be at least 11.
    (Before issue 16 the [-1, 1] images were compared as they are, with data range 2: 0.01-0.03
    below the [0, 1] value on photographs.)
    """
    _check_pair(x, y, data_range, "ssim")
    if data_range == 2.0:
        x, y, data_range = to_unit(x.to(torch.float64)), to_unit(y.to(torch.float64)), 1.0
    b, c, h, w = x.shape
    if h < _SSIM_WIN or w < _SSIM_WIN:
        raise DeqirError(
            f"ssim: images of size {h}x{w} are smaller than the {_SSIM_WIN}x{_SSIM_WIN} window"
        )
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    g = _gaussian_1d(x.device)
    n = 5 * c
    # Channels: [x, y, x*x, y*y, x*y] for each image channel; separable "valid" filtering.
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    stack = F.conv2d(stack, g.view(1, 1, 1, -1).expand(n, 1, 1, -1), groups=n)
    stack = F.conv2d(stack, g.view(1, 1, -1, 1).expand(n, 1, -1, 1), groups=n)
    ux, uy, uxx, uyy, uxy = stack.split(c, dim=1)
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    c1 = (_K1 * data_range) ** 2
    c2 = (_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))

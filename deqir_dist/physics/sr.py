"""Super-resolution operators: average pooling and bicubic downsampling."""
from __future__ import annotations

import torch

from deqir_dist.physics.base import (
    Operator,
    SeparableOperator,
    _int_param,
    _require_divisible,
)

# --------------------------------------------------------------------------- super-resolution


class SRAvgPool(Operator):
    """Average-pooling downsampling by an integer ``scale`` (default 4).

    ``y[c, i, j] = mean_{0 <= a, b < s} x[c, s*i + a, s*j + b]``; measurement
    ``(C, H/s, W/s)``.  ``A A^T = I / s^2`` so ``A+ = s^2 A^T`` replicates each
    value over its ``s x s`` block and ``A A+ = I``.  Needs H, W divisible by s.
    """

    name = "sr_avgpool"

    def __init__(self, image_shape, scale: int = 4):
        scale = _int_param(self.name, "scale", scale)
        C, H, W = image_shape
        _require_divisible(self.name, scale, H, W)
        super().__init__(image_shape, (C, H // scale, W // scale), {"scale": scale})
        self.scale = scale

    def _forward(self, x):
        B, C, H, W = x.shape
        s = self.scale
        return x.reshape(B, C, H // s, s, W // s, s).mean(dim=(3, 5))

    def _pinv(self, y):
        B, C, h, w = y.shape
        s = self.scale
        return y[:, :, :, None, :, None].expand(B, C, h, s, w, s).reshape(B, C, h * s, w * s)


def _keys_cubic(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys cubic convolution kernel with coefficient ``a`` (support [-2, 2])."""
    t = t.abs()
    inner = ((a + 2) * t - (a + 3)) * t * t + 1
    outer = a * (((t - 5) * t + 8) * t - 4)
    return torch.where(t < 1, inner, torch.where(t < 2, outer, torch.zeros_like(t)))


def bicubic_matrix(n: int, scale: int) -> torch.Tensor:
    """1-D antialiased bicubic downsampling matrix of shape ``(n // scale, n)``, float64.

    Output ``i`` has centre ``c = scale * (i + 0.5)`` in input coordinates and
    taps ``j`` in ``[floor(c - 2 scale + 0.5), floor(c + 2 scale + 0.5))``
    clipped to ``[0, n)`` (``4 * scale`` taps in the interior), with weights
    ``cubic((j + 0.5 - c) / scale)`` renormalised to sum 1 over the taps that
    fall inside the image.  This is PyTorch's ``antialias=True`` rule.
    """
    m = n // scale
    centre = scale * (torch.arange(m, dtype=torch.float64) + 0.5)
    lo = torch.floor(centre - 2 * scale + 0.5).clamp(min=0)
    hi = torch.floor(centre + 2 * scale + 0.5).clamp(max=n)
    j = torch.arange(n, dtype=torch.float64)[None, :]
    inside = (j >= lo[:, None]) & (j < hi[:, None])
    w = torch.where(inside, _keys_cubic((j + 0.5 - centre[:, None]) / scale), torch.zeros(()))
    return w / w.sum(dim=1, keepdim=True)


class SRBicubic(SeparableOperator):
    """Antialiased bicubic downsampling by an integer ``scale`` (default 4).

    ``A(X) = Mh X Mw^T`` per channel with :func:`bicubic_matrix` ``(H/s x H)`` and
    ``(W/s x W)``: Keys cubic (``a = -0.5``) stretched by ``s`` (``4 s`` taps),
    centred at ``s (i + 0.5) - 0.5``.  Border rule: weights of taps outside the
    image are dropped and the rest renormalised to sum 1, which equals
    ``F.interpolate(x, scale_factor=1/s, mode="bicubic", antialias=True,
    align_corners=False)`` everywhere, borders included.  The 1-D matrices are
    well conditioned (condition number ~1.5), so ``A+`` is the exact
    Moore-Penrose inverse (``pinv_rtol = 1e-10`` only guards round-off).
    Needs H, W divisible by s.
    """

    name = "sr_bicubic"
    pinv_rtol = 1e-10

    def __init__(self, image_shape, scale: int = 4):
        scale = _int_param(self.name, "scale", scale)
        C, H, W = image_shape
        _require_divisible(self.name, scale, H, W)
        super().__init__(image_shape, (C, H // scale, W // scale), {"scale": scale})
        self.scale = scale
        self._set_matrices(bicubic_matrix(H, scale), bicubic_matrix(W, scale))

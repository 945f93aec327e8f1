"""Deblurring operators: separable Gaussian, uniform and anisotropic blur."""
from __future__ import annotations

import torch

from deqir_dist.errors import DeqirError
from deqir_dist.physics.base import SeparableOperator, _odd_size, _positive_float

# --------------------------------------------------------------------------- deblurring


def correlation_matrix(kernel: torch.Tensor, n: int) -> torch.Tensor:
    """Banded Toeplitz ``(n, n)`` matrix of 'same' zero-padded 1-D correlation.

    ``(K x)[i] = sum_u kernel[u] x[i + u - p]`` with ``p = len(kernel) // 2``,
    i.e. ``K[i, j] = kernel[j - i + p]`` inside the band, 0 elsewhere.
    """
    size = kernel.numel()
    p = size // 2
    idx = torch.arange(n)
    u = idx[None, :] - idx[:, None] + p
    band = (u >= 0) & (u < size)
    return torch.where(band, kernel.to(torch.float64)[u.clamp(0, size - 1)], torch.zeros((), dtype=torch.float64))


def gaussian_kernel1d(size: int, sigma: float) -> torch.Tensor:
    """``exp(-u^2 / (2 sigma^2))`` for ``u = -size//2 .. size//2``, normalised to sum 1."""
    u = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(u**2) / (2 * sigma**2))
    return g / g.sum()


class _Deblur(SeparableOperator):
    """Common part of the blur operators (see :class:`DeblurGauss` for the model).

    Blur matrices are badly conditioned.  Observed cond(A) for the defaults:
    deblur_gauss 1.9e6 (64x64) / 1.4e5 (256x256), deblur_aniso 6.4e3 / 1.0e10,
    deblur_uniform 1.1e4 / exactly singular (its 1-D Toeplitz matrix has exact
    zero singular values at some sizes, e.g. 32 and 256).
    ``pinv_rtol = 1e-3`` (relative to the largest singular value, which is ~1
    for a normalised kernel) drops the 3-8% of directions with smaller gain, so
    ``A+`` amplifies noise at most 1000x - well inside float32 precision - and
    the result does not depend on whether a size happens to be exactly singular.
    """

    pinv_rtol = 1e-3

    def __init__(self, image_shape, params: dict, kernel_h: torch.Tensor, kernel_w: torch.Tensor):
        super().__init__(image_shape, tuple(image_shape), params)
        _, H, W = self.image_shape
        if kernel_h.numel() > 2 * H - 1 or kernel_w.numel() > 2 * W - 1:     # taps past that never meet a pixel
            raise DeqirError(f"{self.name}: a kernel of {kernel_h.numel()} x {kernel_w.numel()} taps is larger than "
                             f"a {H}x{W} image allows (at most {2 * H - 1} x {2 * W - 1})")
        self.kernel = torch.outer(kernel_h, kernel_w)  # 2-D correlation kernel, sums to 1
        self._set_matrices(correlation_matrix(kernel_h, H), correlation_matrix(kernel_w, W))


class DeblurGauss(_Deblur):
    """Isotropic Gaussian blur, ``size`` (odd, default 5) and ``sigma`` (default 10.0).

    ``y = F.conv2d(x, k, padding=size // 2)`` per channel ('same' size, zero
    padding, correlation over all ``size x size`` taps) with
    ``k = g g^T``, ``g[u] ∝ exp(-(u - size//2)^2 / (2 sigma^2))`` and ``sum k = 1``.
    As matrices: ``Y = Kh X Kw^T`` with :func:`correlation_matrix` ``Kh = Kw``.
    Measurement shape = image shape.  ``A+`` is the truncated-SVD inverse of
    :class:`SeparableOperator` with ``pinv_rtol = 1e-3``.
    """

    name = "deblur_gauss"

    def __init__(self, image_shape, size: int = 5, sigma: float = 10.0):
        size = _odd_size(self.name, size)
        sigma = _positive_float(self.name, "sigma", sigma)
        g = gaussian_kernel1d(size, sigma)
        super().__init__(image_shape, {"size": size, "sigma": sigma}, g, g)


class DeblurUniform(_Deblur):
    """Uniform (box) blur, ``size`` (odd, default 9): ``k = 1 / size^2`` on all taps.

    Same model as :class:`DeblurGauss`: ``y = F.conv2d(x, k, padding=size // 2)``
    per channel, ``Y = Kh X Kw^T`` with 1-D kernel ``1 / size``.
    """

    name = "deblur_uniform"

    def __init__(self, image_shape, size: int = 9):
        size = _odd_size(self.name, size)
        box = torch.full((size,), 1.0 / size, dtype=torch.float64)
        super().__init__(image_shape, {"size": size}, box, box)


class DeblurAniso(_Deblur):
    """Anisotropic Gaussian blur, ``size`` (odd, default 9), ``sigma_h`` (1.0), ``sigma_w`` (20.0).

    ``k = g_h g_w^T``: ``sigma_h`` is the vertical (row, H) spread and
    ``sigma_w`` the horizontal (column, W) spread, each 1-D Gaussian normalised
    to sum 1.  Same model as :class:`DeblurGauss`:
    ``y = F.conv2d(x, k, padding=size // 2)`` per channel, ``Y = Kh X Kw^T``.
    """

    name = "deblur_aniso"

    def __init__(self, image_shape, size: int = 9, sigma_h: float = 1.0, sigma_w: float = 20.0):
        size = _odd_size(self.name, size)
        sigma_h = _positive_float(self.name, "sigma_h", sigma_h)
        sigma_w = _positive_float(self.name, "sigma_w", sigma_w)
        params = {"size": size, "sigma_h": sigma_h, "sigma_w": sigma_w}
        super().__init__(image_shape, params, gaussian_kernel1d(size, sigma_h), gaussian_kernel1d(size, sigma_w))

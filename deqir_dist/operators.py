"""Linear degradation operators ``y = A x`` and their pseudo-inverses.

Images are NCHW tensors in [-1, 1].  Every operator acts on a batch
``(B, *image_shape)`` and produces ``(B, *measurement_shape)``; ``A_pinv`` maps
back.  DDNM-style restoration only needs the range-space projector
``Q = A+ A`` and the null-space projector ``P = I - Q``::

    x_restored = A+ y + P x_generated

All operators satisfy the Moore-Penrose identities ``A A+ A = A``,
``A+ A A+ = A+`` with ``A+ A`` and ``A A+`` symmetric.  The blur operators use a
truncated SVD (see :class:`SeparableOperator`), for which ``A A+ A = A`` holds
only up to the dropped singular values.

Build operators with :func:`make_operator`; :data:`OPERATOR_NAMES` lists them.
Matrices are built once in float64; every call converts them (cached) to the
input's dtype and device.
"""

from __future__ import annotations

import hashlib
import inspect
import math
from numbers import Integral, Real

import numpy as np
import torch

from deqir_dist.errors import DeqirError
from deqir_dist.masks import MASK_KINDS, make_mask, mask_params

__all__ = [
    "OPERATOR_NAMES",
    "Operator",
    "SeparableOperator",
    "SRAvgPool",
    "SRBicubic",
    "DeblurGauss",
    "DeblurUniform",
    "DeblurAniso",
    "Inpaint",
    "Colorize",
    "CSWHT",
    "Denoise",
    "make_operator",
    "fwht",
    "bicubic_matrix",
    "correlation_matrix",
    "gaussian_kernel1d",
]


# --------------------------------------------------------------------------- helpers


def _int_param(op: str, key: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise DeqirError(f"{op} needs integer {key} >= {minimum}, got {value!r}")
    return int(value)


def _positive_float(op: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not (0 < value < math.inf):
        raise DeqirError(f"{op} needs a finite {key} > 0, got {value!r}")
    return float(value)


def _odd_size(op: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1 or value % 2 == 0:
        raise DeqirError(f"{op} needs an odd integer kernel size >= 1, got {value!r}")
    return int(value)


def _require_divisible(op: str, scale: int, H: int, W: int) -> None:
    if H % scale or W % scale:
        raise DeqirError(f"{op} with scale {scale} needs H and W divisible by {scale}, got {H}x{W}")


def _shape_str(shape: tuple) -> str:
    return "(B, " + ", ".join(str(d) for d in shape) + ")"


# --------------------------------------------------------------------------- base class


class Operator:
    """A linear operator ``A`` on images of shape ``image_shape = (C, H, W)``.

    Attributes: ``name``, ``image_shape``, ``measurement_shape`` (per image),
    ``params`` (JSON-serialisable, defaults included) and
    ``measurement_is_image`` (whether ``A(x)`` can be saved as an image).
    Subclasses implement ``_forward`` and ``_pinv`` on validated tensors.
    """

    name: str = ""
    measurement_is_image: bool = True

    def __init__(self, image_shape: tuple[int, int, int], measurement_shape: tuple, params: dict):
        self.image_shape = tuple(image_shape)
        self.measurement_shape = tuple(int(d) for d in measurement_shape)
        self.params = params
        self._buffers: dict[str, torch.Tensor] = {}
        self._converted: dict[tuple, torch.Tensor] = {}

    # public API ----------------------------------------------------------
    def A(self, x: torch.Tensor) -> torch.Tensor:
        """Forward model: ``(B, *image_shape) -> (B, *measurement_shape)``."""
        return self._forward(self._check(x, self.image_shape, "A"))

    def A_pinv(self, y: torch.Tensor) -> torch.Tensor:
        """Moore-Penrose pseudo-inverse: ``(B, *measurement_shape) -> (B, *image_shape)``."""
        return self._pinv(self._check(y, self.measurement_shape, "A_pinv"))

    def Q(self, x: torch.Tensor) -> torch.Tensor:
        """Range-space projector ``A+ A x`` (orthogonal projection onto row(A))."""
        return self.A_pinv(self.A(x))

    def P(self, x: torch.Tensor) -> torch.Tensor:
        """Null-space projector ``x - A+ A x``."""
        return x - self.Q(x)

    def describe(self) -> dict:
        """JSON-serialisable description: name, image shape and parameters."""
        return {"name": self.name, "image_shape": list(self.image_shape), "params": dict(self.params)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}(image_shape={self.image_shape}{', ' if args else ''}{args})"

    # subclass hooks --------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _pinv(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # buffers ---------------------------------------------------------------
    def _register(self, key: str, tensor: torch.Tensor) -> None:
        """Store a CPU buffer (float64 for real buffers, unchanged for integer ones)."""
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float64)
        self._buffers[key] = tensor.detach().cpu().contiguous()

    def _buf(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """Buffer ``key`` on ``like``'s device (and in its dtype if real); cached."""
        cache_key = (key, like.dtype, like.device)
        out = self._converted.get(cache_key)
        if out is None:
            base = self._buffers[key]
            dtype = like.dtype if base.is_floating_point() else base.dtype
            out = self._converted[cache_key] = base.to(device=like.device, dtype=dtype)
        return out

    def _check(self, t, shape: tuple, fn: str) -> torch.Tensor:
        where = f"{self.name}.{fn}"
        if not isinstance(t, torch.Tensor):
            raise DeqirError(f"{where} expects a torch.Tensor of shape {_shape_str(shape)}, got {type(t).__name__}")
        if t.ndim != len(shape) + 1 or tuple(t.shape[1:]) != shape:
            raise DeqirError(f"{where} expects shape {_shape_str(shape)}, got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise DeqirError(f"{where} expects a floating-point tensor, got {t.dtype}")
        return t


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


class SeparableOperator(Operator):
    """Per-channel separable operator ``Y = Mh X Mw^T`` with a truncated-SVD pseudo-inverse.

    With the thin SVDs ``Mh = Uh diag(sh) Vh^T`` and ``Mw = Uw diag(sw) Vw^T``
    the singular values of ``A = Mh (x) Mw`` are the products ``sh[i] * sw[j]``.
    Those ``<= pinv_rtol * max`` count as zero::

        A+(Y) = Vh [ (Uh^T Y Uw) * Inv ] Vw^T,   Inv[i, j] = 1 / (sh[i] sw[j]) if kept else 0

    so ``A+ A`` and ``A A+`` are orthogonal projectors and ``A+ A A+ = A+`` holds
    exactly, while ``A A+ A = A`` holds up to the dropped singular values:
    ``|A x - A A+ A x| <= pinv_rtol * max(sh) max(sw) * |x|``.
    ``rank`` is the number of kept singular values.
    """

    pinv_rtol: float = 0.0

    def _set_matrices(self, Mh: torch.Tensor, Mw: torch.Tensor) -> None:
        Mh, Mw = Mh.to(torch.float64), Mw.to(torch.float64)
        Uh, sh, Vh_t = torch.linalg.svd(Mh, full_matrices=False)
        Uw, sw, Vw_t = torch.linalg.svd(Mw, full_matrices=False)
        s = sh[:, None] * sw[None, :]
        keep = s > self.pinv_rtol * s.max()
        inv = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
        for key, value in dict(Mh=Mh, Mw_t=Mw.T, Uh_t=Uh.T, Uw=Uw, Vh=Vh_t.T, Vw_t=Vw_t, inv=inv).items():
            self._register(key, value)
        self.rank = int(keep.sum())

    def _forward(self, x):
        return self._buf("Mh", x) @ x @ self._buf("Mw_t", x)

    def _pinv(self, y):
        z = self._buf("Uh_t", y) @ y @ self._buf("Uw", y)
        return self._buf("Vh", y) @ (z * self._buf("inv", y)) @ self._buf("Vw_t", y)


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


# --------------------------------------------------------------------------- inpainting, colour, CS, denoise


def _mask_hash(mask: torch.Tensor) -> str:
    H, W = mask.shape
    digest = hashlib.sha256(f"{H}x{W}:".encode() + mask.to(torch.uint8).numpy().tobytes()).hexdigest()
    return f"sha256:{digest[:16]}"


class Inpaint(Operator):
    """Inpainting: ``A(x) = x * mask`` with a 0/1 ``(H, W)`` mask shared by all channels.

    Measurement shape = image shape (0 where missing).  ``A`` is a diagonal
    orthogonal projector, so ``A+ = A = Q``.  ``mask`` is either a ``(H, W)``
    tensor/ndarray of 0/1 (1 = keep), described in ``params`` by a hash, or the
    name of a generated mask (``box``, ``random``, ``stripes``, ``text``; see
    :mod:`deqir_dist.masks`) whose parameters are passed as extra keywords.
    Default: ``mask="box"`` (centred box, a quarter of the area missing).
    """

    name = "inpaint"

    def __init__(self, image_shape, mask="box", **mask_kw):
        C, H, W = image_shape
        if isinstance(mask, str):
            if mask not in MASK_KINDS:
                raise DeqirError(f"inpaint mask must be a (H, W) 0/1 array or one of {', '.join(MASK_KINDS)}; got {mask!r}")
            full = mask_params(mask, **mask_kw)
            m = make_mask(mask, H, W, **full)
            params = {"mask": mask, **full}
        else:
            if mask_kw:
                raise DeqirError(f"inpaint parameter(s) {', '.join(sorted(mask_kw))} only apply to a named mask, not an array")
            m = self._validate_array(mask, H, W)
            params = {"mask": _mask_hash(m)}
        super().__init__(image_shape, image_shape, params)
        self.mask = m.to(torch.float32)  # (H, W), 1 = keep
        self._register("mask", m)

    @staticmethod
    def _validate_array(mask, H: int, W: int) -> torch.Tensor:
        if isinstance(mask, np.ndarray):
            mask = torch.from_numpy(mask)
        if not isinstance(mask, torch.Tensor):
            raise DeqirError(f"inpaint mask must be a (H, W) tensor/ndarray or a mask name, got {type(mask).__name__}")
        if tuple(mask.shape) != (H, W):
            raise DeqirError(f"inpaint mask must have shape (H, W) = ({H}, {W}), got {tuple(mask.shape)}")
        mask = mask.detach().cpu().to(torch.float64)
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise DeqirError("inpaint mask values must be 0 or 1 (1 = keep)")
        return mask

    def _forward(self, x):
        return x * self._buf("mask", x)

    _pinv = _forward

    def Q(self, x):
        return self.A(x)


class Colorize(Operator):
    """Colourisation: ``y = (x_R + x_G + x_B) / 3``, shape ``(1, H, W)``; needs C = 3.

    Per pixel ``A = [1/3, 1/3, 1/3]``, ``A A^T = 1/3``, so ``A+ = 3 A^T``
    repeats ``y`` over the 3 channels.
    """

    name = "colorize"

    def __init__(self, image_shape):
        C, H, W = image_shape
        if C != 3:
            raise DeqirError(f"colorize needs C = 3 channels, got {C}")
        super().__init__(image_shape, (1, H, W), {})

    def _forward(self, x):
        return x.mean(dim=1, keepdim=True)

    def _pinv(self, y):
        return y.repeat(1, 3, 1, 1)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform along the last dimension.

    Natural (Sylvester) ordering: ``H_1 = [1]``,
    ``H_2n = [[H_n, H_n], [H_n, -H_n]] / sqrt(2)``.  Length must be a power of
    two; ``log2(n)`` in-place butterfly passes on a copy, O(n log n).  The
    transform is symmetric and orthogonal, hence its own inverse.
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise DeqirError(f"fwht needs a power-of-two length, got {n}")
    batch = x.shape[:-1]
    y = x.clone(memory_format=torch.contiguous_format)
    h = 1
    while h < n:
        pairs = y.view(*batch, n // (2 * h), 2, h)
        top, bottom = pairs[..., 0, :], pairs[..., 1, :]
        a = top.clone()
        top.add_(bottom)  # a + b
        bottom.neg_().add_(a)  # a - b
        h *= 2
    return y / math.sqrt(n)


class CSWHT(Operator):
    """Compressed sensing with a randomly permuted Walsh-Hadamard transform.

    Per channel, with ``n = H W`` (a power of two) and ``m = n // ratio``:
    ``y = S Hn Pi vec(x)`` where ``Pi`` is a random permutation
    (``torch.randperm`` from a ``torch.Generator`` seeded with ``seed``), ``Hn``
    the orthonormal Walsh-Hadamard matrix (:func:`fwht`) and ``S`` keeps the
    first ``m`` coefficients.  Measurement shape ``(C, m)``.  The rows are
    orthonormal (``A A^T = I``), so ``A+ = A^T = Pi^T Hn S^T``.
    Defaults ``ratio=2``, ``seed=0``.
    """

    name = "cs_wht"
    measurement_is_image = False

    def __init__(self, image_shape, ratio: int = 2, seed: int = 0):
        ratio = _int_param(self.name, "ratio", ratio)
        seed = _int_param(self.name, "seed", seed, minimum=0)
        C, H, W = image_shape
        n = H * W
        if n & (n - 1):
            raise DeqirError(f"cs_wht needs H*W to be a power of two, got {H}x{W} = {n}")
        if ratio > n:
            raise DeqirError(f"cs_wht needs ratio <= H*W = {n} (at least one measurement), got {ratio}")
        super().__init__(image_shape, (C, n // ratio), {"ratio": ratio, "seed": seed})
        self.n, self.m = n, n // ratio
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        self._register("perm", perm)
        self._register("inv_perm", torch.argsort(perm))

    def _forward(self, x):
        B, C = x.shape[:2]
        flat = x.reshape(B, C, self.n)[..., self._buf("perm", x)]
        return fwht(flat)[..., : self.m]

    def _pinv(self, y):
        B, C = y.shape[:2]
        padded = y.new_zeros(B, C, self.n)
        padded[..., : self.m] = y
        flat = fwht(padded)[..., self._buf("inv_perm", y)]
        return flat.reshape(B, *self.image_shape)


class Denoise(Operator):
    """Denoising: ``A = A+ = I`` (the measurement is the noisy image itself)."""

    name = "denoise"

    def __init__(self, image_shape):
        super().__init__(image_shape, image_shape, {})

    def _forward(self, x):
        return x.clone()

    _pinv = _forward


# --------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Operator]] = {
    cls.name: cls
    for cls in (SRAvgPool, SRBicubic, DeblurGauss, DeblurUniform, DeblurAniso, Inpaint, Colorize, CSWHT, Denoise)
}
OPERATOR_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _validate_image_shape(image_shape) -> tuple[int, int, int]:
    try:
        dims = tuple(image_shape)
    except TypeError:
        dims = ()
    if len(dims) != 3 or not all(isinstance(d, Integral) and not isinstance(d, bool) and d > 0 for d in dims):
        raise DeqirError(f"image_shape must be three positive integers (C, H, W), got {image_shape!r}")
    return tuple(int(d) for d in dims)


def make_operator(name: str, image_shape, **params) -> Operator:
    """Build operator ``name`` for images of shape ``image_shape = (C, H, W)``.

    ``params`` are the operator's keyword parameters (see each class); unknown
    names, unknown parameters, invalid values and image sizes the operator
    does not allow raise :class:`DeqirError`.
    """
    cls = _REGISTRY.get(name)
    if cls is None:
        raise DeqirError(f"unknown operator {name!r}; valid operators: {', '.join(OPERATOR_NAMES)}")
    shape = _validate_image_shape(image_shape)
    sig = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.values()):
        allowed = [k for k in sig if k not in ("self", "image_shape")]
        unknown = sorted(set(params) - set(allowed))
        if unknown:
            valid = ", ".join(allowed) if allowed else "none"
            raise DeqirError(f"unknown parameter(s) {', '.join(unknown)} for operator {name!r}; valid: {valid}")
    return cls(shape, **params)

"""The operator base class: A, the pseudo-inverse A+, the projectors, and shared checks."""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from deqir_dist.errors import DeqirError

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

    def for_noise(self, sigma_y: float) -> Operator:
        """The operator to sample with when y carries noise of std ``sigma_y`` ([-1, 1] scale).

        Operators whose singular values are all equal (masks, pooling, colour, CS) have nothing to
        regularise and return themselves; :class:`SeparableOperator` drops the directions the
        noise swamps. ``sigma_y = 0`` always returns ``self`` (the exact pseudo-inverse)."""
        return self

    def filter_measurement(self, y: torch.Tensor, sigma_y: float) -> torch.Tensor:
        """y as the sampler should see it under noise of std ``sigma_y`` (default: unchanged)."""
        return y

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
    # Measurement noise (``for_noise``): a direction of gain s carries the noise at std sigma_y / s
    # in x; those with s / s_max <= NOISE_KEEP * sigma_y (relative to the operator's largest gain,
    # its gain on smooth images: an x4 average has s_max = 1/4 by normalisation, not by losing
    # information; noise above 1 / NOISE_KEEP of what the smoothest direction passes, more than the
    # signal such a direction holds in a photograph) count as null space and are left to the prior;
    # the kept ones are Wiener/Tikhonov filtered, s / (s^2 + sigma_y^2). ``bench/noise_scans.py``
    # chose 16 (the tuning crops, 8-bit deblurring: 2 -> 64 gives 25.5 / 29.0 / 32.5 / 34.7 / 32.7 / 29.8 dB).
    NOISE_KEEP = 16.0
    noise_std: float = 0.0

    def _set_matrices(self, Mh: torch.Tensor, Mw: torch.Tensor) -> None:
        Mh, Mw = Mh.to(torch.float64), Mw.to(torch.float64)
        Uh, sh, Vh_t = torch.linalg.svd(Mh, full_matrices=False)
        Uw, sw, Vw_t = torch.linalg.svd(Mw, full_matrices=False)
        s = sh[:, None] * sw[None, :]
        mats = {"Mh": Mh, "Mw_t": Mw.T, "Uh_t": Uh.T, "Uw": Uw, "Uh": Uh, "Uw_t": Uw.T, "Vh": Vh_t.T, "Vw_t": Vw_t,
                "s": s}
        for key, value in mats.items():
            self._register(key, value)
        self._set_threshold(self.pinv_rtol * float(s.max()))

    def _set_threshold(self, threshold: float) -> None:
        s = self._buffers["s"]
        keep = s > threshold
        inv = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
        self._register("inv", inv)
        self._register("keep", keep.to(torch.float64))
        self._converted = {}
        self.rank = int(keep.sum())

    def for_noise(self, sigma_y: float) -> SeparableOperator:
        """A copy that treats the directions with s <= ``NOISE_KEEP * sigma_y * s_max`` as null space (the
        prior fills them); the exact pseudo-inverse identities hold for the copy as they do here.
        With :meth:`filter_measurement` the sampler's range-space target becomes the Tikhonov
        estimate A+_s y = V (s / (s^2 + sigma_y^2)) U^T y on the kept directions."""
        sigma_y = float(sigma_y)
        if not sigma_y > 0:
            return self
        s_max = float(self._buffers["s"].max())
        threshold = max(self.pinv_rtol * s_max, self.NOISE_KEEP * sigma_y * s_max)
        op = object.__new__(type(self))
        op.__dict__.update(self.__dict__)
        op._buffers = dict(self._buffers)
        op.noise_std = sigma_y
        op._set_threshold(threshold)
        return op

    def filter_measurement(self, y: torch.Tensor, sigma_y: float) -> torch.Tensor:
        """A A+_s y: y Wiener-filtered in the SVD, w = s^2 / (s^2 + sigma_y^2) on each kept direction,
        so that ``A_pinv`` of the result is the Tikhonov estimate of x (unchanged for sigma_y = 0)."""
        sigma_y = float(sigma_y)
        if not sigma_y > 0:
            return y
        y = self._check(y, self.measurement_shape, "filter_measurement")
        s = self._buf("s", y)
        w = s * s / (s * s + sigma_y ** 2) * self._buf("keep", y)
        z = self._buf("Uh_t", y) @ y @ self._buf("Uw", y)
        return self._buf("Uh", y) @ (z * w) @ self._buf("Uw_t", y)

    def _forward(self, x):
        return self._buf("Mh", x) @ x @ self._buf("Mw_t", x)

    def _pinv(self, y):
        z = self._buf("Uh_t", y) @ y @ self._buf("Uw", y)
        return self._buf("Vh", y) @ (z * self._buf("inv", y)) @ self._buf("Vw_t", y)

"""An operator on a padded canvas: any image size for a model that needs a size multiple.

``PaddedOperator(inner, (H2, W2))`` acts on (C, H2, W2) images whose top-left (C, H, W) block is
the image of ``inner``: ``A(x) = inner.A(crop(x))`` and ``A+(y) = pad(inner.A+(y))`` with zeros.
Cropping C has orthonormal rows (C C^T = I), so ``(inner.A C)+ = C^T inner.A+`` exactly: the
Moore-Penrose identities carry over, ``Q = C^T Q_inner C``, and the padding is pure null space,
which the prior fills; :meth:`crop` cuts the result back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from deqir_dist.errors import DeqirError
from deqir_dist.physics.base import Operator


class PaddedOperator(Operator):
    def __init__(self, inner: Operator, size: tuple[int, int]):
        C, H, W = inner.image_shape
        H2, W2 = (int(v) for v in size)
        if H2 < H or W2 < W:
            raise DeqirError(f"cannot pad a {H}x{W} image to the smaller {H2}x{W2}")
        super().__init__((C, H2, W2), inner.measurement_shape, {**inner.params, "padded_from": [H, W]})
        self.inner = inner
        self.name = inner.name
        self.measurement_is_image = inner.measurement_is_image
        self.pad = (0, W2 - W, 0, H2 - H)

    @staticmethod
    def to_multiple(inner: Operator, multiple: int) -> Operator:
        """``inner`` itself when its H, W are multiples of ``multiple``, else it on the next larger canvas."""
        _, H, W = inner.image_shape
        if multiple <= 1 or (H % multiple == 0 and W % multiple == 0):
            return inner
        return PaddedOperator(inner, (-(-H // multiple) * multiple, -(-W // multiple) * multiple))

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H2, W2) -> the inner image (B, C, H, W)."""
        _, H, W = self.inner.image_shape
        return x[..., :H, :W]

    def _forward(self, x):
        return self.inner.A(self.crop(x))

    def _pinv(self, y):
        return F.pad(self.inner.A_pinv(y), self.pad)

    def Q(self, x):
        return F.pad(self.inner.Q(self.crop(x)), self.pad)

    def for_noise(self, sigma_y: float) -> Operator:
        inner = self.inner.for_noise(sigma_y)
        return self if inner is self.inner else PaddedOperator(inner, self.image_shape[1:])

    def filter_measurement(self, y: torch.Tensor, sigma_y: float) -> torch.Tensor:
        return self.inner.filter_measurement(y, sigma_y)

"""Per-pixel operators: colorisation (luma) and denoising (identity)."""
from __future__ import annotations

from deqir_dist.errors import DeqirError
from deqir_dist.physics.base import Operator


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


class Denoise(Operator):
    """Denoising: ``A = A+ = I`` (the measurement is the noisy image itself)."""

    name = "denoise"

    def __init__(self, image_shape):
        super().__init__(image_shape, image_shape, {})

    def _forward(self, x):
        return x.clone()

    _pinv = _forward

"""The chain's random draws: the initial noise xi and the per-step noise z, in a fixed order."""
from __future__ import annotations

import torch


def draw_noise(batch: int, image_shape, steps: int, nw: float, generator: torch.Generator | None,
               rows: tuple[int, int] | None = None):
    """xi (B, C, H, W), then (when nw > 0) z_i per image and step, in that order: CPU float32.

    Only the z rows in ``rows`` = [lo, hi) are kept (B, hi - lo, C, H, W), so a rank that owns
    a block of the chain never holds all of them; the draws are the same whatever ``rows`` is.
    """
    xi = torch.randn((batch, *image_shape), generator=generator)
    if nw <= 0:
        return xi, None
    lo, hi = rows or (0, steps)
    z = torch.empty((batch, hi - lo, *image_shape))
    for b in range(batch):
        for i in range(steps):
            zi = torch.randn(tuple(image_shape), generator=generator)
            if lo <= i < hi:
                z[b, i - lo] = zi
    return xi, z

"""Inpainting: a pixel mask as the operator."""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from deqir_dist.errors import DeqirError
from deqir_dist.physics.base import Operator
from deqir_dist.physics.masks import MASK_KINDS, make_mask, mask_params

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

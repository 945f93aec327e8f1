"""Compressed sensing with a subsampled Walsh-Hadamard transform."""
from __future__ import annotations

import math

import torch

from deqir_dist.errors import DeqirError
from deqir_dist.physics.base import Operator, _int_param


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

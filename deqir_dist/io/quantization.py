"""The measurement noise a file's bit depth implies: the default sigma_y of a real measurement.

Rounding to b bits adds uniform noise of width one code, 1 / (2^b - 1) of [0, 1], whose std is
that width / sqrt(12); in the sampler's [-1, 1] scale, twice that. An 8-bit PNG or a JPEG (its
decoded samples are 8-bit) therefore carries at least 2 / (255 sqrt(12)) = 0.00226, which the
truncated pseudo-inverse of a blur amplifies by up to 1000x unless it is modelled.
"""
from __future__ import annotations

import math
import os

import torch

# JPEG adds block-DCT and chroma-subsampling error far above 8-bit rounding (std 0.018 at quality
# 95, 0.034 at 75 on held-out crops, [-1, 1] scale). Deblurring 8-bit JPEGs of the four tuning
# crops (``python bench/noise_scans.py``, bench/results/noise-scans-builtin-cpu.json; serial, the
# card's settings): sigma_y 0.00226 / 0.005 / 0.01 / 0.02 / 0.04 gave 23.4 / 26.3 / 28.0 / 26.0 /
# 23.6 dB at quality 95 and 20.0 / 23.1 / 25.5 / 25.3 / 23.5 dB at 75, the best Tikhonov filter
# 26.9 / 24.4; SR x4 hardly depends on it (within 0.1 dB). 0.01 is the default for a JPEG file;
# give --sigma-y for heavier compression.
JPEG_SIGMA = 0.01


def quantization_sigma(bits: int | None) -> float:
    """std of b-bit rounding noise in the [-1, 1] scale (0 for None: a float measurement)."""
    if bits is None:
        return 0.0
    return 2.0 / ((2 ** bits - 1) * math.sqrt(12.0))


def sample_bits(y: torch.Tensor, candidates=(8, 16), tol: float = 1e-3) -> int | None:
    """The smallest bit depth b whose grid (2^b - 1 codes over [-1, 1]) holds every sample of y,
    or None (a float measurement). Read from the data, so an 8-bit image stored in a 16-bit file
    (every code a multiple of 257) counts as 8-bit, which it is."""
    u = (y.detach().to(torch.float64) + 1) / 2
    for b in candidates:
        codes = u * (2 ** b - 1)
        if bool(((codes - codes.round()).abs() <= tol).all()):
            return b
    return None


def is_jpeg(path: str | os.PathLike) -> bool:
    """True when the file starts with the JPEG SOI marker (FF D8 FF), whatever its name."""
    try:
        with open(path, "rb") as f:
            return f.read(3) == b"\xff\xd8\xff"
    except OSError:
        return False


def default_sigma_y(y: torch.Tensor, path: str | os.PathLike | None = None) -> tuple[float, str]:
    """(sigma_y, where it came from) for a measurement read from a file (``path``: a JPEG gets
    :data:`JPEG_SIGMA`)."""
    if path is not None and is_jpeg(path):
        return JPEG_SIGMA, "JPEG file: compression noise, JPEG_SIGMA (io/quantization.py)"
    bits = sample_bits(y)
    if bits is None:
        return 0.0, "float measurement (no quantisation)"
    return quantization_sigma(bits), f"{bits}-bit samples: quantisation std 2 / ((2^{bits} - 1) sqrt(12))"

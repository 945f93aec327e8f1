"""``load_denoiser``: a denoiser by name (or, later, from a checkpoint file)."""
from __future__ import annotations

import torch

from ..errors import DeqirError
from .analytic import GaussianMixtureDenoiser

MODEL_NAMES = ("analytic",)


def load_denoiser(name_or_path: str, checkpoint=None, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> torch.nn.Module:
    """A ready-to-use denoiser in eval mode.

    ``analytic``: the closed-form Gaussian-mixture oracle (no weights; any image size).
    """
    if name_or_path == "analytic":
        if checkpoint is not None:
            raise DeqirError("the analytic model takes no checkpoint")
        model = GaussianMixtureDenoiser()
    else:
        raise DeqirError(f"unknown model {name_or_path!r}; choose from {', '.join(MODEL_NAMES)}")
    model = model.eval()
    if device is not None:
        model = model.to(device)
    if dtype is not None:
        model = model.to(dtype)
    return model

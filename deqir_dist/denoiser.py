"""The denoiser protocol: ``eps = model(x, t)``.

x is (B, C, H, W) in [-1, 1], t is (B,) int64 training timesteps; the output has C channels,
or 2C for models with a learned variance (the first C are eps). The chain runs on the model's
device; the model may compute in a lower precision than the solver state (float32).
"""
from __future__ import annotations

import torch

from .errors import DeqirError


def model_device(model, default: torch.device | str = "cpu") -> torch.device:
    """Device of the first parameter or buffer of a module, else ``default``."""
    if isinstance(model, torch.nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return torch.device(default)


def model_dtype(model) -> torch.dtype | None:
    """Floating dtype of the first floating parameter of a module, or None."""
    if isinstance(model, torch.nn.Module):
        for t in model.parameters():
            if t.is_floating_point():
                return t.dtype
    return None


class EpsFn:
    """Calls a denoiser in its own precision and returns eps (first C channels) in ``dtype``."""

    def __init__(self, model, channels: int, dtype: torch.dtype = torch.float32):
        if not callable(model):
            raise DeqirError("the denoiser must be callable as model(x, t)")
        self.model = model
        self.channels = channels
        self.dtype = dtype
        self.model_dtype = model_dtype(model)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xin = x if self.model_dtype is None else x.to(self.model_dtype)
        out = self.model(xin, t)
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != x.shape[0] \
                or out.shape[-2:] != x.shape[-2:]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DeqirError(f"denoiser returned {shape} for input {tuple(x.shape)}; expected (B, C or 2C, H, W)")
        c = self.channels
        if out.shape[1] not in (c, 2 * c):
            raise DeqirError(f"denoiser returned {out.shape[1]} channels; expected {c} or {2 * c}")
        return out[:, :c].to(self.dtype)

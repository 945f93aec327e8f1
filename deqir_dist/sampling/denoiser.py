"""The denoiser protocol: ``eps = model(x, t)``.

x is (B, C, H, W) in [-1, 1], t is (B,) int64 training timesteps; the output has C channels,
or 2C for models with a learned variance (the first C are eps). The chain runs on the model's
device; the model may compute in a lower precision than the solver state (float32).
"""
from __future__ import annotations

import torch

from deqir_dist.errors import DeqirError
from deqir_dist.sampling.schedule import linear_alphas_cumprod


def model_device(model, default: torch.device | str = "cpu") -> torch.device:
    """Device of the first parameter or buffer of a module, else ``default``."""
    if isinstance(model, torch.nn.Module):
        for t in model.parameters():
            return t.device
        for t in model.buffers():
            return t.device
    return torch.device(default)


def resolve_device(name: str | None = None) -> torch.device:
    """``name`` ("cpu", "cuda", "cuda:1", ...) as an available torch.device; None: cuda if available, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        raise DeqirError(f"unknown device {name!r}; use cpu, cuda or cuda:INDEX") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeqirError(f"device {name!r}: this torch build sees no CUDA device (torch {torch.__version__}); "
                             "use device 'cpu', or install a CUDA build of torch on a machine with a GPU")
        if dev.index is not None and dev.index >= count:
            raise DeqirError(f"device {name!r}: only {count} CUDA device(s) visible")
    elif dev.type != "cpu":
        raise DeqirError(f"unsupported device {name!r}; use cpu or cuda[:INDEX]")
    return dev


def model_dtype(model) -> torch.dtype | None:
    """Floating dtype of the first floating parameter of a module, or None."""
    if isinstance(model, torch.nn.Module):
        for t in model.parameters():
            if t.is_floating_point():
                return t.dtype
    return None


def unwrap_output(out):
    """The eps tensor of a model's output: a tensor as it is; an object with a tensor ``.sample``
    (diffusers' ``UNet2DOutput``) or a one-element tuple (``return_dict=False``) unwrapped."""
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and len(out) == 1 and isinstance(out[0], torch.Tensor):
        return out[0]
    return out


class EpsFn:
    """Calls a denoiser in its own precision and returns eps (first C channels) in ``dtype``.

    ``clip_abar`` (the training schedule's alphas_cumprod, indexed by t) turns on x0 clipping
    as a property of the denoiser: with x0 = (x - sqrt(1 - a) eps) / sqrt(a), a = abar[t], it
    returns the eps whose x0 is clamp(x0, -1, 1), eps' = (x - sqrt(a) clamp(x0)) / sqrt(1 - a).
    Every sampler (serial, the chain solvers) sees the same eps, so the chain keeps its linear
    structure and its fixed point is the clipped serial trajectory (DDPM's ``clip_denoised``;
    DDNM and DeqIR do not clip)."""

    def __init__(self, model, channels: int, dtype: torch.dtype = torch.float32,
                 clip_abar: torch.Tensor | None = None):
        if not callable(model):
            raise DeqirError("the denoiser must be callable as model(x, t)")
        self.model = model
        self.channels = channels
        self.dtype = dtype
        self.model_dtype = model_dtype(model)
        self.clip_abar = None if clip_abar is None else torch.as_tensor(clip_abar, dtype=torch.float64)

    @classmethod
    def for_chain(cls, model, channels: int, dtype: torch.dtype, clip_x0: bool, alphas_cumprod=None) -> EpsFn:
        """The eps a chain samples with: x0 clipped when ``clip_x0``, on ``alphas_cumprod``
        (default: the linear training schedule)."""
        abar = (linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod) if clip_x0 else None
        return cls(model, channels, dtype, clip_abar=abar)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xin = x if self.model_dtype is None else x.to(self.model_dtype)
        out = unwrap_output(self.model(xin, t))
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != x.shape[0] \
                or out.shape[-2:] != x.shape[-2:]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise DeqirError(f"denoiser returned {shape} for input {tuple(x.shape)}; expected (B, C or 2C, H, W)")
        c = self.channels
        if out.shape[1] not in (c, 2 * c):
            raise DeqirError(f"denoiser returned {out.shape[1]} channels; expected {c} or {2 * c}")
        eps = out[:, :c].to(self.dtype)
        if self.clip_abar is None:
            return eps
        if self.clip_abar.device != x.device:          # once: no host copy per call
            self.clip_abar = self.clip_abar.to(x.device)
        a = self.clip_abar[t].to(x.dtype).view(-1, 1, 1, 1)
        x = x.to(eps.dtype)
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

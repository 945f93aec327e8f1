"""Opt-in CUDA-graph replay of a denoiser for a fixed batch shape.

``CUDAGraphDenoiser(model, batch_shape)`` captures ``model(x, t)`` on its first call (after a few
warm-up runs on a side stream) into static input/output buffers and afterwards replays the graph:
one launch per call instead of hundreds of kernels, which matters for the small batches of the
fixed-point solvers. The wrapped model must build everything inside ``forward`` on its device
(``ADMUNet`` and ``DDPMUNet`` do: no host tensors, no synchronisation).

Calls whose batch is *smaller* than the captured one (images stop independently and leave the
solver's batch) are padded into the static buffer and the first rows are returned; this relies on
batch rows being independent, which holds for the UNets in eval mode. Calls with another image
shape, dtype or device, or a larger batch, run the model eagerly (counted in ``eager_calls``).

Without CUDA (model on the CPU, or no CUDA build) the constructor raises ``DeqirError``, unless
``fallback=True``: then every call runs the model eagerly, so code can use the wrapper
unconditionally. The returned tensor is a fresh copy unless ``copy_output=False`` (then it is a
view of the static output buffer, overwritten by the next call). Inference only: capture and
replay run under ``torch.no_grad()``; put the model in eval mode and keep its weights in place
(``reset()`` re-captures).
"""
from __future__ import annotations

import torch
from torch import nn

from deqir_dist.errors import DeqirError
from deqir_dist.sampling.denoiser import model_device


class CUDAGraphDenoiser(nn.Module):
    def __init__(self, model: nn.Module, batch_shape, warmup: int = 2, fallback: bool = False,
                 copy_output: bool = True):
        super().__init__()
        shape = tuple(int(s) for s in batch_shape)
        if len(shape) != 4 or min(shape) < 1:
            raise DeqirError(f"batch_shape must be (B, C, H, W) with positive sizes; got {tuple(batch_shape)}")
        self.model = model
        self.batch_shape = shape
        self.warmup = max(1, int(warmup))
        self.copy_output = copy_output
        self.device = model_device(model)
        self.enabled = self.device.type == "cuda" and torch.cuda.is_available()
        if not self.enabled and not fallback:
            raise DeqirError(f"CUDA graphs need the model on a CUDA device (it is on {self.device}); "
                             f"call the model directly, or pass fallback=True to run it eagerly")
        self.graph = None
        self._x = self._t = self._out = None
        self.replays = 0
        self.eager_calls = 0

    def _capture(self, dtype: torch.dtype) -> None:
        b = self.batch_shape[0]
        self._x = torch.zeros(self.batch_shape, dtype=dtype, device=self.device)
        self._t = torch.zeros(b, dtype=torch.int64, device=self.device)
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.model(self._x, self._t)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            self._out = self.model(self._x, self._t)
        self.graph = graph

    def reset(self) -> None:
        """Drop the captured graph (e.g. after changing the model's weights in a new tensor)."""
        self.graph = None
        self._x = self._t = self._out = None

    def _eager(self, x, t):
        self.eager_calls += 1
        return self.model(x, t)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self._eager(x, t)
        b = x.shape[0]
        if (x.dim() != 4 or tuple(x.shape[1:]) != self.batch_shape[1:] or b > self.batch_shape[0]
                or x.device != self.device or (self._x is not None and x.dtype != self._x.dtype)
                or t.dim() != 1 or t.shape[0] != b):
            return self._eager(x, t)
        if self.graph is None:
            self._capture(x.dtype)
        self._x[:b].copy_(x)
        self._t[:b].copy_(t)
        self.graph.replay()
        self.replays += 1
        out = self._out[:b]
        return out.clone() if self.copy_output else out

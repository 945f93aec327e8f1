"""An exact test oracle: a Gaussian-mixture image prior with closed-form E[eps | x_t].

Prior: x0 ~ sum_k pi_k N(mu_k, s_k^2 I) over images of shape (C, H, W). Then
x_t = sqrt(abar) x0 + sqrt(1 - abar) e has the mixture density
sum_k pi_k N(sqrt(abar) mu_k, v_k I), v_k = abar s_k^2 + 1 - abar, and the MMSE noise estimate is

    E[e | x_t] = sqrt(1 - abar) * sum_k w_k(x_t) (x_t - sqrt(abar) mu_k) / v_k,
    w_k(x_t) = softmax_k( log pi_k - D/2 log v_k - |x_t - sqrt(abar) mu_k|^2 / (2 v_k) ).

A real nonlinear denoiser with no training: whatever sampler runs on it, the serial chain is the
exact reference. The means are smooth colour patterns defined at every resolution (a few seeded
sinusoids), so the model takes any (C, H, W).
"""
from __future__ import annotations

import math

import torch

from deqir_dist.sampling.schedule import linear_alphas_cumprod


class GaussianMixtureDenoiser(torch.nn.Module):
    """Closed-form eps-prediction for a seeded Gaussian mixture of smooth images."""

    def __init__(self, n_components: int = 8, seed: int = 0, std_range=(0.05, 0.2),
                 n_waves: int = 4, alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        k = n_components
        self.n_components = k
        self.seed = seed
        self.n_waves = n_waves
        # Pattern parameters: per component, per wave: frequency (fy, fx), phase, colour amplitude.
        self.register_buffer("freq", torch.rand(k, n_waves, 2, generator=g, dtype=torch.float64) * 3.0 + 0.5)
        self.register_buffer("phase", torch.rand(k, n_waves, generator=g, dtype=torch.float64) * 2 * math.pi)
        self.register_buffer("colour", torch.randn(k, n_waves, 4, generator=g, dtype=torch.float64))
        self.register_buffer("offset", torch.rand(k, 4, generator=g, dtype=torch.float64) * 0.8 - 0.4)
        lo, hi = std_range
        self.register_buffer("stds", lo + (hi - lo) * torch.rand(k, generator=g, dtype=torch.float64))
        self.register_buffer("log_weights", torch.log_softmax(torch.randn(k, generator=g, dtype=torch.float64), 0))
        ac = linear_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        self.register_buffer("alphas_cumprod", ac)
        self._means_cache: dict = {}

    def means(self, shape, device=None) -> torch.Tensor:
        """The K component means at image shape (C, H, W): (K, C, H, W) float64 in [-1, 1]."""
        c, h, w = shape
        if c > 4:
            raise ValueError("the analytic prior supports up to 4 channels")
        key = (c, h, w, str(device))
        if key not in self._means_cache:
            dev = self.freq.device
            yy = torch.linspace(0, 1, h, dtype=torch.float64, device=dev).view(1, h, 1)
            xx = torch.linspace(0, 1, w, dtype=torch.float64, device=dev).view(1, 1, w)
            mus = []
            for k in range(self.n_components):
                img = self.offset[k, :c].view(c, 1, 1).expand(c, h, w).clone()
                for j in range(self.n_waves):
                    fy, fx = self.freq[k, j]
                    wave = torch.sin(2 * math.pi * (fy * yy + fx * xx) + self.phase[k, j])
                    img = img + 0.35 * self.colour[k, j, :c].view(c, 1, 1) * wave
                mus.append(torch.tanh(img))
            self._means_cache[key] = torch.stack(mus).to(device or dev)
        return self._means_cache[key]

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        xd = x.double()
        mu = self.means(tuple(x.shape[1:]), x.device)                     # (K, C, H, W)
        ab = self.alphas_cumprod.to(x.device)[t.long()].view(b, 1, 1, 1, 1)  # (B, 1, 1, 1, 1)
        var = ab * self.stds.to(x.device).view(1, -1, 1, 1, 1) ** 2 + 1 - ab  # (B, K, 1, 1, 1)
        diff = xd.unsqueeze(1) - ab.sqrt() * mu.unsqueeze(0)               # (B, K, C, H, W)
        d = x[0].numel()
        logits = (self.log_weights.to(x.device).view(1, -1)
                  - 0.5 * d * torch.log(var.view(b, -1))
                  - diff.pow(2).flatten(2).sum(-1) / (2 * var.view(b, -1)))
        w = torch.softmax(logits, dim=1).view(b, -1, 1, 1, 1)
        eps = (1 - ab).sqrt().squeeze(1) * (w * diff / var).sum(1)
        return eps.to(x.dtype)

    @torch.no_grad()
    def sample(self, n: int, shape, generator: torch.Generator | None = None) -> torch.Tensor:
        """n clean images x0 drawn from the prior, (n, C, H, W) float32."""
        mu = self.means(tuple(shape))
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn((n, *shape), generator=generator, dtype=torch.float64)
        return (mu[comp] + self.stds[comp].view(n, 1, 1, 1) * noise).float()

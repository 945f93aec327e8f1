"""deqir-dist: diffusion image restoration (DDNM / DeqIR) with parallel fixed-point sampling.

    import deqir_dist as dq
    model = dq.load_denoiser("builtin")
    op = dq.make_operator("sr_bicubic", image_shape=(3, 64, 64), scale=4)
    res = dq.restore(model, op.A(x), op, steps=25)

The layers, lowest first (each imports only the ones below it): ``sampling`` (the chain as
mathematics), ``physics`` (operators), ``io``, ``data``, ``quality`` (metrics, baselines),
``parallel`` (what blocks exchange), ``models``, ``solvers``, ``api``, ``dataset``, ``ray``,
``apps`` (the command line). See ARCHITECTURE.md.
"""
from deqir_dist.api.inversion import NoiseGradient, noise_gradient
from deqir_dist.api.optimize import NoiseOptimization, optimize_noise
from deqir_dist.api.restore import RestoreResult, restore
from deqir_dist.dataset.items import restore_file
from deqir_dist.errors import DeqirError
from deqir_dist.io.images import read_image, write_image
from deqir_dist.models import load_denoiser
from deqir_dist.physics.registry import OPERATOR_NAMES, make_operator
from deqir_dist.quality.metrics import psnr, ssim
from deqir_dist.sampling.schedule import (
           chain_coefficients,
           linear_alphas_cumprod,
           timestep_grid,
)

__all__ = ["DeqirError", "NoiseGradient", "NoiseOptimization", "OPERATOR_NAMES", "RestoreResult",
           "chain_coefficients", "linear_alphas_cumprod", "load_denoiser", "make_operator", "noise_gradient",
           "optimize_noise", "psnr", "read_image", "restore", "restore_file", "ssim", "timestep_grid", "write_image"]
__version__ = "0.1.0"

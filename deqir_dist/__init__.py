"""deqir-dist: diffusion image restoration (DDNM / DeqIR) with parallel fixed-point sampling.

    import deqir_dist as dq
    op = dq.make_operator("sr_bicubic", image_shape=(3, 64, 64), scale=4)
    res = dq.restore(denoiser, y, op, steps=25, solver="anderson")
"""
from .errors import DeqirError
from .models import load_denoiser
from .operators import OPERATOR_NAMES, make_operator
from .restore import RestoreResult, restore
from .schedule import chain_coefficients, linear_alphas_cumprod, timestep_grid

__all__ = ["DeqirError", "OPERATOR_NAMES", "RestoreResult", "chain_coefficients", "linear_alphas_cumprod",
           "load_denoiser", "make_operator", "restore", "timestep_grid"]
__version__ = "0.1.0"

"""Denoisers: the exact Gaussian-mixture oracle (and, later, the pretrained UNets)."""
from .analytic import GaussianMixtureDenoiser
from .registry import MODEL_NAMES, load_denoiser

__all__ = ["GaussianMixtureDenoiser", "MODEL_NAMES", "load_denoiser"]

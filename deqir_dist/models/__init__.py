"""Denoisers: the exact Gaussian-mixture oracle and the pretrained UNets (ADM, DDPM)."""
from .adm import ADMUNet, adm_256_uncond_config, adm_config
from .analytic import GaussianMixtureDenoiser
from .cuda_graph import CUDAGraphDenoiser
from .ddpm import DDPMUNet, sdedit_celeba_hq_config
from .loading import (
           PRESETS,
           infer_config,
           load_checkpoint,
           read_state_dict,
           save_denoiser,
)
from .registry import MODEL_NAMES, load_denoiser

__all__ = ["ADMUNet", "CUDAGraphDenoiser", "DDPMUNet", "GaussianMixtureDenoiser", "MODEL_NAMES", "PRESETS",
           "adm_256_uncond_config", "adm_config", "infer_config", "load_checkpoint", "load_denoiser",
           "read_state_dict", "save_denoiser", "sdedit_celeba_hq_config"]

"""Tasks and their parameters: the task names, which flags apply to which task, and the operator
keyword arguments they build (shared by the CLI and dataset manifests)."""
from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch

from deqir_dist.errors import DeqirError
from deqir_dist.io.images import read_image
from deqir_dist.physics.registry import _REGISTRY

# the named tasks the demo and the benchmarks run: name -> (operator, its parameters)
DEMO_TASKS = {
    "sr_bicubic_x4": ("sr_bicubic", {"scale": 4}),
    "deblur_gauss": ("deblur_gauss", {}),
    "inpaint_box": ("inpaint", {"mask": "box"}),
    "inpaint_random": ("inpaint", {"mask": "random"}),
    "colorize": ("colorize", {}),
}

MASK_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
TASKS = ("sr_avgpool", "sr_bicubic", "deblur_gauss", "deblur_uniform", "deblur_aniso",
         "inpaint", "colorize", "cs_wht", "denoise")

# CLI flag -> operator keyword (only flags the user sets are passed on)
OP_FLAGS = {"scale": "scale", "kernel_size": "size", "blur_sigma": "sigma", "sigma_h": "sigma_h",
             "sigma_w": "sigma_w", "mask": "mask", "mask_fraction": "fraction", "mask_seed": "seed",
             "ratio": "ratio", "cs_seed": "seed"}


# flags that belong to one task only (their keys are shared: both seeds are "seed")
FLAG_TASK = {"mask": "inpaint", "mask_fraction": "inpaint", "mask_seed": "inpaint", "ratio": "cs_wht",
              "cs_seed": "cs_wht"}


def measurable(x: torch.Tensor, task: str) -> torch.Tensor:
    """``x`` (..., H, W) centre-cropped so a ``DEMO_TASKS`` operator can measure it: H and W down to
    multiples of the scale for super-resolution (the low-resolution grid must tile the image),
    unchanged otherwise (any size restores: ``restore`` pads to the model's multiple)."""
    _, params = DEMO_TASKS[task]
    s = int(params.get("scale", 1))
    h, w = x.shape[-2:]
    top, left = (h % s) // 2, (w % s) // 2
    return x[..., top:top + h - h % s, left:left + w - w % s]


def task_flags(task: str) -> list[str]:
    """The task flags (attribute names) that apply to ``task``."""
    sig = inspect.signature(_REGISTRY[task].__init__).parameters
    keys = set(sig) | ({"fraction", "seed"} if task == "inpaint" else set())    # inpaint: the mask's parameters
    return [f for f, k in OP_FLAGS.items() if k in keys and FLAG_TASK.get(f, task) == task]



def operator_params(task: str, flags: dict) -> dict:
    """Operator keyword arguments from task flags (CLI attribute names, None = not set): checks
    that each flag applies to ``task``; a mask given as an image file is read (white = keep)."""
    params = {}
    valid = task_flags(task)
    invert = bool(flags.get("mask_invert"))
    for flag, key in OP_FLAGS.items():
        v = flags.get(flag)
        if v is None:
            continue
        if flag not in valid:
            names = ", ".join("--" + f.replace("_", "-") for f in valid) or "none"
            raise DeqirError(f"--{flag.replace('_', '-')} does not apply to --task {task} (its flags: {names})")
        params[key] = v
    mask = params.get("mask")
    is_file = mask is not None and not isinstance(mask, torch.Tensor) and Path(mask).suffix.lower() in MASK_IMAGE_SUFFIXES
    if invert and not is_file:
        raise DeqirError("--mask-invert applies to a mask image (--mask FILE.png); give one, or drop --mask-invert")
    if is_file:
        keep = read_image(mask, channels=1)[0] > 0
        params["mask"] = (~keep if invert else keep).float()
        check_mask_convention(params["mask"], mask, invert)
    return params


def check_mask_convention(mask: torch.Tensor, source, inverted: bool = False) -> None:
    """A warning when a mask image keeps less than half of the picture: here white (1) = keep and
    black (0) = missing, the opposite of diffusers' and OpenCV's inpainting masks, so a mask that
    drops most of the image has most likely been drawn the other way round."""
    missing = 1.0 - float(mask.mean())
    if missing > 0.5:
        how = "after --mask-invert " if inverted else ""
        fix = "check the mask" if inverted else "if white marks the hole in yours, pass --mask-invert"
        warnings.warn(f"mask {source} {how}leaves {missing:.0%} of the image missing: deqir's masks are white = "
                      f"keep, black = missing (diffusers and OpenCV use the opposite); {fix}", UserWarning,
                      stacklevel=3)

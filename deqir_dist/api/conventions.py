"""What a diffusers / deepinv user types, mapped onto ``restore``'s own conventions.

* ``eta`` (diffusers' and DDIM's name) is accepted for DDNM's ``etw``; both given and different is
  an error. (DDIM's eta also injects fresh noise; here that is the separate ``nw``.)
* ``num_inference_steps`` (diffusers' name) is accepted for ``steps``; a pipeline-like model
  (``.unet`` and ``.scheduler``) and ``scheduler=`` / ``prediction_type=`` are
  ``models.scheduled.as_denoiser``'s.
* ``device=``: the chain runs there; a torch module on another device is moved (``module.to``,
  in place, as diffusers' ``pipeline.to`` does).
* Images are in [-1, 1]. A measurement that looks like [0, 1] data is warned about;
  ``value_range=(0, 1)`` converts it exactly (y -> 2 y - A(1) for the linear operators here, and
  sigma_y -> 2 sigma_y); ``value_range=(-1, 1)`` says the data is right and silences the warning.
* ``num_inference_steps`` (diffusers) is ``steps``; ``output_type="pt"`` is what ``restore``
  returns (tensors); "pil" / "np" are pointed at ``RestoreResult.to_pil()`` / ``.images``.
  An operator's parameter given to ``restore`` (``size``, ``kernel_size``, ...) is reported as
  one, not as an unknown solver option (:func:`diffusers_names`).
* The measurement model every sampler runs (``sampling_problem``: ``restore``, ``noise_gradient``,
  ``optimize_noise``): the operator for the noise (``for_noise`` / ``filter_measurement``) on the
  model's canvas (``PaddedOperator.to_multiple``), the result cropped back.
"""
from __future__ import annotations

import warnings

import torch

from deqir_dist.errors import DeqirError, check_int, check_tensor, is_real
from deqir_dist.physics.padded import PaddedOperator
from deqir_dist.sampling.denoiser import model_device, resolve_device

VALUE_RANGES = ((-1, 1), (0, 1))


def resolve_eta(etw, eta) -> float:
    """``etw`` from ``etw`` and its alias ``eta`` (either may be None; both None: 0)."""
    for name, v in (("etw", etw), ("eta", eta)):
        if v is not None and not is_real(v):
            raise DeqirError(f"{name} must be a number, got {v!r}")
    if etw is not None and eta is not None and float(etw) != float(eta):
        raise DeqirError(f"eta is another name for etw; both given and different (etw={etw}, eta={eta}): give one")
    v = etw if etw is not None else eta
    return 0.0 if v is None else float(v)


# operator parameters, under make_operator's and restore_file's names: not restore's
_OPERATOR_WORDS = ("scale", "size", "sigma", "sigma_h", "sigma_w", "mask", "fraction", "seed", "ratio",
                   "kernel_size", "blur_sigma", "mask_fraction", "mask_seed", "cs_seed", "image_shape")


def diffusers_names(steps, solver_options: dict):
    """``steps`` with diffusers' ``num_inference_steps`` folded in, and ``solver_options`` without
    the diffusers names (``output_type``); an operator parameter among them is a DeqirError."""
    n = solver_options.pop("num_inference_steps", None)
    if n is not None:
        if steps is not None and n != steps:
            raise DeqirError(f"num_inference_steps is another name for steps; both given and different "
                             f"(steps={steps}, num_inference_steps={n}): give one")
        steps = n
    out = solver_options.pop("output_type", "pt")
    if out != "pt":
        hint = {"pil": "result.to_pil()", "np": "result.images.numpy()"}.get(out)
        raise DeqirError(f"output_type={out!r}: restore returns a RestoreResult of tensors (output_type 'pt')"
                         + (f"; {hint} gives the {out} form" if hint else ""))
    wrong = [k for k in solver_options if k in _OPERATOR_WORDS]
    if wrong:
        raise DeqirError(f"{wrong[0]} is a parameter of the operator, not of restore: give it to "
                         "make_operator (or to restore_file under its flag name)")
    return steps


def place_model(denoiser, device, default: torch.device) -> torch.device:
    """The device the chain runs on: ``device`` (the model is moved there if it is a torch module
    elsewhere), or the model's own device (``default`` for a model without tensors)."""
    if device is None:
        return model_device(denoiser, default=default)
    dev = resolve_device(str(device) if isinstance(device, torch.device) else device)
    if isinstance(denoiser, torch.nn.Module) and model_device(denoiser, default=dev) != dev:
        try:
            denoiser.to(dev)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as e:   # e.g. a meta module
            raise DeqirError(f"cannot move the model to {dev}: {type(e).__name__}; move it yourself "
                             f"(model.to({str(dev)!r})) or pass device=None") from None
    return dev


def apply_value_range(y, op, value_range, sigma_y: float):
    """(y in [-1, 1], sigma_y) from the user's measurement and its stated ``value_range``."""
    if value_range is not None:
        try:
            vr = tuple(float(v) for v in value_range)
        except (TypeError, ValueError):
            vr = None
        if vr not in VALUE_RANGES:
            raise DeqirError(f"value_range must be (-1, 1) or (0, 1), got {value_range!r}")
        value_range = vr
    y = check_tensor(y, "y", (None, *op.measurement_shape))
    if value_range == (0, 1):
        ones = torch.ones((1, *op.image_shape), dtype=y.dtype, device=y.device)
        return 2 * y - op.A(ones), 2 * float(sigma_y)
    if value_range is None and op.measurement_is_image and y.numel() >= 16 and _looks_unit_range(y):
        warnings.warn("y lies in [0, 1], but restore works on images in [-1, 1]: pass value_range=(0, 1) to "
                      "convert it (or x * 2 - 1 yourself), or value_range=(-1, 1) if it is right",
                      UserWarning, stacklevel=3)
    return y, sigma_y


def _looks_unit_range(y: torch.Tensor) -> bool:
    """y looks like [0, 1] data: its maximum in (0, 1.15], at most 5% of it below -0.05 and none
    below -0.25 (bicubic's and sharpening kernels' overshoot at edges makes some values of a
    [0, 1] picture's measurement slightly negative, 4% for black-and-white bars; a [-1, 1]
    picture has its whole dark half there)."""
    y = y.detach()
    hi, lo = float(y.max()), float(y.min())
    if not (0 < hi <= 1.15) or lo < -0.25:          # (all zero: mid-grey, fine)
        return False
    return float((y < -0.05).float().mean()) <= 0.05


def size_multiple(denoiser) -> int:
    """The multiple the model needs H and W to be (``denoiser.size_multiple``, default 1)."""
    return check_int("size_multiple", getattr(denoiser, "size_multiple", 1))


def canvas(denoiser, op):
    """``op`` on the model's canvas: itself when H, W are multiples of ``denoiser.size_multiple``
    (default 1), else a ``PaddedOperator`` on the next larger multiple (the padding is null space)."""
    return PaddedOperator.to_multiple(op, size_multiple(denoiser))


def sampling_problem(denoiser, op, y: torch.Tensor, sigma_y: float):
    """(operator, y, crop) as the chain samples them, for ``restore`` and ``noise_gradient`` alike.

    ``sigma_y > 0``: the directions the noise swamps go to the null space (``op.for_noise``: gain
    relative to the largest <= ``NOISE_KEEP * sigma_y``) and y is Tikhonov filtered on the others
    (``filter_measurement``); sigma_y = 0 leaves both as they are. Then the operator is put on
    the model's canvas (``canvas``); ``crop`` cuts a (..., C, H2, W2) canvas image back to the
    user's (..., C, H, W) (the identity when nothing was padded). y keeps its measurement shape:
    padding acts on images only."""
    op = op.for_noise(sigma_y)
    y = op.filter_measurement(y, sigma_y)
    op = canvas(denoiser, op)
    return op, y, (op.crop if isinstance(op, PaddedOperator) else _same)


def check_on_canvas(t, name: str, lead: tuple, shape: tuple, user: tuple, denoiser) -> torch.Tensor:
    """``check_tensor(t, name, (*lead, *shape))`` for a tensor that lives on the model's canvas
    ``shape``; one in the user's image size ``user`` instead is told why it is refused."""
    if tuple(shape) != tuple(user) and isinstance(t, torch.Tensor) and tuple(t.shape[len(lead):]) == tuple(user):
        raise DeqirError(f"{name} must be on the model's canvas {tuple(shape)}, not the image's {tuple(user)}: the "
                         f"model needs H and W multiples of {size_multiple(denoiser)}, so the chain runs padded "
                         "(as restore's noise does)")
    return check_tensor(t, name, (*lead, *shape))


def _same(t: torch.Tensor) -> torch.Tensor:
    return t

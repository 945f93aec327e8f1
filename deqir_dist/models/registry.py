"""``load_denoiser``: a denoiser by name, or from a checkpoint file."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from deqir_dist.errors import DeqirError
from deqir_dist.models.analytic import GaussianMixtureDenoiser
from deqir_dist.models.builtin import load_builtin
from deqir_dist.models.diffusers_folder import PREFIX as DIFFUSERS, is_diffusers_folder, load_diffusers
from deqir_dist.models.emulated import CostEmulatingDenoiser, load_cost_file, read_cost_table
from deqir_dist.models.loading import (
    ARCHITECTURES,
    CHECKPOINT_SUFFIXES,
    PRESETS,
    apply_precision,
    build_model,
    load_checkpoint,
    parse_dtype,
)
from deqir_dist.sampling.denoiser import resolve_device

MODEL_NAMES = ("builtin", "analytic") + tuple(PRESETS)


def _looks_like_path(name: str) -> bool:
    return (os.path.exists(name) or Path(name).suffix.lower() in CHECKPOINT_SUFFIXES
            or os.sep in name or (os.altsep is not None and os.altsep in name))


def load_denoiser(name_or_path: str | os.PathLike | None, checkpoint=None, dtype: torch.dtype | str | None = None,
                  device: torch.device | str | None = None, config: dict | None = None,
                  emulate_cost=None, random_weights: bool = False) -> torch.nn.Module:
    """A ready-to-use denoiser ``eps = model(x, t)`` in eval mode.

    ``builtin``: the small prior trained on scikit-image's photographs that ships with the package
    (the default model; any size that is a multiple of 4).
    ``analytic``: the closed-form Gaussian-mixture oracle (no weights; any image size).
    ``adm-256-uncond``: guided-diffusion's 256x256 unconditional ImageNet UNet (6 output channels:
    eps and the learned variance). ``sdedit-celeba-hq``: the DDPM UNet of SDEdit's CelebA-HQ model.
    They need ``checkpoint`` (the file must hold exactly that architecture); without one they are
    refused unless ``random_weights=True`` asks for an untrained network (timing, tests). ``adm`` / ``ddpm`` with ``config`` (ADMUNet / DDPMUNet
    keyword arguments) build or load other sizes.

    A path (``.pt``, ``.ckpt``, ``.pth``, ``.bin``, ``.safetensors``) as ``name_or_path`` (or as
    ``checkpoint`` with ``name_or_path`` None or ``analytic``, which has no weights) loads the
    file and detects its architecture (see :mod:`deqir_dist.models.loading`).

    A diffusers folder (``"diffusers:FOLDER"``, or a folder holding ``config.json`` /
    ``model_index.json``, as ``name_or_path`` or ``checkpoint``) loads its UNet2DModel with its
    scheduler (:mod:`deqir_dist.models.diffusers_folder`): google's DDPM family natively, other
    configs through diffusers (optional); the result carries the schedule and prediction type.

    ``device``: "cpu", "cuda", "cuda:1" ... (a CUDA device this torch build cannot use is a
    DeqirError saying what to do). ``dtype``: None / float32, float16 (ADM: guided-diffusion's ``convert_to_fp16``) or bfloat16.

    ``emulate_cost``: a cost table (a JSON file as ``deqir bench --profile`` writes, or a dict
    {b: ms}): the model is wrapped in ``CostEmulatingDenoiser``, every call of batch b held to
    c(b) (:mod:`deqir_dist.models.emulated`); without a name or checkpoint the model is then the
    analytic oracle (cheap, exact), not the builtin prior.
    """
    if emulate_cost is not None:
        if isinstance(emulate_cost, dict):
            table, source = read_cost_table(emulate_cost), "cost table"
        else:
            table, source = load_cost_file(emulate_cost), os.fspath(emulate_cost)
        if name_or_path is None and checkpoint is None:
            name_or_path = "analytic"
        inner = load_denoiser(name_or_path, checkpoint, dtype, device, config, random_weights=random_weights)
        return CostEmulatingDenoiser(inner, table, source).eval()
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
    if name_or_path is None and checkpoint is None:
        name_or_path = "builtin"                     # the default model
    device = _check_device(device)
    if not isinstance(random_weights, bool):
        raise DeqirError(f"random_weights must be True or False, got {random_weights!r}")
    if random_weights and (checkpoint is not None or name_or_path not in PRESETS):
        raise DeqirError("random_weights=True builds an untrained preset (adm-256-uncond, sdedit-celeba-hq); "
                         "it takes no checkpoint and no other model")
    if name_or_path == "builtin":
        if checkpoint is not None or config is not None:
            raise DeqirError("the builtin model ships with the package; it takes no checkpoint or config")
        return load_builtin(dtype=parse_dtype(dtype), device=device).eval()
    folder = _diffusers_path(name_or_path, checkpoint)
    if folder is not None:
        if config is not None:
            raise DeqirError("a diffusers folder's configuration is its config.json; it takes no config=")
        model = apply_precision(load_diffusers(folder), parse_dtype(dtype))
        return (model.to(device) if device is not None else model).eval()
    if name_or_path in (None, "analytic") and checkpoint is None:
        if config is not None:
            raise DeqirError("the analytic model takes no config")
        model = GaussianMixtureDenoiser().eval()
        if device is not None:
            model = model.to(device)
        if dtype is not None:
            model = model.to(parse_dtype(dtype))
        return model
    dtype = parse_dtype(dtype)
    if name_or_path in (None, "analytic"):
        # the analytic oracle has no weights: a checkpoint decides the model by itself
        model = load_checkpoint(checkpoint, config=config)
    elif name_or_path in PRESETS or name_or_path in ARCHITECTURES:
        if checkpoint is not None:
            model = load_checkpoint(checkpoint, name=name_or_path, config=config)
        else:
            if name_or_path in PRESETS:
                if not random_weights:
                    raise DeqirError(f"model {name_or_path!r} has no weights here: pass checkpoint=FILE (its released "
                                     "weights), or random_weights=True for an untrained network (timing, tests)")
                arch, factory, _ = PRESETS[name_or_path]
                cfg = config if config is not None else factory()
            else:
                arch, cfg = name_or_path, config
                if cfg is None:
                    raise DeqirError(f"model {name_or_path!r} needs config= (its keyword arguments) or a checkpoint")
            model = build_model(arch, cfg, device=device)
    elif isinstance(name_or_path, str) and _looks_like_path(name_or_path) and not os.path.exists(name_or_path) \
            and Path(name_or_path).suffix.lower() not in CHECKPOINT_SUFFIXES and name_or_path.count("/") == 1:
        raise DeqirError(f"{name_or_path}: no such file or folder (a Hub id? this library reads local folders: "
                         f"huggingface-cli download {name_or_path} --local-dir DIR, then give DIR)")
    elif isinstance(name_or_path, str) and _looks_like_path(name_or_path):
        if checkpoint is not None and os.path.abspath(checkpoint) != os.path.abspath(name_or_path):
            raise DeqirError(f"two checkpoint files given ({name_or_path} and {checkpoint}); give one")
        model = load_checkpoint(name_or_path, config=config)
    else:
        raise DeqirError(f"unknown model {name_or_path!r}; choose from {', '.join(MODEL_NAMES)}, "
                         f"or give a checkpoint file")
    model = apply_precision(model, dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


def _diffusers_path(name, checkpoint):
    """The diffusers folder asked for (``diffusers:FOLDER``, or a folder as the name or the
    checkpoint), else None."""
    if isinstance(name, str) and name.startswith(DIFFUSERS):
        if checkpoint is not None:
            raise DeqirError(f"{name} holds its own weights; it takes no checkpoint")
        return name
    for given in (name, checkpoint):
        if isinstance(given, str) and (is_diffusers_folder(given) or _in_diffusers_folder(given)):
            if name not in (None, "analytic", given) or (checkpoint is not None and given == name):
                raise DeqirError(f"{given} is a diffusers folder (its own model and weights): give it alone as the "
                                 f"model, not with {checkpoint if given == name else name}")
            return given
    return None


def _in_diffusers_folder(path: str) -> bool:
    """A diffusers folder's config.json or weights file (diffusion_pytorch_model*): the file says
    what it is by the config.json beside it, so the folder is loaded, never the file by its shapes."""
    base = os.path.basename(path)
    return os.path.isfile(path) and (base == "config.json" or base.startswith("diffusion_pytorch_model.")) \
        and os.path.isfile(os.path.join(os.path.dirname(path) or ".", "config.json"))


def _check_device(device):
    """``device`` as given (None, or a torch.device / name torch knows); a CUDA one this torch build
    cannot use, or an unknown name, is a one-line DeqirError that says what to do."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeqirError(f"unknown device {device!r}; use cpu, cuda or cuda:INDEX") from None
    if dev.type == "cuda":
        resolve_device(str(dev))
    return dev

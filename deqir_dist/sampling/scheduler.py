"""A diffusers scheduler's configuration as this chain's schedule and the model's output convention.

A model is trained on one noise schedule and predicts one quantity; both belong to the model and
travel with it (``models/scheduled.ScheduledDenoiser``). What is read from a scheduler config
(``scheduler_config.json``, a diffusers scheduler's ``.config``, or a dict), diffusers' defaults
filling absent fields:

* ``beta_schedule``: ``linear`` (beta_start..beta_end), ``scaled_linear`` (linear in sqrt beta),
  ``squaredcos_cap_v2`` (Nichol & Dhariwal's cosine, betas capped at 0.999), or ``trained_betas``
  (a list); abar = cumprod(1 - beta), computed in float64 (diffusers rounds the betas to float32:
  within 3e-7 of these);
* ``num_train_timesteps`` T: the chain's start (``restore``'s ``start``);
* ``timestep_spacing`` / ``steps_offset``: the N-step grid (``schedule.timestep_grid``; "leading"
  with offset 0 is this project's own grid);
* ``prediction_type``: ``epsilon``, ``v_prediction`` or ``sample``, turned into eps exactly
  (:func:`to_eps`): v: eps = sqrt(a) v + sqrt(1 - a) x; sample: eps = (x - sqrt(a) x0) / sqrt(1 - a);
* ``clip_sample``: the model card's default of ``clip_x0`` (DDPM/DDIM schedulers default to true).

Refused in one line (they change the sampler in ways this chain does not run): ``thresholding``,
``rescale_betas_zero_snr`` (abar(T - 1) = 0), ``clip_sample_range`` other than 1, other beta
schedules, other prediction types or spacings.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch

from deqir_dist.errors import DeqirError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")
MAX_TRAIN_STEPS = 100_000
# diffusers' DDPMScheduler defaults (the fields a google/ddpm-* scheduler_config.json leaves out)
_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
             "trained_betas": None, "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 0,
             "thresholding": False, "rescale_betas_zero_snr": False, "clip_sample_range": 1.0}
# schedulers whose clip_sample defaults to true (DDPM's clip_denoised); the others have no clip_sample
_CLIPPING = ("DDPMScheduler", "DDIMScheduler", "DDPMParallelScheduler", "DDIMParallelScheduler")


@dataclass(frozen=True)
class Schedule:
    """A model's training schedule and output convention (see the module doc)."""

    alphas_cumprod: torch.Tensor              # (T,) float64: abar(t), t = 0..T-1
    prediction_type: str = "epsilon"
    spacing: str = "leading"
    offset: int = 0
    clip_sample: bool | None = None           # None: the scheduler does not say
    source: str = "library default"
    config: dict = field(default_factory=dict)  # what was read (JSON), for res.settings / summary.json

    @property
    def train_steps(self) -> int:
        return int(self.alphas_cumprod.numel())

    def describe(self) -> dict:
        """What ran, as JSON: the fields that decide the chain."""
        return {"train_steps": self.train_steps, "timestep_spacing": self.spacing, "steps_offset": self.offset,
                "prediction_type": self.prediction_type, **{k: v for k, v in self.config.items()
                                                            if k in ("beta_schedule", "beta_start", "beta_end")}}

    def with_prediction(self, prediction_type: str, source: str = "user") -> Schedule:
        check_prediction_type(prediction_type)
        return Schedule(self.alphas_cumprod, prediction_type, self.spacing, self.offset, self.clip_sample,
                        f"{self.source}; prediction_type from {source}", dict(self.config, prediction_type=prediction_type))


def check_prediction_type(p) -> str:
    if p not in PREDICTION_TYPES:
        raise DeqirError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {p!r}")
    return p


def cosine_betas(n: int, max_beta: float = 0.999) -> torch.Tensor:
    """squaredcos_cap_v2: beta_i = min(1 - f((i + 1) / n) / f(i / n), max_beta), f(u) = cos((u + 0.008) / 1.008 pi / 2)^2."""
    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), max_beta) for i in range(n)], dtype=torch.float64)


def _number(cfg, key, where, lo=None, hi=None):
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise DeqirError(f"{where}: {key} must be a number in [{lo}, {hi}], got {v!r}")
    return v


def schedule_from_config(config: Mapping, source: str = "scheduler config") -> Schedule:
    """The :class:`Schedule` a diffusers scheduler configuration describes (DeqirError naming the
    field on anything this chain cannot run)."""
    if not isinstance(config, Mapping):
        raise DeqirError(f"{source}: a scheduler config must be a mapping, got {type(config).__name__}")
    cls = config.get("_class_name")
    cfg = {**_DEFAULTS, **{k: v for k, v in config.items() if not str(k).startswith("_")}}
    where = source
    for key, bad in (("thresholding", True), ("rescale_betas_zero_snr", True)):
        if cfg.get(key) is bad:
            raise DeqirError(f"{where}: {key}=true is not supported (this chain runs DDNM on the plain schedule)")
    t = cfg["num_train_timesteps"]
    if isinstance(t, bool) or not isinstance(t, int) or not 1 <= t <= MAX_TRAIN_STEPS:
        raise DeqirError(f"{where}: num_train_timesteps must be an integer in 1..{MAX_TRAIN_STEPS}, got {t!r}")
    if cfg["trained_betas"] is not None:
        tb = cfg["trained_betas"]
        try:
            betas = torch.as_tensor(tb, dtype=torch.float64).flatten()
        except (TypeError, ValueError, RuntimeError):
            raise DeqirError(f"{where}: trained_betas must be a list of numbers") from None
        if betas.numel() != t:
            raise DeqirError(f"{where}: trained_betas has {betas.numel()} entries, num_train_timesteps is {t}")
        kind = "trained_betas"
    else:
        kind = cfg["beta_schedule"]
        if kind not in BETA_SCHEDULES:
            raise DeqirError(f"{where}: beta_schedule {kind!r} is not supported; use one of "
                             f"{', '.join(BETA_SCHEDULES)} or trained_betas")
        if kind == "squaredcos_cap_v2":
            betas = cosine_betas(t)
        else:
            b0, b1 = (_number(cfg, k, where, 0.0, 1.0) for k in ("beta_start", "beta_end"))
            if kind == "linear":
                betas = torch.linspace(b0, b1, t, dtype=torch.float64)
            else:
                betas = torch.linspace(b0 ** 0.5, b1 ** 0.5, t, dtype=torch.float64) ** 2
    if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas >= 1).any():
        raise DeqirError(f"{where}: every beta must be in (0, 1)")
    ac = torch.cumprod(1.0 - betas, dim=0)
    if not (ac > 0).all():
        raise DeqirError(f"{where}: the schedule reaches abar = 0 (float64 underflow); it cannot start a chain")
    pred = cfg["prediction_type"]
    if pred not in PREDICTION_TYPES:
        raise DeqirError(f"{where}: prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {pred!r}")
    spacing = cfg["timestep_spacing"]
    if spacing not in SPACINGS:
        raise DeqirError(f"{where}: timestep_spacing must be one of {', '.join(SPACINGS)}, got {spacing!r}")
    offset = cfg["steps_offset"]
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < t:
        raise DeqirError(f"{where}: steps_offset must be an integer in 0..{t - 1}, got {offset!r}")
    clip = cfg.get("clip_sample", True if cls in _CLIPPING else None)
    if clip is not None and not isinstance(clip, bool):
        raise DeqirError(f"{where}: clip_sample must be true or false, got {clip!r}")
    if clip and cfg["clip_sample_range"] != 1.0:
        raise DeqirError(f"{where}: clip_sample_range={cfg['clip_sample_range']!r} is not supported (clip_x0 clamps "
                         "to [-1, 1])")
    record = {"_class_name": cls, "num_train_timesteps": t, "beta_schedule": kind, "prediction_type": pred,
              "timestep_spacing": spacing, "steps_offset": offset, "clip_sample": clip}
    if kind in ("linear", "scaled_linear"):
        record.update(beta_start=cfg["beta_start"], beta_end=cfg["beta_end"])
    return Schedule(ac, pred, spacing, offset, clip, source, record)


def read_scheduler(scheduler, source: str | None = None) -> Schedule:
    """A :class:`Schedule` from a diffusers scheduler object (anything with a mapping ``.config``),
    a dict, a ``scheduler_config.json`` path, a folder holding one (or ``scheduler/``), or a Schedule."""
    if isinstance(scheduler, Schedule):
        return scheduler
    if isinstance(scheduler, Mapping):
        return schedule_from_config(scheduler, source or "scheduler config (dict)")
    if isinstance(scheduler, (str, Path)):
        p = Path(scheduler)
        for cand in (p, p / "scheduler_config.json", p / "scheduler" / "scheduler_config.json"):
            if cand.is_file():
                return schedule_from_config(read_json_config(cand), source or str(cand))
        raise DeqirError(f"scheduler config not found: {p} (expected a scheduler_config.json or a folder holding one)")
    config = getattr(scheduler, "config", None)
    if isinstance(config, Mapping):
        return schedule_from_config(config, source or f"{type(scheduler).__name__}.config")
    raise DeqirError(f"scheduler must be a diffusers scheduler, a config dict or a scheduler_config.json path, "
                     f"got {type(scheduler).__name__}")


def read_json_config(path, max_bytes: int = 1 << 20) -> dict:
    """A small JSON object file (a diffusers config), capped in size; DeqirError when it is not one."""
    p = Path(path)
    try:
        ok = p.is_file() and p.stat().st_size <= max_bytes
    except OSError:
        ok = False
    if not ok:
        raise DeqirError(f"{p}: not a config file (a regular JSON file under {max_bytes >> 10} KiB)")
    try:
        with open(p, "rb") as f:
            data = json.loads(f.read(max_bytes + 1).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DeqirError(f"{p}: not a valid JSON config ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise DeqirError(f"{p}: a config must be a JSON object")
    return data


def to_eps(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """eps from a model output of ``prediction_type`` at input x and abar a (broadcastable), in float64."""
    if prediction_type == "epsilon":
        return out
    out, x, a = out.double(), x.double(), a.double()
    if prediction_type == "v_prediction":
        return a.sqrt() * out + (1 - a).sqrt() * x
    if prediction_type == "sample":
        return (x - a.sqrt() * out) / (1 - a).sqrt()
    raise DeqirError(f"unknown prediction_type {prediction_type!r}")

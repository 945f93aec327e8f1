"""A model together with its schedule and output convention: what ``restore`` samples with.

``ScheduledDenoiser`` wraps a network (a DDPMUNet converted from a diffusers folder, a diffusers
``UNet2DModel``, any ``model(x, t)``) with the :class:`~deqir_dist.sampling.scheduler.Schedule`
it was trained on. Its forward returns eps whatever the network predicts (``to_eps``); it
carries the schedule (``.schedule``: the chain's abar, start and grid), a card (``sampler_card``:
clip_x0 from the scheduler's clip_sample, and where it came from) and the network's size
multiple. ``restore`` reads them through :func:`chain_schedule` and ``settings.resolve_settings``,
so a model's schedule is never lost and never a branch in ``restore``.

:func:`as_denoiser` is the Python convention layer: a pipeline-like object (``.unet`` and
``.scheduler``, e.g. diffusers' ``DDPMPipeline``), ``scheduler=`` / ``prediction_type=`` given to
``restore``, or a bare diffusers UNet (its size multiple from its config).
"""
from __future__ import annotations

from typing import Mapping

import torch

from deqir_dist.errors import DeqirError
from deqir_dist.sampling.denoiser import unwrap_output
from deqir_dist.sampling.schedule import TRAIN_STEPS, linear_alphas_cumprod
from deqir_dist.sampling.scheduler import Schedule, check_prediction_type, read_scheduler, to_eps

LIBRARY_SCHEDULE = "library default (linear betas 1e-4..0.02, 1000 steps, eps prediction)"


class ScheduledDenoiser(torch.nn.Module):
    """eps = model(x, t) from a network predicting ``schedule.prediction_type`` on ``schedule``."""

    def __init__(self, net, schedule: Schedule, size_multiple: int | None = None, in_channels: int | None = None,
                 label: str | None = None):
        super().__init__()
        if not callable(net):
            raise DeqirError("the denoiser must be callable as model(x, t)")
        self.net = net
        self.schedule = schedule
        self._abar = {}                 # device -> float64 abar (a plain tensor: .half() / .float() leave it)
        self.size_multiple = int(size_multiple or getattr(net, "size_multiple", 1) or 1)
        channels = in_channels if in_channels is not None else _channels(net)
        if channels is not None:
            self.in_channels = int(channels)
        self.label = label or type(net).__name__
        card = {"source": schedule.source}
        if schedule.clip_sample is not None:
            card["clip_x0"] = bool(schedule.clip_sample)
        self.sampler_card = card

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = unwrap_output(self.net(x, t))
        pred = self.schedule.prediction_type
        if pred == "epsilon" or not isinstance(out, torch.Tensor):
            return out                       # EpsFn checks the shape and takes the first C channels
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        abar = self._abar.get(x.device)
        if abar is None:
            abar = self._abar[x.device] = self.schedule.alphas_cumprod.to(x.device, torch.float64)
        a = abar[t.long()].view(-1, 1, 1, 1)
        c = x.shape[1]
        return to_eps(out[:, :c], x, a, pred).to(out.dtype if out.dtype == torch.float64 else torch.float32)

    def extra_repr(self) -> str:
        return f"label={self.label!r}, prediction_type={self.schedule.prediction_type!r}, " \
               f"train_steps={self.schedule.train_steps}, size_multiple={self.size_multiple}"


def _channels(net) -> int | None:
    """The input channels a network declares (a diffusers model's config, else ``in_channels``)."""
    cfg = getattr(net, "config", None)
    if isinstance(cfg, Mapping) and "in_channels" in cfg:
        return cfg["in_channels"]
    return getattr(net, "in_channels", None)


def _unet_size_multiple(unet) -> int | None:
    """2^(levels - 1) from a diffusers UNet's config (``block_out_channels``), else None."""
    cfg = getattr(unet, "config", None)
    blocks = cfg.get("block_out_channels") if isinstance(cfg, Mapping) else None
    if isinstance(blocks, (list, tuple)) and blocks:
        return 2 ** (len(blocks) - 1)
    return None


def as_denoiser(model, scheduler=None, prediction_type: str | None = None, alphas_cumprod=None):
    """The denoiser ``restore`` runs: ``model`` itself when nothing is to be added, else a
    :class:`ScheduledDenoiser` (see the module doc). DeqirError, one line, for what cannot be one.

    ``alphas_cumprod`` (the user's, which the chain runs on) also becomes the schedule a wrapped
    model's prediction is converted on, so chain and conversion never disagree."""
    if prediction_type is not None:
        check_prediction_type(prediction_type)
    if hasattr(model, "unet") and hasattr(model, "scheduler") and not isinstance(model, ScheduledDenoiser):
        sched = read_scheduler(model.scheduler, f"{type(model).__name__}.scheduler ({type(model.scheduler).__name__})")
        model = ScheduledDenoiser(model.unet, sched, _unet_size_multiple(model.unet), label=type(model.unet).__name__)
    if not callable(model):
        raise DeqirError(f"the model must be callable as model(x, t) (a torch module, a loaded name, or a pipeline "
                         f"with .unet and .scheduler), got {type(model).__name__}")
    if scheduler is None and prediction_type is None and (alphas_cumprod is None
                                                          or not isinstance(model, ScheduledDenoiser)):
        if not isinstance(model, ScheduledDenoiser) and getattr(model, "size_multiple", None) is None \
                and _unet_size_multiple(model) is not None:         # a bare diffusers UNet: its multiple
            return ScheduledDenoiser(model, default_schedule(), _unet_size_multiple(model),
                                     label=type(model).__name__)
        return model
    net = model.net if isinstance(model, ScheduledDenoiser) else model
    if scheduler is not None:
        sched = read_scheduler(scheduler, "scheduler= (user)" if isinstance(scheduler, Mapping) else None)
    else:
        sched = model.schedule if isinstance(model, ScheduledDenoiser) else default_schedule()
    if prediction_type is not None and prediction_type != sched.prediction_type:
        sched = sched.with_prediction(prediction_type, "user")
    if alphas_cumprod is not None:
        sched = Schedule(torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten().cpu(), sched.prediction_type,
                         sched.spacing, sched.offset, sched.clip_sample, f"{sched.source}; alphas_cumprod from user",
                         sched.config)
    size = model.size_multiple if isinstance(model, ScheduledDenoiser) else _unet_size_multiple(net)
    return ScheduledDenoiser(net, sched, size, _channels(model),
                             label=getattr(model, "label", type(net).__name__))


def default_schedule() -> Schedule:
    """This project's own schedule (linear 1e-4..0.02 over 1000 steps, eps, leading grid, no clipping said)."""
    return Schedule(linear_alphas_cumprod(), source=LIBRARY_SCHEDULE,
                    config={"num_train_timesteps": TRAIN_STEPS, "beta_schedule": "linear", "beta_start": 1e-4,
                            "beta_end": 0.02, "prediction_type": "epsilon", "timestep_spacing": "leading"})


def chain_schedule(model, alphas_cumprod=None, start: int | None = None):
    """(alphas_cumprod or None, start, spacing, offset, record, source) the chain samples with.

    The user's ``alphas_cumprod`` wins over the model's schedule; ``start`` not given is the
    schedule's length (a model's ``num_train_timesteps``, the length of a given ``alphas_cumprod``,
    else 1000), so a longer schedule is never started at t = 999 silently."""
    sched = getattr(model, "schedule", None)
    if alphas_cumprod is not None:           # the grid stays the model's (spacing, offset)
        ac = torch.as_tensor(alphas_cumprod)
        n = ac.numel()
        spacing, offset = (sched.spacing, sched.offset) if isinstance(sched, Schedule) else ("leading", 0)
        record = {"alphas_cumprod": f"given ({n} steps)", "timestep_spacing": spacing, "steps_offset": offset,
                  "prediction_type": sched.prediction_type if isinstance(sched, Schedule) else "epsilon"}
        return ac, (n if start is None else start), spacing, offset, record, "user"
    if isinstance(sched, Schedule):
        return (sched.alphas_cumprod, sched.train_steps if start is None else start, sched.spacing, sched.offset,
                sched.describe(), sched.source)
    return None, (TRAIN_STEPS if start is None else start), "leading", 0, default_schedule().describe(), LIBRARY_SCHEDULE

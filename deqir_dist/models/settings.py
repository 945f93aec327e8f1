"""Recommended sampler settings: they belong to the model (its card), not to the caller.

One source of truth for what ``restore``, the CLI, Ray jobs and the demo use when the user sets
nothing. A denoiser carries its card's recommendation in the attribute ``sampler_card`` (set by
the loaders: ``load_builtin`` from ``weights/builtin.json``, ``load_checkpoint`` for the two
public checkpoints from :data:`PRESET_SAMPLERS`); a denoiser without one gets
:data:`LIBRARY_DEFAULTS` (DeqIR's deterministic DDIM: etw = nw = 0, no clipping, 25 steps).

A card's sampler section::

    {"steps": 25, "etw": 0.1, "nw": 0.0, "clip_x0": {"default": false, "colorize": true},
     "source": "...", "note": "...", "alternatives": {...}}

``clip_x0`` is per task (the operator's name) with a ``default``; a plain bool applies to every
task. :func:`resolve_settings` merges what the user gave (None = not given) with the card and
says where each value came from.
"""
from __future__ import annotations

from deqir_dist.errors import DeqirError
from deqir_dist.models.scheduled import LIBRARY_SCHEDULE, chain_schedule

SAMPLER_KEYS = ("steps", "etw", "nw", "clip_x0")
LIBRARY_DEFAULTS = {"steps": 25, "etw": 0.0, "nw": 0.0, "clip_x0": False}
LIBRARY_SOURCE = "library default (DeqIR's deterministic DDIM)"

# The settings the two public checkpoints are run with in the papers' code (deqir_spec.md
# sections 1.1, 1.3 and 3): DeqIR's README runs N = 25, etw = 0.1, nw = 0, no x0 clipping; DDNM
# ties etw = nw = eta = 0.85 with 100 steps (its configs' T_sampling), also without clipping.
_DEQIR_DDNM = {
    "steps": 25, "etw": 0.1, "nw": 0.0, "clip_x0": {"default": False},
    "note": "DeqIR's README settings (--timesteps 25 --etw 0.1, nw 0); neither DeqIR nor DDNM clips x0",
    "alternatives": {"ddnm": {"steps": 100, "etw": 0.85, "nw": 0.85, "clip_x0": False,
                              "note": "DDNM's eta = 0.85 for both knobs, T_sampling 100"}},
}
PRESET_SAMPLERS = {
    "adm-256-uncond": {**_DEQIR_DDNM, "source": "model card adm-256-uncond (DeqIR / DDNM settings)"},
    "sdedit-celeba-hq": {**_DEQIR_DDNM, "source": "model card sdedit-celeba-hq (DeqIR / DDNM settings)"},
}


def check_card(card: dict, where: str) -> dict:
    """A card's sampler section, checked (DeqirError naming ``where`` on a bad one)."""
    if not isinstance(card, dict):
        raise DeqirError(f"{where}: the sampler section must be an object, got {type(card).__name__}")
    for key in ("steps", "etw", "nw"):
        v = card.get(key, LIBRARY_DEFAULTS[key])
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (key == "steps" and v < 1):
            raise DeqirError(f"{where}: sampler {key} must be a number >= 0 (steps >= 1), got {v!r}")
    clip = card.get("clip_x0", False)
    if not isinstance(clip, bool) and not (isinstance(clip, dict) and all(isinstance(v, bool) for v in clip.values())):
        raise DeqirError(f"{where}: sampler clip_x0 must be true/false or {{task: true/false}}, got {clip!r}")
    return card


def sampler_card(model) -> dict | None:
    """The recommended-settings card a denoiser carries (None: it has none)."""
    card = getattr(model, "sampler_card", None)
    return card if isinstance(card, dict) else None


def _card_value(card: dict, key: str, task: str | None):
    v = card.get(key, LIBRARY_DEFAULTS[key])
    if key == "clip_x0" and isinstance(v, dict):
        return bool(v.get(task, v.get("default", False)))
    return v


def resolve_settings(model, task: str | None, given: dict | None = None) -> tuple[dict, dict]:
    """(settings, sources) for ``SAMPLER_KEYS``: the user's value where given (not None), else the
    model card's (for ``task``, an operator name), else :data:`LIBRARY_DEFAULTS`.

    ``sources[key]`` is "user", the card's ``source`` or :data:`LIBRARY_SOURCE`.

    ``schedule`` (with ``start``): recorded when it is not the library's own linear-1000 eps
    schedule, i.e. when the model carries one (a diffusers folder, a pipeline, ``scheduler=``) or
    ``given`` holds ``alphas_cumprod`` (``models.scheduled.chain_schedule``)."""
    given = given or {}
    card = sampler_card(model)
    settings, sources = {}, {}
    for key in SAMPLER_KEYS:
        if given.get(key) is not None:
            settings[key], sources[key] = given[key], "user"
        elif card is not None and key in card:
            settings[key], sources[key] = _card_value(card, key, task), card.get("source", "model card")
        else:
            settings[key], sources[key] = LIBRARY_DEFAULTS[key], LIBRARY_SOURCE
    if isinstance(settings["steps"], float) and settings["steps"].is_integer():
        settings["steps"] = int(settings["steps"])
    _, start, _, _, record, source = chain_schedule(model, given.get("alphas_cumprod"), given.get("start"))
    if source != LIBRARY_SCHEDULE:
        settings["schedule"], sources["schedule"] = {**record, "start": start}, source
    return settings, sources

"""Measurements that describe their own operator (the PNG text chunk ``deqir degrade`` writes,
io.pngtext): the task and parameters come from the file; a flag may repeat them, never change them.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from PIL import Image

from deqir_dist.dataset.results import config_hash
from deqir_dist.dataset.tasks import OP_FLAGS, task_flags
from deqir_dist.errors import DeqirError
from deqir_dist.io.measurements import MEASUREMENT_SUFFIX, load_measurement
from deqir_dist.io.pngtext import read_description
from deqir_dist.physics.registry import make_operator


def file_description(path) -> dict | None:
    """A PNG measurement's stored description (None: not a PNG, or a PNG without one)."""
    p = Path(path)
    return read_description(p) if p.suffix.lower() == ".png" else None


def _is_image(path) -> bool:
    """Whether Pillow identifies ``path`` as an image (its header only; nothing is decoded)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)   # io.limits' cap applies on read
            with Image.open(path):
                return True
    except Image.DecompressionBombError:
        return True                          # an image, too large: its read says so (io.limits)
    except Exception:  # noqa: BLE001 - Pillow raises many types on a file that is not an image
        return False


def check_described_inputs(paths, task: str, given: dict, sigma_y) -> None:
    """Every described measurement among ``paths`` agrees with the flags (``check_flags``,
    ``described_sigma_y``): a job refuses a contradiction before it starts. Files that are no image
    or whose description is broken are left to their own read (a job records them)."""
    for p in paths:
        if Path(p).suffix.lower() != ".png":
            continue
        try:
            desc = file_description(p)      # None: no description (or not a PNG)
        except DeqirError:
            continue
        if desc is not None:
            check_flags(p, desc, task, given)
            described_sigma_y(p, desc, sigma_y)


def described_task(paths, from_clean: bool = False) -> str:
    """The task of measurements that carry their description (restore without --task)."""
    if from_clean:
        raise DeqirError("--from-clean degrades the inputs here: give --task")
    tasks, unreadable, why = {}, [], []
    for p in paths:
        if Path(p).suffix == MEASUREMENT_SUFFIX:       # a .pt measurement names its operator too
            try:
                tasks.setdefault(str(load_measurement(Path(p))[1]["name"]), p)
            except DeqirError as e:
                unreadable.append(p)   # its own read reports it
                why.append(e)
            continue
        if not _is_image(p):
            unreadable.append(p)   # not an image at all: its own read reports it (ray-restore records it)
            continue
        desc = file_description(p)
        if desc is None:
            raise DeqirError(f"give --task: {p} carries no operator description (it was not written by "
                             "deqir degrade)")
        tasks.setdefault(desc["task"], p)
    if not tasks and why:            # only unreadable measurements: the first one's reason
        raise why[0]
    if not tasks:
        raise DeqirError(f"give --task: {unreadable[0]} is not an image file Pillow can open (nor a measurement "
                         "deqir degrade wrote), and no input carries an operator description")
    if len(tasks) > 1:
        (a, pa), (b, pb) = list(tasks.items())[:2]
        raise DeqirError(f"the inputs hold different tasks ({pa.name}: {a}, {pb.name}: {b}); restore them separately")
    return next(iter(tasks))


def _flag_names(task: str) -> dict:
    """operator keyword -> its flag (``--mask-seed``) for ``task``."""
    return {OP_FLAGS[f]: "--" + f.replace("_", "-") for f in task_flags(task)}


def _show(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def check_flags(path, desc: dict, task: str, given: dict) -> dict:
    """The operator keywords of a described measurement with the flags' ``given`` ones, which may
    repeat the file's parameters, never change them (DeqirError naming the contradiction); nothing is
    built, so a job can check every input before it starts."""
    p = Path(path)
    if desc["task"] != task:
        raise DeqirError(f"{p} is a {desc['task']} measurement (its PNG description says so), not {task}: "
                         "drop --task or give the right one")
    stored = dict(desc["params"])
    names = _flag_names(task)
    kwargs = dict(stored)
    mask = stored.get("mask")
    if isinstance(mask, str) and mask.startswith("sha256:"):
        if not isinstance(given.get("mask"), torch.Tensor):
            raise DeqirError(f"{p} was degraded with a mask file (digest {mask}); pass that file with --mask FILE")
        kwargs.pop("mask")
    elif isinstance(given.get("mask"), torch.Tensor):
        raise DeqirError(f"{p} was degraded with --mask {_show(mask)} (its PNG description); a mask file "
                         "contradicts it: drop --mask")
    elif "mask" in given and given["mask"] != mask:
        raise DeqirError(f"{p} was degraded with --mask {_show(mask)} (its PNG description); --mask "
                         f"{_show(given['mask'])} contradicts it: drop --mask")
    unknown = [k for k in given if k not in kwargs and k != "mask"]
    if unknown:
        flags = ", ".join(names.get(k, k) for k in unknown)
        raise DeqirError(f"{p} was degraded with {task} {_show(stored)}, which has no {flags}: drop it")
    clash = [k for k in sorted(given) if k in stored and k != "mask" and _differs(given[k], stored[k])]
    if clash:                           # before building: a contradiction, not whatever the new value breaks
        raise _contradiction(p, clash, stored, {k: given[k] for k in clash}, names)
    kwargs.update(given)
    return kwargs


def described_operator(path, desc: dict, task: str, given: dict, cache: dict):
    """The operator a described measurement was made with: the file's parameters, with the
    flags' ``given`` operator keywords allowed only where they agree (DeqirError otherwise).

    ``cache`` holds the operators built so far (by description and flags)."""
    p = Path(path)
    kwargs = check_flags(p, desc, task, given)
    stored = dict(desc["params"])
    shape = tuple(int(d) for d in desc["image_shape"])
    names = _flag_names(task)
    key = config_hash({"task": task, "shape": list(shape), "kwargs": kwargs})
    if key not in cache:
        try:
            cache[key] = make_operator(task, image_shape=shape, **kwargs)
        except DeqirError as e:
            raise DeqirError(f"{p}: its PNG description and the flags do not make a {task} operator: {e}") from None
    op = cache[key]
    got = json.loads(json.dumps(op.describe()))["params"]
    if got != stored:
        diff = [k for k in sorted(set(got) | set(stored)) if got.get(k) != stored.get(k)]
        raise _contradiction(p, diff, stored, got, names, given)
    return op


def _differs(flag, stored) -> bool:
    """A flag's value plainly different from the file's: numbers against numbers, otherwise values
    of one JSON type. Anything else (a string "2" for 2) is left to the operator, whose error names
    the type it needs."""
    if hasattr(flag, "item") and not isinstance(flag, torch.Tensor):
        flag = flag.item()                   # a NumPy scalar
    if _is_number(flag) and _is_number(stored):
        return flag != stored
    return type(flag) is type(stored) and flag != stored


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _contradiction(p, keys, stored: dict, flagged: dict, names: dict, given=None) -> DeqirError:
    """The one-line error for flags whose ``keys`` disagree with the file's description."""
    given = flagged if given is None else given
    flags = ", ".join(f"{names.get(k, k)} {_show(flagged.get(k))}" for k in keys if k in given) or \
        ", ".join(f"{k}={_show(flagged.get(k))}" for k in keys)
    file_says = ", ".join(f"{names.get(k, k)} {_show(stored.get(k))}" for k in keys)
    return DeqirError(f"{p} was degraded with {file_says} (its PNG description); the flags give {flags}: "
                      "drop those flags or give the same values")


def described_sigma_y(path, desc: dict, sigma_y):
    """(sigma_y, where it came from) for a described measurement: the flag's value must agree with
    the file's; without a flag, the file's value when it added noise, else None (the caller's default)."""
    stored = desc.get("sigma_y")
    if not isinstance(stored, (int, float)) or not math.isfinite(stored) or stored < 0:
        return None
    if sigma_y is not None:
        if abs(float(sigma_y) - float(stored)) > 1e-9:
            raise DeqirError(f"{path} was degraded with measurement noise sigma_y={stored:g} (its PNG description); "
                             f"--sigma-y {sigma_y:g} contradicts it: drop the flag or pass --sigma-y {stored:g}")
        return None
    return (float(stored), "the file's description") if stored > 0 else None

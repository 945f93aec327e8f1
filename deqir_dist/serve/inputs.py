"""An upload and its settings -> what ``deqir restore`` would restore for the same file and flags.

The upload is written to a private folder under its own file name, and from there it goes
through the very code the CLI runs on a file (``dataset.items.iter_items``: the PNG's
description, the pixel and byte caps, the sigma_y its bit depth implies), so the image id is the
upload's file stem and the noise is drawn from (seed, id) as ``deqir restore`` draws it. The
settings come parsed (the CLI's flag names as form fields: ``apps.serve``).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from deqir_dist.api.budget import input_check
from deqir_dist.dataset.described import described_task
from deqir_dist.dataset.items import Item, check_model_fits, check_utf8, iter_items
from deqir_dist.errors import DeqirError
from deqir_dist.serve.batch import BATCHABLE

MAX_NAME = 200


@dataclass
class Settings:
    """One request's settings, as the CLI's flags give them (``apps.serve.parse_fields``)."""

    task: str | None              # None: the one the measurement's PNG description gives
    params: dict | None           # operator parameters (None while the task is unknown)
    params_for: object            # task -> operator parameters (dataset.tasks.operator_params of the flags)
    kw: dict                      # restore's keyword arguments (apps.flags.restore_kwargs)
    seed: int
    from_clean: bool
    bits: int


@dataclass
class Prepared:
    """A checked request: its item (id, y, operator), restore's arguments, and its batching key."""

    item: Item
    kw: dict
    seed: int
    bits: int
    task: str
    key: str
    sigma_y_given: bool = False


def upload_name(filename: str | None) -> str:
    """The file name an upload is stored (and known) under: its last path component, checked."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    if not name or name in (".", "..") or name.startswith("."):
        raise DeqirError("the image upload needs a file name (its stem is the image id, as a file's is in "
                         "deqir restore)")
    if len(name) > MAX_NAME or any(ord(c) < 32 or c == "\x7f" for c in name):
        raise DeqirError(f"upload file name {name[:40]!r}... is too long or has control characters")
    check_utf8(Path(name))
    if "." not in name[1:]:
        raise DeqirError(f"upload file name {name!r} has no suffix (.png, .jpg, .pt, ...)")
    return name


def compatibility_key(model_name: str, item: Item, kw: dict) -> str:
    """Requests with equal keys can share one restore() call: same model, task, operator (its
    parameters, a mask by its hash), image size, sampler settings and measurement noise."""
    if kw.get("solver", "auto") not in BATCHABLE:
        return "alone:" + hashlib.sha256(repr(id(item)).encode()).hexdigest()
    desc = json.loads(json.dumps(item.op.describe(), default=str))
    blob = json.dumps([model_name, desc, list(item.op.image_shape), list(item.y.shape[1:]),
                       {k: v for k, v in sorted(kw.items()) if k != "progress"}], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare(path: Path, settings: Settings, model, model_name: str) -> Prepared:
    """Read and check the uploaded file at ``path`` as ``deqir restore`` reads its inputs."""
    task = settings.task
    if task is None:
        task = described_task([path], settings.from_clean)
    params = settings.params if settings.task is not None else settings.params_for(task)
    kw = settings.kw          # the restore's memory and work (api.budget), from the header, before decoding
    check = input_check(model, task, kw.get("steps"), kw.get("solver", "auto"), kw, max_time=kw.get("max_time"))
    items = list(iter_items([path], task, params, settings.from_clean, sigma_y=settings.kw.get("sigma_y"),
                            seed=settings.seed, check=check))
    check_model_fits(model, items)
    item = items[0]
    kw = dict(settings.kw)
    kw.setdefault("sigma_y", item.sigma_y)       # not given: the file's (its bit depth), as the CLI does
    return Prepared(item, kw, settings.seed, settings.bits, task, compatibility_key(model_name, item, kw),
                    "sigma_y" in settings.kw)

"""One batch of compatible requests as one ``restore()`` call, with each image's result exactly
what it would be alone (and what ``deqir restore`` writes for its file).

Two things make a batch exact:

* **Noise per image.** ``deqir restore`` draws an image's xi (and z) from the generator of
  (seed, image id) (``dataset.items.generator_for``). A batch draws each image's noise the same
  way, one image at a time (``sampling.noise.draw_noise`` with a batch of 1), and hands restore
  the stacked tensors.
* **Denoiser calls per image.** A CPU convolution's result depends on the batch it is computed
  in (oneDNN picks its kernel by shape), so while a batch of B > 1 images runs, every denoiser
  call is split into the rows of each image (:func:`per_image_calls`): image i's rows are
  evaluated in a call of the size it has alone. Everything else in the chain is elementwise or
  per row, so the bytes are the same (tests/test_serve.py checks it for serial, picard, anderson).

Every rank of a gang runs :func:`run_batch` with the same :class:`Batch`.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field

import torch

from deqir_dist.api.conventions import canvas
from deqir_dist.api.profile_cache import plan_record
from deqir_dist.api.restore import check_settings, plan_auto, restore
from deqir_dist.dataset.items import generator_for, keep_gray, metrics
from deqir_dist.io.images import write_image
from deqir_dist.models.settings import resolve_settings
from deqir_dist.sampling.noise import draw_noise

SETTING_KEYS = ("steps", "etw", "nw", "clip_x0")
BATCHABLE = ("auto", "serial", "picard", "anderson")      # parareal's calls are block-major: alone


@dataclass
class Batch:
    """What every rank needs to restore a batch: ids, seeds, the stacked measurements, the
    operator they share and restore's keyword arguments (sigma_y included)."""

    names: list[str]
    seeds: list[int]
    y: torch.Tensor                      # (B, *measurement_shape)
    op: object
    kw: dict
    gts: list = field(default_factory=list)   # ground truths (from_clean), or None per image


def period(t: torch.Tensor) -> int:
    """The rows of one image in a denoiser call: the smallest p with t = (t[:p] repeated).

    restore's batched calls are image-major: the serial sampler's t is one timestep per image
    (p = 1), a chain block's is its row timesteps repeated per image (``ChainBlock.denoise``)."""
    n = t.shape[0]
    for p in range(1, n):
        if n % p == 0 and torch.equal(t.view(n // p, p), t[:p].expand(n // p, p)):
            return p
    return n


@contextlib.contextmanager
def per_image_calls(model, images: int):
    """While inside, ``model(x, t)`` evaluates each image's rows in their own call (``images`` > 1)."""
    if images <= 1 or not isinstance(model, torch.nn.Module):
        yield
        return
    plain = model.forward

    def forward(x, t, *args, **kwargs):
        t_rows = t if isinstance(t, torch.Tensor) and t.dim() == 1 and t.shape[0] == x.shape[0] else None
        p = x.shape[0] if t_rows is None else period(t_rows)
        if p >= x.shape[0]:
            return plain(x, t, *args, **kwargs)
        outs = [plain(x[i:i + p], t[i:i + p], *args, **kwargs) for i in range(0, x.shape[0], p)]
        if all(isinstance(o, torch.Tensor) for o in outs):
            return torch.cat(outs)
        return plain(x, t, *args, **kwargs)       # an output object (diffusers): one call, as before

    model.forward = forward
    try:
        yield
    finally:
        del model.forward


def batch_noise(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """xi (B, C, H, W) and z (B, N, C, H, W) or None: each image's from (seed, id), as alone."""
    given = {k: batch.kw.get(k) for k in SETTING_KEYS}
    settings, _ = resolve_settings(model, getattr(batch.op, "name", None), given)
    kw = {k: v for k, v in batch.kw.items() if k not in ("progress", "distributed", "profile", *SETTING_KEYS)}
    coeffs, _ = check_settings(**{**kw, **settings})
    shape = tuple(canvas(model, batch.op).image_shape)
    xs, zs = [], []
    for name, seed in zip(batch.names, batch.seeds):
        xi, z = draw_noise(1, shape, coeffs.steps, settings["nw"], generator_for(seed, name))
        xs.append(xi)
        zs.append(z)
    return torch.cat(xs), (None if zs[0] is None else torch.cat(zs))


def planned_profile(model, batch: Batch, procs: int) -> dict | None:
    """solver="auto" without a profile: the c(b) it plans with, timed on the plain model (cached
    by api.profile_cache, as the CLI's), so that a batch's split calls are never what is timed."""
    kw = batch.kw
    if kw.get("solver", "auto") != "auto" or kw.get("profile") is not None:
        return None
    given = {k: kw.get(k) for k in SETTING_KEYS}
    settings, _ = resolve_settings(model, getattr(batch.op, "name", None), given)
    _, plan = plan_auto(model, batch.op, procs, None, settings["steps"], settings["etw"], kw.get("stop", "rows"),
                        kw.get("max_iter"), "window" in kw)
    return plan["c_ms"]


def run_batch(model, batch: Batch, distributed: bool = False, callback=None):
    """restore() on the batch: the RestoreResult (each image exactly as alone)."""
    kw = {k: v for k, v in batch.kw.items() if k != "progress"}
    if len(batch.names) == 1:                 # exactly the CLI's call
        return restore(model, batch.y, batch.op, generator=generator_for(batch.seeds[0], batch.names[0]),
                       distributed=distributed, callback=callback, **kw)
    procs = torch.distributed.get_world_size() if distributed else 1
    c_ms = planned_profile(model, batch, procs) if (not distributed or torch.distributed.get_rank() == 0) else None
    if c_ms is not None:
        kw["profile"] = c_ms
    noise, step_noise = batch_noise(model, batch)
    with per_image_calls(model, len(batch.names)):
        return restore(model, batch.y, batch.op, noise=noise, step_noise=step_noise, distributed=distributed,
                       callback=callback, **kw)


def encode_png(image: torch.Tensor, bits: int, scratch: str | None = None) -> bytes:
    """The PNG ``deqir restore`` writes for ``image`` (C, H, W), as bytes (the same writer)."""
    fd, path = tempfile.mkstemp(suffix=".png", dir=scratch)
    os.close(fd)
    try:
        write_image(path, image, bits=bits)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def output_image(res, i: int, batch: Batch) -> torch.Tensor:
    """Image i of a batch result as ``deqir restore`` writes it, (1, C, H, W): gray (the channel
    mean) when its ground truth, or else its measurement, is a grayscale picture read as RGB
    (``dataset.items.keep_gray``)."""
    gt = batch.gts[i] if batch.gts else None
    return keep_gray(gt if gt is not None else batch.y[i:i + 1], res.image[i:i + 1])


def image_record(res, i: int, batch: Batch, image: torch.Tensor | None = None) -> dict:
    """The CLI's record fields for image i of a batch result (iterations, solver and plan, metrics
    of ``image``, the written picture: ``output_image``)."""
    rec = {"iterations": int(res.iterations_per_image[i]), **plan_record(res)}
    gt = batch.gts[i] if batch.gts else None
    if gt is not None:                      # as the CLI's records (a gray picture against its RGB truth)
        rec.update(metrics(output_image(res, i, batch) if image is None else image, gt, batch.names[i]))
    return rec

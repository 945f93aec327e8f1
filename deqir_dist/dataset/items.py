"""File-level workflows shared by the CLI and the launchers: degrade and restore image files.

Everything is validated before anything is written: a bad file, size or flag fails the whole
command with one line, and each output file is written atomically.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from deqir_dist.api.budget import input_check
from deqir_dist.api.optimize import optimize_noise
from deqir_dist.api.profile_cache import plan_record, plan_summary
from deqir_dist.api.restore import restore
from deqir_dist.dataset.dealt import dealing, restore_dealt, serial_plan
from deqir_dist.dataset.described import described_operator, described_sigma_y, described_task, file_description
from deqir_dist.dataset.tasks import OP_FLAGS, operator_params
from deqir_dist.errors import DeqirError, check_int, is_real, one_line
from deqir_dist.io.files import ensure_writable_dir
from deqir_dist.io.limits import check_pixels, check_regular_file
from deqir_dist.io.images import header_size, list_images, read_image, write_image
from deqir_dist.io.jsonio import write_json
from deqir_dist.io.quantization import default_sigma_y
from deqir_dist.io.measurements import (
    MEASUREMENT_SUFFIX,
    image_shape_of_measurement,
    load_measurement,
    measurement_channels,
    measurement_shape_for,
    save_measurement,
)
from deqir_dist.io.pngtext import TEXT_KEY, describe_measurement
from deqir_dist.io.outdir import OutputFolder, Staging
from deqir_dist.models.registry import load_denoiser
from deqir_dist.models.settings import resolve_settings
from deqir_dist.physics.registry import make_operator
from deqir_dist.quality.metrics import psnr, ssim
from deqir_dist.solvers.options import DEFAULT_SOLVER


def seed_for(seed: int, name: str) -> int:
    """A 63-bit seed derived from (seed, image id): the same image gets the same draws anywhere."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def generator_for(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(seed, name))


def expand_inputs(inputs: list[str]) -> list[Path]:
    """Files and folders (their images, and .pt measurements) -> a list of files; ids must be unique."""
    paths: list[Path] = []
    for s in inputs:
        p = Path(s)
        check_utf8(p)
        if p.is_dir():
            found = list_images(p) + sorted(f for f in p.iterdir() if f.suffix == MEASUREMENT_SUFFIX)
            if not found:
                raise DeqirError(f"no images in folder {p}")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        elif p.exists():
            check_regular_file(p, "input")        # a device, pipe or socket: refused, never opened
        else:
            raise DeqirError(f"input not found: {p}")
    for p in paths:
        check_utf8(p)
    if not paths:
        raise DeqirError("no input files given")
    stems = [p.stem for p in paths]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise DeqirError(f"several inputs share the name {dup[0]!r}; outputs would collide")
    return paths


def check_utf8(p: Path) -> None:
    """File names become ids and JSON records: one that is not valid UTF-8 is refused up front."""
    try:
        str(p).encode("utf-8")
    except UnicodeEncodeError:
        raise DeqirError(f"file name {str(p)!r} is not valid UTF-8; rename it") from None


def resolved(p, what: str = "path") -> Path:
    """``Path(p).resolve()``, with a symlink loop or an unreadable link as a one-line DeqirError."""
    try:
        return Path(p).resolve()
    except (OSError, RuntimeError) as e:        # RuntimeError: a symlink loop (Python < 3.13)
        raise DeqirError(f"cannot resolve {what} {p}: {one_line(e, bare_deqir=True)}") from None


class OperatorCache:
    """One operator per (task, image shape): the SVD-based ones are worth building once."""

    def __init__(self, task: str, params: dict):
        self.task, self.params, self._ops = task, dict(params), {}
        self.described = {}      # operators of files that describe themselves (dataset.described)

    def get(self, image_shape) -> object:
        key = tuple(image_shape)
        if key not in self._ops:
            self._ops[key] = make_operator(self.task, image_shape=key, **self.params)
        return self._ops[key]


@dataclass
class Item:
    """One image to restore: its id, measurement y (1, *meas), operator and optional ground truth."""

    name: str
    source: Path
    y: torch.Tensor
    op: object
    gt: torch.Tensor | None = None
    sigma_y: float = 0.0                 # the noise std to sample with: given, or from the file's bit depth
    sigma_y_source: str = "user"


def iter_items(paths: list[Path], task: str, params: dict, from_clean: bool, sigma_y: float | None = None,
               seed: int = 0, ops: OperatorCache | None = None, check=None):
    """The inputs as :class:`Item` s, read and checked one at a time (see :func:`load_items`).
    ``check(path, image_shape, from_clean)``, if given, sees each restored image's (C, H, W)
    before its pixels are decoded or its operator is built (the CLI's memory estimate)."""
    ops = ops or OperatorCache(task, params)
    for p in paths:
        if from_clean:
            if file_description(p) is not None:     # a measurement taken for a clean picture
                raise DeqirError(f"{p} is a measurement deqir degrade wrote (its PNG description says so), "
                                 "not a clean image: --from-clean would degrade it again and replace any "
                                 "earlier restoration of it with a smaller picture; drop --from-clean")
            size = header_size(p) if check is not None else None
            if size is not None:
                check(p, (3, size[1], size[0]), True)
            x = read_image(p, channels=3)
            op = ops.get(x.shape)
            y = op.A(x[None])
            if sigma_y is not None and sigma_y > 0:
                y = y + sigma_y * torch.randn(y.shape, generator=generator_for(seed, "y:" + p.stem))
            yield Item(p.stem, p, y, op, x[None], *((sigma_y, "user") if sigma_y is not None
                                                    else (0.0, "--from-clean: degraded here in float, no noise")))
            continue
        if p.suffix == MEASUREMENT_SUFFIX:
            y, desc = load_measurement(p)        # structure, dtype and the pixel cap checked there
            if desc.get("name") != task:
                raise DeqirError(f"{p} is a {desc.get('name')!r} measurement, but the task is {task!r}")
            shape = tuple(desc["image_shape"])
            expected = measurement_shape_for(task, ops.params, shape)
            if expected is not None and tuple(y.shape) != expected:   # before the operator is built
                raise DeqirError(f"{p}: measurement shape {tuple(y.shape)} does not fit {task} on its image "
                                 f"{shape} with these flags (expected {expected})")
            if check is not None:
                check(p, shape, False)
            op = ops.get(shape)
            stored, given = desc.get("params", {}), json.loads(json.dumps(op.describe()))["params"]
            if stored != given:
                raise DeqirError(f"{p} was degraded with {task} parameters {stored}, the flags give {given}: "
                                 "pass the same flags as to deqir degrade")
            y = y[None]
        else:
            desc = file_description(p)           # deqir degrade's PNG text chunk (dataset.described)
            img = read_image(p, channels=measurement_channels(task))
            shape = tuple(desc["image_shape"]) if desc else image_shape_of_measurement(task, ops.params, img.shape)
            check_pixels(shape[2], shape[1], f"{p}: the restored image")
            expected = measurement_shape_for(desc["task"], desc["params"], shape) if desc else None
            if expected is not None and tuple(img.shape) != expected:     # a lying chunk: before any operator
                raise DeqirError(f"{p}: its {tuple(img.shape)} pixels do not fit the {desc['task']} measurement of a "
                                 f"{shape} image its PNG description claims (expected {expected})")
            if check is not None:
                check(p, shape, False)
            op = described_operator(p, desc, task, ops.params, ops.described) if desc else ops.get(shape)
            if not op.measurement_is_image:
                raise DeqirError(f"{task} measurements are .pt files (written by deqir degrade), not images: {p}")
            y = img[None]
        if tuple(y.shape[1:]) != tuple(op.measurement_shape):
            raise DeqirError(f"{p}: measurement shape {tuple(y.shape[1:])} does not fit {task} "
                             f"(expected {tuple(op.measurement_shape)})")
        if not torch.isfinite(y).all():
            raise DeqirError(f"{p}: measurement contains NaN or Inf")
        noise = described_sigma_y(p, desc, sigma_y) if p.suffix != MEASUREMENT_SUFFIX and desc else None
        yield Item(p.stem, p, y, op, None, *(noise or ((sigma_y, "user") if sigma_y is not None else default_sigma_y(y, p))))


def declared_shape(p: Path, task: str, params: dict, from_clean: bool) -> tuple | None:
    """(C, H, W) of the image restoring ``p`` would make, from its header and PNG description
    alone (nothing decoded: what ``iter_items`` checks before decoding); None when only the read
    can tell (a .pt measurement, a file that cannot be read, a header Pillow cannot open or a broken
    description: the read says why)."""
    if Path(p).suffix == MEASUREMENT_SUFFIX:
        return None
    try:
        size = header_size(p)
        desc = None if from_clean else file_description(p)
    except DeqirError:          # unreadable, or a broken description: its read reports it
        return None
    if size is None:
        return None
    if from_clean:
        return (3, size[1], size[0])
    if desc is not None:
        return tuple(int(v) for v in desc["image_shape"])
    return image_shape_of_measurement(task, params, (measurement_channels(task), size[1], size[0]))


def check_declared_size(p: Path, task: str, params: dict, from_clean: bool) -> None:
    """The pixel cap (``--max-pixels``) on the image ``p`` declares, before any pixel is decoded:
    a one-line DeqirError (ray-restore's driver records it as the image's failure)."""
    shape = declared_shape(p, task, params, from_clean)
    if shape is not None:
        check_pixels(shape[2], shape[1], f"{p}: the restored image")


def load_items(paths: list[Path], task: str, params: dict, from_clean: bool,
               sigma_y: float | None = None, seed: int = 0, check=None) -> list[Item]:
    """Read and validate every input (``sigma_y`` None: each measurement's from its bit depth). With ``from_clean`` the inputs are ground-truth images that
    are degraded here (y = A(x) + sigma_y n, n drawn from (seed, id)); otherwise they are
    measurements written by ``deqir degrade`` (an image, or a .pt file for non-image ones).
    Holds every input in memory; :class:`ItemSource` holds one at a time."""
    return list(iter_items(paths, task, params, from_clean, sigma_y, seed, check=check))


class ItemSource:
    """The inputs of a job, checked up front and streamed: every file is read and validated once
    on construction (and dropped again: indexing gives the items without ``y`` and ``gt``), and
    :meth:`stream` reads them again one at a time, just before each is restored, so memory does
    not grow with the number of inputs."""

    def __init__(self, paths: list[Path], task: str, params: dict, from_clean: bool, sigma_y: float | None = None,
                 seed: int = 0, check=None):
        self._args = (list(paths), task, params, from_clean, sigma_y, seed)
        self._ops = OperatorCache(task, params)
        self._items = [replace(it, y=None, gt=None) for it in iter_items(*self._args, ops=self._ops, check=check)]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        return self._items[i]

    def __iter__(self):
        return iter(self._items)

    def stream(self):
        """The full items (y, and the ground truth with ``from_clean``), decoded as they are taken."""
        return iter_items(*self._args, ops=self._ops)


def check_outputs_apart(outputs, inputs) -> None:
    """No file a command will write (``outputs``) may be one of its ``inputs``."""
    ins = {resolved(p, "input") for p in inputs}
    for path in outputs:
        if resolved(path, "output") in ins:
            raise DeqirError(f"output {path} would overwrite an input; choose another output folder")
        if Path(path).is_dir():
            raise DeqirError(f"output {path} exists as a folder; remove it or choose another output folder")


def check_model_fits(model, items) -> None:
    """Every item's image suits the model (channels), before any work. Any size does: restore
    pads to the model's size multiple and crops back."""
    channels = getattr(model, "in_channels", None)
    for it in items:
        c = it.op.image_shape[0]
        if channels is not None and c != channels:
            raise DeqirError(f"{it.source}: {c} channels, the model takes {channels}")


def degrade_files(paths: list[Path], task: str, params: dict, out_dir: str, sigma_y: float | None = 0.0,
                  seed: int = 0, bits: int = 16) -> list[Path]:
    """Write A(x) (+ noise) of each clean image: PNG (16-bit by default: 8-bit rounding is noise a
    blur's inverse amplifies) where the measurement is an image, else .pt."""
    items = ItemSource(paths, task, params, from_clean=True, sigma_y=sigma_y, seed=seed)   # all checked
    check_outputs_apart([Path(out_dir) / f"{it.name}{suf}" for it in items for suf in (".png", MEASUREMENT_SUFFIX)],
                        paths)
    with OutputFolder(out_dir, command="degrade"):       # locked for the job; staged, moved in at the end
        staging = Staging(out_dir)
        try:
            for it in items.stream():
                if it.op.measurement_is_image:
                    write_image(staging.path(f"{it.name}.png"), it.y[0], bits=bits,    # + its description
                                text={TEXT_KEY: describe_measurement(it.op, it.sigma_y, bits)})
                else:
                    save_measurement(staging.path(f"{it.name}{MEASUREMENT_SUFFIX}"), it.y[0], it.op)
            return staging.commit()
        except DeqirError as e:          # "cannot write OUT/x.png", not the hidden staging folder's path
            raise type(e)(staging.public(str(e))) from e.__cause__
        finally:
            staging.abort()


@dataclass
class NoiseOptimizationSpec:
    """``--optimize-noise consistency | reference:PATH | oracle:PATH`` (PATH: an image, or a folder
    of images named by id). ``oracle`` compares with the ground truth: an upper bound, not a method."""

    loss: str
    path: Path | None
    iters: int = 20
    lr: float = 0.1

    @staticmethod
    def parse(spec: str, iters: int = 20, lr: float = 0.1) -> "NoiseOptimizationSpec":
        kind, _, path = spec.partition(":")
        if kind not in ("consistency", "reference", "oracle"):
            raise DeqirError(f"--optimize-noise takes consistency, reference:PATH or oracle:PATH, got {spec!r}")
        if (kind == "consistency") != (path == ""):
            raise DeqirError(f"--optimize-noise {kind} {'takes no' if kind == 'consistency' else 'needs a'} PATH")
        check_int("--opt-iters", iters)
        if not (is_real(lr) and 0 < lr < math.inf):
            raise DeqirError(f"--opt-lr must be a finite number > 0, got {lr!r}")
        p = Path(path) if path else None
        if p is not None and not p.exists():
            raise DeqirError(f"--optimize-noise: {p} not found")
        return NoiseOptimizationSpec(kind, p, iters, lr)

    def files(self) -> list[Path]:
        """The target image files (to keep outputs from overwriting them)."""
        if self.path is None:
            return []
        return list_images(self.path) if self.path.is_dir() else [self.path]

    def target(self, item: Item) -> torch.Tensor | None:
        if self.path is None:
            return None
        p = self.path
        if p.is_dir():
            found = [f for f in list_images(p) if f.stem == item.name]
            if not found:
                raise DeqirError(f"--optimize-noise: no image named {item.name} in {p}")
            p = found[0]
        t = read_image(p, channels=3)[None]
        if tuple(t.shape[1:]) != tuple(item.op.image_shape):
            raise DeqirError(f"--optimize-noise: {p} is {tuple(t.shape[1:])}, the image is {tuple(item.op.image_shape)}")
        return t


def _optimize(model, item: Item, spec: NoiseOptimizationSpec, generator, kw: dict):
    """Noise optimisation for one item; returns (image, iterations, extra record fields)."""
    if kw.get("distributed"):
        raise DeqirError("--optimize-noise runs in one process; it cannot be combined with --distributed")
    # the sampler settings not given are the model card's, as restore takes them (optimize_noise
    # resolves them itself; --clip-x0 clips the chain it differentiates)
    keep = ("steps", "etw", "nw", "clip_x0", "start", "sigma_y")
    # auto (the default) keeps picard as the forward solver: the planner models one restore, not the
    # repeated, warm-started forward solves of noise optimisation
    solver = kw.get("solver", DEFAULT_SOLVER)
    solver = "picard" if solver == "auto" else solver
    res = optimize_noise(model, item.y, item.op, loss=spec.loss, target=spec.target(item), iters=spec.iters,
                         lr=spec.lr, generator=generator, solver=solver, **{k: kw[k] for k in keep if k in kw})
    hist = res.history
    extra = {"solver": solver, "optimize_noise": spec.loss, "oracle": res.oracle, "opt_iters": spec.iters,
             "consistency_before": round(float(hist[0]["consistency"][0]), 5),
             "consistency_after": round(float(min(h["consistency"][0] for h in hist)), 5)}
    return res.image, res.settings["steps"], extra


def restore_items(model, items: list[Item], out_dir: str | None, restore_kw: dict, seed: int = 0,
                  bits: int = 8, progress: bool = True, restore_fn=None, write: bool = True,
                  optimize: NoiseOptimizationSpec | None = None, summary=None, on_record=None) -> list[dict]:
    """Restore each item (its noise drawn from (seed, id)), write ``<id>.png``, return records.

    With ``optimize``, the initial noise of each image is optimised first (``inversion``).
    ``items``: a list of items, or an :class:`ItemSource` (decoded one at a time). The pictures are
    staged inside ``out_dir`` and moved into place only when every image is done, so a failure
    leaves ``out_dir`` as it was; the caller holds the folder's lock (:class:`OutputFolder`).
    ``summary``: ``(name, build)``: ``build(records)`` is written as JSON to ``out_dir/name``,
    staged with the pictures and committed last (``Staging.commit``: never a lying summary).
    ``on_record(record)``: called as each image is done."""
    restore_fn = restore_fn or restore
    out = ensure_writable_dir(out_dir) if (write and out_dir is not None) else None
    staging = Staging(out) if out is not None else None
    try:
        return _restore_all(model, items, out, staging, restore_kw, seed, bits, progress, restore_fn, optimize,
                            summary, on_record)
    except DeqirError as e:              # "cannot write OUT/x.png", not the hidden staging folder's path
        if staging is None:
            raise
        raise DeqirError(staging.public(str(e))) from e.__cause__
    finally:
        if staging is not None:
            staging.abort()


def _restore_all(model, items, out, staging, restore_kw, seed, bits, progress, restore_fn, optimize, summary,
                 on_record=None):
    records = []
    bar = None
    if progress:
        from deqir_dist.sampling.progress import progress_bar
        bar = progress_bar(len(items), "restore", "img")

    def finish(it, kw, noise_source, image, iterations, extra, seconds):
        rec = {"id": it.name, "input": str(it.source), "iterations": iterations,
               "seconds": round(seconds, 4), "sigma_y": round(float(kw["sigma_y"]), 6),
               "sigma_y_source": noise_source, **extra}
        image = keep_gray(it.gt if it.gt is not None else it.y, image)
        if it.gt is not None:
            rec.update(metrics(image, it.gt, it.source))
        if out is not None:
            write_image(staging.path(f"{it.name}.png"), image[0], bits=bits)
            rec["output"] = str(out / f"{it.name}.png")
        records.append(rec)
        if on_record is not None:
            on_record(rec)
        if bar is not None:
            bar.update(1)
    # torchrun: serial images are dealt over the ranks, not run on every one (dataset.dealt)
    deal = dealing(restore_kw) if restore_fn is restore and optimize is None else None
    pending: list = []

    def flush():
        for (it, kw, _), (image, iterations, extra, seconds) in zip(pending, restore_dealt(model, pending, deal[0],
                                                                                         generator_for, seed)):
            finish(it, kw, "user" if "sigma_y" in restore_kw else it.sigma_y_source, image, iterations, extra,
                   seconds)
        pending.clear()
    for it in (items.stream() if isinstance(items, ItemSource) else items):
        t0 = time.perf_counter()
        extra = {}
        kw = dict(restore_kw)
        noise_source = "user" if "sigma_y" in kw else it.sigma_y_source
        kw.setdefault("sigma_y", it.sigma_y)         # not given: the item's (from its file's bit depth)
        if deal is not None:
            planned = serial_plan(model, it, kw, generator_for(seed, it.name))
            if planned is not None:
                pending.append((it, kw, planned))
                if len(pending) == deal[1]:
                    flush()
                continue
            if pending:
                flush()
        if optimize is not None:
            image, iterations, extra = _optimize(model, it, optimize, generator_for(seed, it.name), kw)
        else:
            res = restore_fn(model, it.y, it.op, generator=generator_for(seed, it.name), **kw)
            image, iterations = res.image, res.iterations
            extra = plan_record(res)         # the solver that ran; for "auto" the plan and why
        finish(it, kw, noise_source, image, iterations, extra, time.perf_counter() - t0)
    if pending:
        flush()
    if bar is not None:
        bar.close()
    if staging is not None:
        if summary is not None:
            write_json(staging.path(summary[0]), summary[1](records))
        staging.commit(summary=summary[0] if summary is not None else None)
    return records


def _is_gray(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.shape[1] == 3 and bool(torch.equal(t[:, 0], t[:, 1])) and bool(torch.equal(t[:, 1], t[:, 2]))


def keep_gray(source: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``image`` (B, 3, H, W) as a grayscale picture (B, 1, H, W): the channel mean, when
    ``source`` (the ground truth, or an image measurement) has three equal channels (a grayscale
    photograph, read as RGB); the prior, trained on colour, otherwise tints it. Else ``image``."""
    if image.dim() == 4 and image.shape[1] == 3 and _is_gray(source):
        return image.mean(1, keepdim=True)
    return image


def metrics(image: torch.Tensor, gt: torch.Tensor, source) -> dict:
    """{"psnr", "ssim"} of a restored (1, C, H, W) image against its ground truth; a metric that
    fails (a picture too small for SSIM's window, ...) is never fatal once the image is restored:
    {"metrics_error": ...} instead, and one warning line naming the file."""
    img = image.clamp(-1, 1)
    if img.shape[1] == 1 and gt.shape[1] == 3:
        img = img.expand(-1, 3, -1, -1)
    try:
        return {"psnr": round(float(psnr(img, gt)[0]), 3), "ssim": round(float(ssim(img, gt)[0]), 4)}
    except Exception as e:  # noqa: BLE001 - the restoration is kept whatever the metric raised
        why = one_line(e, bare_deqir=True)
        warnings.warn(f"{source}: restored, but its PSNR/SSIM could not be computed ({why}); the output is "
                      "kept", UserWarning, stacklevel=2)
        return {"metrics_error": why}


def summarize(records: list[dict]) -> dict:
    """Means over the images that have each metric."""
    out = {"images": len(records),
           "mean_iterations": sum(r["iterations"] for r in records) / max(len(records), 1),
           "seconds": round(sum(r["seconds"] for r in records), 3)}
    for key in ("psnr", "ssim"):
        vals = [r[key] for r in records if key in r]
        if vals:
            out[f"mean_{key}"] = round(sum(vals) / len(vals), 4)
    solvers = [r["solver"] for r in records if "solver" in r]
    if solvers:
        out["solvers"] = {s: solvers.count(s) for s in sorted(set(solvers))}
    return {**out, **plan_summary(records)}


def sampler_record(model, task: str, restore_kw: dict, records: list[dict]) -> dict:
    """What a job sampled with and where each setting came from (``settings.resolve_settings``,
    the rule ``restore`` applies): {"settings": {...}, "source": {...}} for summary.json. sigma_y
    is per image when not given (each file's bit depth): the records' values, and their sources."""
    settings, source = resolve_settings(model, task, restore_kw)
    if "sigma_y" in restore_kw:
        settings["sigma_y"], source["sigma_y"] = float(restore_kw["sigma_y"]), "user"
    else:
        vals = sorted({r.get("sigma_y", 0.0) for r in records})
        settings["sigma_y"] = vals[0] if len(vals) == 1 else vals
        source["sigma_y"] = "; ".join(sorted({r.get("sigma_y_source", "") for r in records})) or "none"
    return {"settings": settings, "source": source}


def restore_file(path, task: str | None = None, model="builtin", out=None, from_clean: bool = False, seed: int = 0,
                 device=None, bits: int = 8, **kw):
    """Restore one file: a measurement (what ``deqir degrade`` writes: an image, or a .pt file) or,
    with ``from_clean``, a clean image degraded here first. Returns the ``RestoreResult``; with
    ``out`` (a .png path) also writes the picture.

    ``kw`` holds the task's parameters under their flag names (``scale``, ``kernel_size``,
    ``blur_sigma``, ``sigma_h``, ``sigma_w``, ``mask``, ``mask_fraction``, ``mask_seed``,
    ``ratio``, ``cs_seed``, ``sigma_y``) and any sampler setting of :func:`restore`. ``model`` is
    a denoiser module or a name for :func:`load_denoiser`. The noise is drawn from (seed, file
    stem), as ``deqir restore`` draws it, so both give the same picture. ``task`` None: the one
    the measurement PNG describes (``deqir degrade`` writes it; task flags may only repeat it).
    """
    p = Path(path)
    if not p.is_file():
        raise DeqirError(f"input file not found: {p}")
    task = task or described_task([p], from_clean)
    for old, new in (("size", "kernel_size"), ("sigma", "blur_sigma"), ("fraction", "mask_fraction")):
        if old in kw:       # make_operator's names: accepted, and said to be the other spelling
            warnings.warn(f"restore_file: {old}= is make_operator's name of {new}=; use {new}= (make_operator takes "
                          "it too)", FutureWarning, stacklevel=2)
            if new in kw and kw[new] != kw[old]:
                raise DeqirError(f"{old} and {new} name the same parameter; give {new}")
            kw[new] = kw.pop(old)
    flags = {k: kw.pop(k) for k in list(kw) if k in OP_FLAGS}
    sigma_y = kw.pop("sigma_y", None)       # None: from the measurement's bit depth
    if isinstance(model, str):
        model = load_denoiser(model, device=device)
    check = input_check(model, task, kw.get("steps"), kw.get("solver", "auto"), kw, kw.get("max_memory"),
                        kw.get("tile"), max_time=kw.get("max_time"))       # the restore's memory, before the file is decoded
    item = load_items([p], task, operator_params(task, flags), from_clean, sigma_y=sigma_y, seed=seed,
                      check=check)[0]
    check_model_fits(model, [item])
    res = restore(model, item.y, item.op, generator=generator_for(seed, item.name), sigma_y=item.sigma_y,
                  device=device, **kw)
    res.settings_source["sigma_y"] = item.sigma_y_source     # restore saw it given; the item knows whence
    if out is not None:
        write_image(out, res.image[0], bits=bits)
    return res

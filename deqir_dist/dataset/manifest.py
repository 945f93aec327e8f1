"""Dataset inputs: a folder or a manifest (JSONL/JSON), checked ids and per-image parameters."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from deqir_dist.dataset.items import check_utf8, expand_inputs, resolved
from deqir_dist.errors import DeqirError, is_int, is_real, one_line
from deqir_dist.io.limits import check_regular_file, read_file_bytes
from deqir_dist.io.measurements import MEASUREMENT_SUFFIX

MANIFEST_SUFFIXES = (".jsonl", ".json")
PER_IMAGE_KEYS = ("scale", "kernel_size", "blur_sigma", "sigma_h", "sigma_w", "mask", "mask_fraction",
                  "mask_seed", "ratio", "cs_seed", "sigma_y")
_INT_KEYS = ("scale", "kernel_size", "mask_seed", "ratio", "cs_seed")


def _check_params(params: dict, where: str) -> None:
    """Per-image parameter values have the flags' types: integers, finite numbers, a mask name or file."""
    for k, v in params.items():
        if k == "mask":
            ok, want = isinstance(v, str) and bool(v), "a mask name or image path"
        elif k in _INT_KEYS:
            ok, want = is_int(v), "an integer"
        else:
            ok = is_real(v) and math.isfinite(v) and (k != "sigma_y" or v >= 0)
            want = "a finite number >= 0" if k == "sigma_y" else "a finite number"
        if not ok:
            raise DeqirError(f"{where}: parameter {k} must be {want}, got {json.dumps(v)[:60]}")


# ============================================================================ inputs


@dataclass
class InputEntry:
    """One image of the job: its id (output ``<id>.png``), input file, optional ground truth and
    per-image parameters (CLI flag names, e.g. ``{"scale": 2, "sigma_y": 0.05}``)."""

    id: str
    path: Path
    gt: Path | None = None
    params: dict = field(default_factory=dict)


def check_id(name) -> str:
    """An id is used as a file name inside OUT: no path separators, no '..', no leading '.'."""
    if not isinstance(name, str) or not name.strip():
        raise DeqirError(f"image id must be a non-empty string, got {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise DeqirError(f"image id {name!r} is not valid UTF-8 (a file name in another encoding); rename it") from None
    bad = [c for c in ("/", "\\", "\0", os.sep) if c in name] + [c for c in name if ord(c) < 32 or c == "\x7f"]
    if bad or ".." in name or name.startswith(".") or len(name) > 200 or name != name.strip():
        raise DeqirError(f"image id {name!r} is not a safe file name (no path separators, '..', "
                         "control characters, leading '.' or surrounding spaces; at most 200 characters)")
    return name


def _is_manifest(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES


def read_input(input_path: str | os.PathLike) -> tuple[list[InputEntry], list[Path]]:
    """A folder (its images and ``.pt`` measurements; other files come back as skipped) or a JSONL
    manifest (one object per line: ``id`` (default: the file stem), ``path`` (relative to the
    manifest's folder), optional ``gt`` and ``params``). Structural problems (missing or empty
    input, duplicate or unsafe ids, bad lines) raise DeqirError before any work starts.

    A manifest's paths must lie inside its input root (after links are followed): the manifest's
    folder, or the folder a first line ``{"root": PATH}`` names (relative to the manifest's folder).
    Listed files that exist must be regular files within the byte cap (io.limits): a device, a
    pipe or a path outside the root fails the job before anything is read; a missing file fails
    only its image."""
    p = Path(input_path)
    if not p.exists():
        raise DeqirError(f"input not found: {p}")
    if p.is_dir():
        files = expand_inputs([str(p)])          # images + .pt; raises on none or duplicate ids
        chosen = set(files)
        skipped = sorted(f for f in p.iterdir()     # special files (pipes, sockets, devices) too: noted, never opened
                         if not f.is_dir() and not f.name.startswith(".") and f not in chosen
                         and f.suffix != MEASUREMENT_SUFFIX)
        entries = [InputEntry(check_id(f.stem), f) for f in files]
        return entries, skipped
    if not _is_manifest(p):
        raise DeqirError(f"input must be a folder or a JSONL manifest (.jsonl), got {p}")
    entries, seen = [], {}
    try:
        lines = read_file_bytes(p, "manifest").decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DeqirError(f"cannot read manifest {p}: it is not UTF-8 text ({e.reason})") from e
    root = resolved(p.parent, "manifest folder")
    first = True
    tick = Ticker(f"checking manifest {p.name}, line", len(lines))
    for n, line in enumerate(lines, 1):
        tick(n)
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DeqirError(f"{where}: not valid JSON ({e.msg})") from e
        except RecursionError:
            raise DeqirError(f"{where}: not valid JSON (nested too deeply)") from None
        if first and isinstance(obj, dict) and set(obj) == {"root"}:
            first = False
            if not isinstance(obj["root"], str) or not obj["root"]:
                raise DeqirError(f"{where}: \"root\" must be a folder path")
            root = resolved(p.parent / obj["root"], "manifest root")
            if not root.is_dir():
                raise DeqirError(f"{where}: the manifest root {obj['root']} is not a folder")
            continue
        first = False
        if not isinstance(obj, dict) or not isinstance(obj.get("path"), str) or not obj["path"]:
            raise DeqirError(f"{where}: each line must be a JSON object with a \"path\"")
        unknown = sorted(set(obj) - {"id", "path", "gt", "params"})
        if unknown:
            raise DeqirError(f"{where}: unknown key(s) {', '.join(unknown)} (allowed: id, path, gt, params)")
        path = (p.parent / obj["path"]) if not Path(obj["path"]).is_absolute() else Path(obj["path"])
        name = obj.get("id", Path(obj["path"]).stem)
        try:
            check_id(name)
        except DeqirError as e:
            raise type(e)(f"{where}: {e}") from None
        if name in seen:
            raise DeqirError(f"{where}: duplicate id {name!r} (first on line {seen[name]}); outputs would collide")
        seen[name] = n
        gt = obj.get("gt")
        if gt is not None and (not isinstance(gt, str) or not gt):
            raise DeqirError(f"{where}: \"gt\" must be a path")
        params = obj.get("params") or {}
        if not isinstance(params, dict):
            raise DeqirError(f"{where}: \"params\" must be an object")
        params = {k.replace("-", "_"): v for k, v in params.items()}
        bad = sorted(set(params) - set(PER_IMAGE_KEYS))
        if bad:
            raise DeqirError(f"{where}: unknown parameter(s) {', '.join(bad)}; allowed: {', '.join(PER_IMAGE_KEYS)}")
        _check_params(params, where)
        gt_path = None if gt is None else (p.parent / gt if not Path(gt).is_absolute() else Path(gt))
        mask = params.get("mask")
        mask_path = None
        if isinstance(mask, str) and Path(mask).suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
            mask_path = Path(mask) if Path(mask).is_absolute() else p.parent / mask    # as ray.job reads it
        for f in (path, gt_path, mask_path):
            if f is not None:
                _check_listed(f, root, where)
        entries.append(InputEntry(name, path, gt_path, params))
    if not entries:
        raise DeqirError(f"manifest {p} lists no images")
    return entries, []


class Ticker:
    """A plain progress line on stderr every ``every`` seconds while a long check runs (a 10^6-line
    manifest takes minutes before any work starts); silent for short ones and in the first seconds."""

    EVERY = 10.0        # seconds between lines

    def __init__(self, what: str, total: int, every: float | None = None):
        self.what, self.total = what, total
        self.every = self.EVERY if every is None else every
        self.next = time.monotonic() + self.every

    def __call__(self, done: int) -> None:
        if done & 1023 == 0 and time.monotonic() >= self.next:
            self.next = time.monotonic() + self.every
            print(f"deqir: {self.what} {done} of {self.total}", file=sys.stderr, flush=True)


def _check_listed(f: Path, root: Path, where: str) -> None:
    """A listed file: inside the root (links followed) and, if it exists, a regular file within the cap."""
    check_utf8(f)
    try:       # os.path on strings: pathlib's resolve and parents cost 5x more over 10^6 lines
        real = os.path.realpath(f, strict=False)
    except (OSError, RuntimeError, ValueError) as e:
        raise DeqirError(f"cannot resolve path {f}: {one_line(e, bare_deqir=True)}") from None
    top = str(root)
    if real != top and not real.startswith(top if top.endswith(os.sep) else top + os.sep):
        raise DeqirError(f"{where}: {f} is outside the manifest's root {root}; only files inside it are read "
                         "(a first line {\"root\": PATH} widens it)")
    if os.path.lexists(f):
        check_regular_file(f, "listed file")


def _check_out(input_path: Path, out: Path, entries: list[InputEntry]) -> None:
    """OUT must not be inside an input folder, and no output may overwrite an input."""
    inp, o = resolved(input_path, "input"), resolved(out, "output folder")
    if input_path.is_dir() and (o == inp or inp in o.parents):
        raise DeqirError(f"output folder {out} is inside the input folder {input_path}; choose another")
    real = os.path.realpath          # strings, not pathlib: this runs over every entry of a 10^6-line manifest
    ins = {real(e.path) for e in entries} | {real(e.gt) for e in entries if e.gt is not None}
    top = str(o)                     # resolved; an id has no separator, so only a link named <id>.png moves it
    clash = [e.id for e in entries if (real(p) if os.path.islink(p := os.path.join(top, f"{e.id}.png")) else p) in ins]
    if clash:
        raise DeqirError(f"output {o / (clash[0] + '.png')} would overwrite an input; choose another output folder")
    folders = [e.id for e in entries if os.path.isdir(os.path.join(o, f"{e.id}.png"))]
    if folders:
        raise DeqirError(f"output {o / (folders[0] + '.png')} exists as a folder; remove it or choose another "
                         "output folder")

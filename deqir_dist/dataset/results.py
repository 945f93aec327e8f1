"""Dataset results: the JSONL log, configuration hashes and resume."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from deqir_dist.errors import DeqirError, one_line
from deqir_dist.io.files import atomic_write
from deqir_dist.io.limits import open_regular
from deqir_dist.models.builtin import BUILTIN_WEIGHTS, builtin_sampler_card
from deqir_dist.models.settings import PRESET_SAMPLERS, SAMPLER_KEYS

RESULTS_NAME = "results.jsonl"
SUMMARY_NAME = "summary.json"


# ============================================================================ configuration hash


def _canonical(v):
    import torch
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        return {"tensor": list(t.shape), "sha256": hashlib.sha256(t.numpy().tobytes()).hexdigest()}
    if isinstance(v, dict):
        return {str(k): _canonical(x) for k, x in sorted(v.items())}
    if isinstance(v, (list, tuple)):
        return [_canonical(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def config_hash(config: dict) -> str:
    """A short stable hash of a JSON-like configuration (tensors by content)."""
    data = json.dumps(_canonical(config), sort_keys=True, default=str).encode()
    return hashlib.sha256(data).hexdigest()[:16]


_SHA_CACHE: dict = {}


def _file_sha256(path) -> str:
    """sha256 of a file, remembered per (path, size, mtime)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _model_identity(model: str, checkpoint: str | None) -> dict:
    """What decides the model's output: its name, its files, and the sampler settings its card
    recommends (used wherever the user sets none), so retrained weights or a changed card make a
    resumed job restore again instead of keeping images of the old model."""
    out = {"model": model}
    if model == "builtin":
        if BUILTIN_WEIGHTS.is_file():
            out["weights_sha256"] = _file_sha256(BUILTIN_WEIGHTS)
        card = builtin_sampler_card()
        out["sampler"] = None if card is None else {k: v for k, v in card.items() if k in SAMPLER_KEYS}
    elif model in PRESET_SAMPLERS:
        out["sampler"] = {k: v for k, v in PRESET_SAMPLERS[model].items() if k in SAMPLER_KEYS}
    for key, val in (("model_file", model), ("checkpoint", checkpoint)):
        folder = val[len("diffusers:"):] if isinstance(val, str) and val.startswith("diffusers:") else val
        if folder and os.path.isdir(folder):       # a diffusers folder: its configs and weights
            files = sorted(p for sub in ("", "unet", "scheduler") for p in Path(folder, sub).glob("*")
                           if p.is_file())
            out[key] = {"path": os.path.abspath(folder), "files": {
                str(p.relative_to(folder)): [p.stat().st_size, p.stat().st_mtime_ns] for p in files[:64]}}
        elif val and os.path.isfile(val):
            st = os.stat(val)
            out[key] = {"path": os.path.abspath(val), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        elif key == "checkpoint" and val:
            out[key] = val
    return out


# ============================================================================ results manifest


def _read_log(path: Path) -> str:
    """The text of a results log ("" when there is none): a regular file, not followed through a
    link, never blocking on a planted pipe (io.limits.open_regular)."""
    if not os.path.lexists(path):
        return ""
    fd = open_regular(path, os.O_RDONLY, "results log")
    with os.fdopen(fd, "rb") as f:
        return f.read().decode("utf-8", "replace")


def load_results(path: str | os.PathLike) -> dict[str, dict]:
    """The latest ``ok``/``failed`` record of each id in a results JSONL (a torn last line is ignored)."""
    p = Path(path)
    latest: dict[str, dict] = {}
    for line in _read_log(p).splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):          # a torn or planted line
            continue
        if isinstance(rec, dict) and isinstance(rec.get("id"), str) and rec.get("status") in ("ok", "failed"):
            latest[rec["id"]] = rec
    return latest


class _ResultsLog:
    """Append-only JSONL, one durable line per record; compacted (latest per id) at the end."""

    def __init__(self, path: Path):
        self.path = path
        fd = open_regular(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, "results log")
        self.fh = os.fdopen(fd, "ab", buffering=0)     # unbuffered: a failed write leaves nothing to flush
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":     # a torn line from a crash: start on a fresh line
            self.fh.write(b"\n")

    def append(self, rec: dict) -> None:
        try:
            self.fh.write((json.dumps(rec, sort_keys=True) + "\n").encode())
            self.fh.flush()
            os.fsync(self.fh.fileno())
        except OSError as e:          # disk full, quota, read-only: one line, the records so far kept
            raise DeqirError(f"cannot write {self.path}: {one_line(e, bare_deqir=True)}; rerun the same "
                             "command to resume") from e

    def close(self) -> None:
        try:
            self.fh.close()
        except OSError:          # what a full disk refused was reported by append already
            pass

    def compact(self) -> None:
        keep: dict[str, dict] = {}
        for line in _read_log(self.path).splitlines():
            try:
                rec = json.loads(line)
            except (ValueError, RecursionError):      # a torn or planted line
                continue
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                keep.pop(rec["id"], None)
                keep[rec["id"]] = rec
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep.values()).encode()
        atomic_write(self.path, lambda fh: fh.write(data))


def _skipped_ids(path: Path) -> set:
    out = set()
    for line in _read_log(path).splitlines():
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):      # a torn or planted line
            continue
        if isinstance(rec, dict) and rec.get("status") == "skipped":
            out.add(rec.get("id"))
    return out


def _write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))

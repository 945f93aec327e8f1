"""Restore whole datasets on a Ray cluster: resumable, fault-tolerant, with gangs for chain-parallel images.

    deqir ray-restore INPUT -o OUT --task sr_bicubic --scale 4 [--address local|auto|HOST:PORT]
                      [--workers N] [--gpus-per-worker P] [--images-per-batch B] [sampler flags]

Design (DESIGN.md section 8): a pool of Ray actors driven by this process.

* **Workers.** Each worker is a Ray actor (:class:`RestoreWorker`) that loads the model once.
  With ``--gpus-per-worker P > 1`` a worker is a *gang*: a placement group of P bundles
  (``STRICT_PACK``, one GPU each, or CPUs on a CPU cluster) holding P rank actors that join one
  torch.distributed group (NCCL on GPUs, gloo on CPU; rank 0's actor picks the port) and shard
  each image's chain with ``restore(..., distributed=True)``. P = 1 is throughput mode: each
  worker restores whole images, and on CUDA restores the images of a batch that share an
  operator in one batched ``restore`` call (on CPU that does not pay, so it is off there).
* **Work units.** The driver splits the images into batches of ``--images-per-batch``, fixed
  before anything runs, and keeps two batches in flight per worker. It reads each input's bytes
  and ships them with the batch, so workers need no shared file system; workers decode,
  validate, restore and return encoded PNG bytes and a record per image.
* **Output.** Only the driver writes: ``OUT/<id>.png`` atomically, then one JSONL record per
  image in ``OUT/results.jsonl`` (flushed and fsynced), then ``OUT/summary.json``. A crash at
  any point leaves complete files only; a record exists only for a written output.
* **Failing early.** Everything that can be checked is checked before OUT is created: the
  flags, the inputs, the device name, the model and its checkpoint (header, keys and shapes;
  pickled code is never run), then Ray is joined (a ``HOST:PORT`` address is probed with a TCP
  connection first, and Ray's wait for the cluster is bounded by ``--connect-timeout``), the
  pool is sized against the cluster and the workers are started. A run that still fails before
  it has restored anything removes the folders and results file it created.
* **Resume.** Each image's configuration hash covers the model, task, operator parameters
  (including its own), sampler settings, seed, ``--from-clean`` and ``--bits``. Ids whose latest
  record is ``ok`` with the same hash, and whose output exists, are skipped.
* **Faults.** An image that cannot be read or restored (corrupt file, wrong size, NaN) gets a
  ``failed`` record and the job goes on (exit status 1 at the end). A worker that dies (or a
  gang with a dead rank) is killed and replaced, and its in-flight batches run again, up to
  ``--max-retries`` times. Every image's random draws derive from (seed, id), and a batch is
  retried as the same unit, so a retried image is written with identical bytes.

Test-only switch (read by the worker only; never set it in production):
``DEQIR_TEST_WORKER_EXIT_AFTER=k`` makes a worker process exit (``os._exit``) right after it has
restored its k-th image, before returning that batch; ``DEQIR_TEST_WORKER_EXIT_MARKER=PATH`` is
a marker file created first, so this happens once per marker (default: a per-job file in the
temp folder). The driver forwards every ``DEQIR_TEST_*`` variable to the workers.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import socket
import sys
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DeqirError

__all__ = ["RESULTS_NAME", "SUMMARY_NAME", "InputEntry", "RayRestoreJob", "RestoreWorker", "add_parser",
           "check_id", "cmd_ray_restore", "config_hash", "job_from_args", "load_results",
           "main", "read_input"]

RESULTS_NAME = "results.jsonl"
SUMMARY_NAME = "summary.json"
MANIFEST_SUFFIXES = (".jsonl", ".json")
PER_IMAGE_KEYS = ("scale", "kernel_size", "blur_sigma", "sigma_h", "sigma_w", "mask", "mask_fraction",
                  "mask_seed", "ratio", "cs_seed", "sigma_y")
TEST_ENV_PREFIX = "DEQIR_TEST_"
_INFLIGHT_PER_WORKER = 2


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
    bad = [c for c in ("/", "\\", "\0", os.sep) if c in name]
    if bad or ".." in name or name.startswith(".") or len(name) > 200 or name != name.strip():
        raise DeqirError(f"image id {name!r} is not a safe file name (no path separators, '..', "
                         "leading '.' or surrounding spaces; at most 200 characters)")
    return name


def _is_manifest(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES


def read_input(input_path: str | os.PathLike) -> tuple[list[InputEntry], list[Path]]:
    """A folder (its images and ``.pt`` measurements; other files come back as skipped) or a JSONL
    manifest (one object per line: ``id`` (default: the file stem), ``path`` (relative to the
    manifest's folder), optional ``gt`` and ``params``). Structural problems (missing or empty
    input, duplicate or unsafe ids, bad lines) raise DeqirError before any work starts."""
    from .jobs import MEASUREMENT_SUFFIX, expand_inputs
    p = Path(input_path)
    if not p.exists():
        raise DeqirError(f"input not found: {p}")
    if p.is_dir():
        files = expand_inputs([str(p)])          # images + .pt; raises on none or duplicate ids
        chosen = set(files)
        skipped = sorted(f for f in p.iterdir()
                         if f.is_file() and not f.name.startswith(".") and f not in chosen
                         and f.suffix != MEASUREMENT_SUFFIX)
        entries = [InputEntry(check_id(f.stem), f) for f in files]
        return entries, skipped
    if not _is_manifest(p):
        raise DeqirError(f"input must be a folder or a JSONL manifest (.jsonl), got {p}")
    entries, seen = [], {}
    try:
        lines = p.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DeqirError(f"cannot read manifest {p}: {e}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DeqirError(f"{where}: not valid JSON ({e.msg})") from e
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
            raise DeqirError(f"{where}: {e}") from None
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
        gt_path = None if gt is None else (p.parent / gt if not Path(gt).is_absolute() else Path(gt))
        entries.append(InputEntry(name, path, gt_path, params))
    if not entries:
        raise DeqirError(f"manifest {p} lists no images")
    return entries, []


def _check_out(input_path: Path, out: Path, entries: list[InputEntry]) -> None:
    """OUT must not be inside an input folder, and no output may overwrite an input."""
    inp, o = input_path.resolve(), out.resolve()
    if input_path.is_dir() and (o == inp or inp in o.parents):
        raise DeqirError(f"output folder {out} is inside the input folder {input_path}; choose another")
    ins = {e.path.resolve() for e in entries} | {e.gt.resolve() for e in entries if e.gt is not None}
    clash = [e.id for e in entries if (o / f"{e.id}.png").resolve() in ins]
    if clash:
        raise DeqirError(f"output {o / (clash[0] + '.png')} would overwrite an input; choose another output folder")


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


def _model_identity(model: str, checkpoint: str | None) -> dict:
    out = {"model": model}
    for key, val in (("model_file", model), ("checkpoint", checkpoint)):
        if val and os.path.isfile(val):
            st = os.stat(val)
            out[key] = {"path": os.path.abspath(val), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
        elif key == "checkpoint" and val:
            out[key] = val
    return out


# ============================================================================ results manifest


def load_results(path: str | os.PathLike) -> dict[str, dict]:
    """The latest ``ok``/``failed`` record of each id in a results JSONL (a torn last line is ignored)."""
    p = Path(path)
    latest: dict[str, dict] = {}
    if not p.is_file():
        return latest
    for line in p.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("id"), str) and rec.get("status") in ("ok", "failed"):
            latest[rec["id"]] = rec
    return latest


class _ResultsLog:
    """Append-only JSONL, one durable line per record; compacted (latest per id) at the end."""

    def __init__(self, path: Path):
        self.path = path
        self.fh = open(path, "ab")
        if path.stat().st_size:
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":        # a torn line from a crash: start on a fresh line
                    self.fh.write(b"\n")

    def append(self, rec: dict) -> None:
        self.fh.write((json.dumps(rec, sort_keys=True) + "\n").encode())
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.fh.close()

    def compact(self) -> None:
        from .imageio import atomic_write
        keep: dict[str, dict] = {}
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("id"), str):
                keep.pop(rec["id"], None)
                keep[rec["id"]] = rec
        data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep.values()).encode()
        atomic_write(self.path, lambda fh: fh.write(data))


# ============================================================================ the worker


class _GangBroken(RuntimeError):
    """A collective failed inside a gang: the driver replaces the whole gang."""


class RestoreWorker:
    """One worker process (a Ray actor; also usable in-process): holds the model, restores batches.

    ``spec``: model, checkpoint, device ("cpu" | "cuda"), threads, task, restore (sampler keyword
    arguments without sigma_y), seed, from_clean, bits, batch (restore equal operators together),
    token (the job's id). ``restore_batch(items)`` returns one record per item, with the encoded
    PNG under ``png`` for restored images.
    """

    def __init__(self, spec: dict):
        import torch
        torch.set_num_threads(max(1, int(spec.get("threads", 1))))
        from .models import load_denoiser
        self.spec = dict(spec)
        self.device = torch.device("cuda", 0) if spec.get("device") == "cuda" else torch.device("cpu")
        self.model = load_denoiser(spec["model"], checkpoint=spec.get("checkpoint"), device=self.device)
        self.scratch = Path(tempfile.gettempdir())   # a per-batch temp folder while restoring
        self.rank, self.world = 0, 1
        self.images_done = 0
        # test-only fault injection (see the module docstring)
        k = os.environ.get(TEST_ENV_PREFIX + "WORKER_EXIT_AFTER")
        self._exit_after = int(k) if k and k.strip().isdigit() and int(k) > 0 else None
        self._exit_marker = os.environ.get(TEST_ENV_PREFIX + "WORKER_EXIT_MARKER") or os.path.join(
            tempfile.gettempdir(), f"deqir-test-worker-exit-{spec.get('token', 'job')}")

    # ---------------------------------------------------------------- gang set-up
    def ready(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": str(self.device)}

    def address(self) -> str:
        """``tcp://IP:PORT`` on this node with a free port (rank 0 of a gang)."""
        try:
            import ray
            ip = ray.util.get_node_ip_address()
        except Exception:
            ip = "127.0.0.1"
        with socket.socket() as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        return f"tcp://{ip}:{port}"

    def join(self, init_method: str, rank: int, world: int, backend: str, timeout_s: float) -> int:
        """Join the gang's process group (every rank calls this at the same time)."""
        from datetime import timedelta

        import torch.distributed as dist
        if self.device.type == "cuda":
            import torch
            torch.cuda.set_device(self.device)
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        self.rank, self.world = rank, world
        return rank

    # ---------------------------------------------------------------- restoring
    def _maybe_test_exit(self) -> None:
        if self._exit_after is None or self.images_done < self._exit_after:
            return
        try:
            fd = os.open(self._exit_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except OSError:
            self._exit_after = None            # it happened already (marker exists)
            return
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        os._exit(17)

    def _load(self, it: dict):
        """Decode and validate one shipped input: an ``Item`` (jobs.load_items) with ground truth."""
        from .imageio import read_image
        from .jobs import load_items
        # the file keeps the id as its stem: load_items draws the measurement noise from (seed, stem)
        tmp = self.scratch / "in" / f"{it['id']}{it['suffix']}"
        tmp.parent.mkdir(exist_ok=True)
        gtmp = None
        try:
            tmp.write_bytes(it["data"])
            try:
                item = load_items([tmp], self.spec["task"], it["op_params"], self.spec["from_clean"],
                                  sigma_y=it["sigma_y"], seed=self.spec["seed"])[0]
            except DeqirError as e:
                raise DeqirError(str(e).replace(str(tmp), it["source"])) from None
            item.source = Path(it["source"])
            if it.get("gt_data") is not None:
                gtmp = self.scratch / "gt" / f"{it['id']}{it['gt_suffix']}"
                gtmp.parent.mkdir(exist_ok=True)
                gtmp.write_bytes(it["gt_data"])
                try:
                    gt = read_image(gtmp, channels=3)
                except DeqirError as e:
                    raise DeqirError(str(e).replace(str(gtmp), it["gt_source"])) from None
                if tuple(gt.shape) != tuple(item.op.image_shape):
                    raise DeqirError(f"ground truth {it['gt_source']} is {tuple(gt.shape)}, but the restored "
                                     f"image is {tuple(item.op.image_shape)}")
                item.gt = gt[None]
            return item
        finally:
            for f in (tmp, gtmp):
                if f is not None:
                    try:
                        f.unlink()
                    except OSError:
                        pass

    def _encode(self, name: str, image) -> bytes:
        from .imageio import write_image
        path = self.scratch / f"{uuid.uuid4().hex[:8]}-{name}.png"
        try:
            write_image(path, image, bits=self.spec.get("bits", 8))
            return path.read_bytes()
        finally:
            try:
                path.unlink()
            except OSError:
                pass

    def _restore_group(self, group: list) -> list:
        """One ``restore`` call over items that share an operator; per image (record, png)."""
        import torch

        from .jobs import generator_for
        from .metrics import psnr, ssim
        from .restore import draw_noise, restore
        kw = dict(self.spec["restore"])
        op = group[0][1].op
        xis, zs = [], []
        for it, item in group:
            xi, z = draw_noise(1, op.image_shape, kw["steps"], kw.get("nw", 0.0),
                               generator_for(self.spec["seed"], it["id"]))
            xis.append(xi)
            zs.append(z)
        y = torch.cat([item.y for _, item in group])
        t0 = time.perf_counter()
        res = restore(self.model, y, op, noise=torch.cat(xis), step_noise=None if zs[0] is None else torch.cat(zs),
                      sigma_y=group[0][0]["sigma_y"], distributed=self.world > 1, **kw)
        sec = (time.perf_counter() - t0) / len(group)
        out = []
        for j, (it, item) in enumerate(group):
            img = res.image[j:j + 1].float().cpu()
            rec = {"iterations": int(res.iterations_per_image[j]), "seconds": round(sec, 4), "solver": res.solver,
                   "ranks": self.world}
            if item.gt is not None:
                c = img.clamp(-1, 1)
                rec["psnr"] = round(float(psnr(c, item.gt)[0]), 3)
                rec["ssim"] = round(float(ssim(c, item.gt)[0]), 4)
            out.append((rec, self._encode(it["id"], img[0])))
        return out

    def restore_batch(self, items: list[dict]) -> list[dict]:
        """Restore a batch; one record per item, in order (``status`` ok with ``png`` bytes, or failed)."""
        with tempfile.TemporaryDirectory(prefix="deqir-ray-") as scratch:
            self.scratch = Path(scratch)
            return self._restore_batch(items)

    def _restore_batch(self, items: list[dict]) -> list[dict]:
        records: dict[str, dict] = {}
        loaded = []
        for it in items:
            base = {"id": it["id"], "input": it["source"], "config": it["config"]}
            try:
                loaded.append((it, self._load(it)))
            except Exception as e:
                records[it["id"]] = {**base, "status": "failed", "error": _one_line(e)}
        groups: dict = {}
        for it, item in loaded:
            key = (json.dumps(_canonical(item.op.describe()), sort_keys=True, default=str), it["sigma_y"])
            if not self.spec.get("batch"):
                key = (key, it["id"])
            groups.setdefault(key, []).append((it, item))
        for group in groups.values():
            try:
                results = self._restore_group(group)
            except Exception as e:
                self._raise_if_gang_broken(e)
                if len(group) > 1:               # isolate the failing image(s)
                    results = []
                    for one in group:
                        try:
                            results.extend(self._restore_group([one]))
                        except Exception as e1:
                            self._raise_if_gang_broken(e1)
                            results.append(({"error": _one_line(e1)}, None))
                else:
                    results = [({"error": _one_line(e)}, None)]
            for (it, _), (rec, png) in zip(group, results):
                base = {"id": it["id"], "input": it["source"], "config": it["config"]}
                if png is None:
                    records[it["id"]] = {**base, "status": "failed", **rec}
                else:
                    records[it["id"]] = {**base, "status": "ok", "error": None, **rec, "png": png}
                self.images_done += 1
                self._maybe_test_exit()
        return [records[it["id"]] for it in items]

    def _raise_if_gang_broken(self, e: Exception) -> None:
        if self.world > 1 and (not isinstance(e, DeqirError) or "collective" in str(e)):
            raise _GangBroken(f"rank {self.rank}: {_one_line(e)}") from e


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    if isinstance(e, DeqirError):
        return msg or "error"
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


# ============================================================================ the driver


@dataclass
class _Batch:
    index: int
    entries: list
    payload: object = None         # ObjectRef of the shipped items (kept for retries)
    attempt: int = 0


@dataclass
class _Worker:
    index: int
    ranks: list                     # rank actor handles (1 for throughput workers)
    pg: object = None               # placement group (gangs)
    inflight: list = field(default_factory=list)   # [(batch, [refs], done_flags)]
    alive: bool = True


@dataclass
class RayRestoreJob:
    """A dataset restore on Ray. ``run()`` returns the summary dict (also written to ``OUT/summary.json``).

    ``op_params``: operator keyword arguments of the task (as ``cli._operator_params`` builds them);
    ``restore_kw``: sampler settings (``cli._restore_kwargs``, including sigma_y); ``device``: "cpu",
    "cuda" or None (cuda when the cluster has GPUs). ``address``: "local" (start a private Ray,
    reusing one already initialised in this process), "auto" or a cluster address.
    """

    input: str
    out: str
    task: str
    op_params: dict = field(default_factory=dict)
    restore_kw: dict = field(default_factory=dict)
    model: str = "analytic"
    checkpoint: str | None = None
    seed: int = 0
    from_clean: bool = False
    bits: int = 8
    device: str | None = None
    address: str = "local"
    workers: int | None = None
    gpus_per_worker: int = 1
    cpus_per_worker: float = 1.0
    images_per_batch: int = 4
    batch_restore: str = "auto"
    max_retries: int = 2
    dist_timeout: float = 300.0
    summary_path: str | None = None
    progress: bool = True
    connect_timeout: float = 30.0

    # ---------------------------------------------------------------- preparation (no Ray)
    def prepare(self):
        """Check everything that can be checked without Ray; writes nothing (OUT is not created)."""
        from .imageio import check_dir_creatable
        from .restore import check_settings
        if self.images_per_batch < 1:
            raise DeqirError("--images-per-batch must be at least 1")
        if self.gpus_per_worker < 1:
            raise DeqirError("--gpus-per-worker must be at least 1")
        if self.workers is not None and self.workers < 1:
            raise DeqirError("--workers must be at least 1")
        if self.cpus_per_worker <= 0:
            raise DeqirError("--cpus-per-worker must be positive")
        if self.max_retries < 0:
            raise DeqirError("--max-retries must be >= 0")
        if self.batch_restore not in ("auto", "on", "off"):
            raise DeqirError("--batch-restore must be auto, on or off")
        if not self.connect_timeout > 0:
            raise DeqirError(f"--connect-timeout must be positive, got {self.connect_timeout!r}")
        if not self.dist_timeout > 0:
            raise DeqirError(f"--dist-timeout must be positive, got {self.dist_timeout!r}")
        self.device = _check_device(self.device)
        if self.device == "cuda" and self.address in (None, "", "local"):
            import torch
            if not torch.cuda.is_available():
                raise DeqirError("--device cuda, but this machine has no usable CUDA GPU "
                                 f"(torch {torch.__version__}); use --device cpu")
        settings = {k: v for k, v in self.restore_kw.items() if k != "profile"}
        if settings.get("solver") == "auto":
            # every worker must choose the same solver (a retried image must be identical): the
            # choice comes from one measured profile, read here and shipped to the workers
            if not self.restore_kw.get("profile"):
                raise DeqirError("ray-restore --solver auto needs --profile (a cost profile from "
                                 "'deqir bench --profile'), so that every worker makes the same choice")
            if not isinstance(self.restore_kw["profile"], dict):
                from .profile import load_profile
                self.restore_kw = {**self.restore_kw, "profile": load_profile(self.restore_kw["profile"])}
            settings["solver"] = "picard"         # auto picks serial or picard: check the latter's settings
        check_settings(**settings)
        if self.gpus_per_worker > 1:
            if self.restore_kw.get("solver", "picard") == "serial":
                raise DeqirError("gangs (--gpus-per-worker > 1) shard the chain: use --solver picard or anderson")
            if self.gpus_per_worker > self.restore_kw.get("steps", 25):
                raise DeqirError(f"{self.gpus_per_worker} ranks for a chain of {self.restore_kw.get('steps')} rows")
        inp = Path(self.input)
        entries, not_images = read_input(inp)
        out = Path(self.out)
        _check_out(inp, out, entries)
        check_dir_creatable(out)
        summary_path = Path(self.summary_path) if self.summary_path else out / SUMMARY_NAME
        check_dir_creatable(summary_path.parent)
        # the model and its checkpoint (names, file header, keys and shapes; no pickled code is
        # run), so that a bad --checkpoint fails here and not in every worker after Ray started
        _check_model(self.model, self.checkpoint, local=self.address in (None, "", "local"))
        return entries, not_images, out, summary_path

    def _entry_config(self, entry: InputEntry, base: dict, mask_cache: dict):
        """(operator params, sigma_y, config hash) of one image."""
        params = dict(self.op_params)
        sigma_y = float(self.restore_kw.get("sigma_y", 0.0))
        if entry.params:
            from .cli import _operator_params
            flags = {k: v for k, v in entry.params.items() if k != "sigma_y"}
            mask = flags.get("mask")
            if isinstance(mask, str) and Path(mask).suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
                mp = Path(mask) if Path(mask).is_absolute() else Path(self.input).parent / mask
                if str(mp) not in mask_cache:
                    mask_cache[str(mp)] = _operator_params(argparse.Namespace(task=self.task, mask=str(mp)))["mask"]
                flags["mask"] = mask_cache[str(mp)]
            mask_val = flags.pop("mask", None)
            params.update(_operator_params(argparse.Namespace(task=self.task, **flags)))
            if mask_val is not None:
                params["mask"] = mask_val
            if "sigma_y" in entry.params:
                sigma_y = float(entry.params["sigma_y"])
        cfg = {**base, "op_params": params, "restore": {**base["restore"], "sigma_y": sigma_y}}
        return params, sigma_y, config_hash(cfg)

    # ---------------------------------------------------------------- run
    def run(self) -> dict:
        """Check, start Ray and the workers, and only then create the output (see ``_Output``)."""
        t_start = time.perf_counter()
        entries, not_images, out, summary_path = self.prepare()
        base = {**_model_identity(self.model, self.checkpoint), "task": self.task,
                "restore": {k: v for k, v in self.restore_kw.items() if k != "sigma_y"},
                "seed": self.seed, "from_clean": self.from_clean, "bits": self.bits}
        job_hash = config_hash({**base, "op_params": self.op_params, "sigma_y": self.restore_kw.get("sigma_y", 0.0)})
        results_path = out / RESULTS_NAME
        previous = load_results(results_path)
        mask_cache: dict = {}
        todo, done_before = [], 0
        for e in entries:
            params, sigma_y, h = self._entry_config(e, base, mask_cache)
            prev = previous.get(e.id)
            if (prev is not None and prev.get("status") == "ok" and prev.get("config") == h
                    and (out / f"{e.id}.png").is_file()):
                done_before += 1
                continue
            todo.append((e, params, sigma_y, h))
        stats = {"ok": 0, "failed": 0, "written": 0, "worker_restarts": 0, "retried_batches": 0}
        records: list[dict] = []
        startup = 0.0
        session = self._start(todo) if todo else None    # Ray + workers: fails before OUT exists
        output = _Output()
        try:
            output.make_dir(out)
            output.make_dir(summary_path.parent)
            log = output.open_log(results_path)
            try:
                skipped_logged = _skipped_ids(results_path)
                for f in not_images:
                    if f.name not in skipped_logged:
                        log.append({"id": f.name, "status": "skipped", "error": "not an image or measurement file",
                                    "input": str(f)})
                if session is not None:
                    startup = session.startup
                    self._run_pool(session, todo, out, log, stats, records)
            finally:
                log.close()
            log.compact()
        except BaseException:
            if stats["written"] == 0:          # nothing restored: leave nothing behind
                output.remove()
            raise
        finally:
            if session is not None:
                session.close()
        wall = time.perf_counter() - t_start
        processed = stats["ok"] + stats["failed"]
        summary = {
            "command": "ray-restore", "config": job_hash, "model": self.model, "task": self.task,
            "images": len(entries), "ok": stats["ok"], "failed": stats["failed"],
            "skipped": done_before + len(not_images), "skipped_done": done_before,
            "skipped_not_image": len(not_images), "written": stats["written"],
            "seconds": round(wall, 3), "startup_seconds": round(startup, 3),   # Ray connect + workers ready
            "images_per_second": round(processed / wall, 4) if processed else 0.0,
            "steady_images_per_second": round(processed / max(wall - startup, 1e-9), 4) if processed else 0.0,
            "workers": getattr(self, "_n_workers", 0), "ranks_per_worker": self.gpus_per_worker,
            "worker_restarts": stats["worker_restarts"], "retried_batches": stats["retried_batches"],
            "results": str(results_path),
        }
        ok = [r for r in records if r["status"] == "ok"]
        if ok:
            summary["mean_iterations"] = round(sum(r["iterations"] for r in ok) / len(ok), 3)
            for key in ("psnr", "ssim"):
                vals = [r[key] for r in ok if key in r]
                if vals:
                    summary[f"mean_{key}"] = round(sum(vals) / len(vals), 4)
        summary["failures"] = [{"id": r["id"], "error": r["error"]} for r in records if r["status"] == "failed"][:50]
        from .jobs import write_json
        write_json(summary_path, summary)
        return summary

    # ---------------------------------------------------------------- Ray
    def _connect(self):
        """Start or join Ray; True when this call started it (and so must shut it down).

        A cluster address is first probed with a plain TCP connection (an unreachable one fails
        at once), and Ray's own wait for its GCS is bounded by ``connect_timeout`` (without the
        bound, ray.init retries an unreachable GCS for minutes)."""
        address = "local" if self.address in (None, "", "local") else str(self.address)
        if address != "local":
            _probe_address(address, self.connect_timeout)
        bounded = address != "local" and "ray" not in sys.modules
        saved = _bound_gcs_wait(self.connect_timeout) if address != "local" else {}
        try:
            import ray
            if ray.is_initialized():
                return False
            kw = dict(include_dashboard=False, log_to_driver=False)
            try:
                ray.init(address=address, **kw)
            except Exception as e:           # ConnectionError, RuntimeError, ValueError from ray.init
                hint = f" within {self.connect_timeout:g} s" if bounded else ""
                raise DeqirError(f"cannot start or join Ray at --address {address}{hint}: "
                                 f"{_one_line(e)[:300]}") from None
            return True
        finally:
            _restore_env(saved)

    def _start(self, todo) -> "_Session":
        """Connect, size the pool against the cluster and start the workers (writes nothing)."""
        import importlib.util
        if "ray" not in sys.modules and importlib.util.find_spec("ray") is None:
            raise DeqirError("ray-restore needs Ray: pip install 'deqir-dist[ray]'")
        t0 = time.perf_counter()
        started = self._connect()            # imports Ray (after bounding its connection waits)
        import ray
        session = _Session(ray, started)
        try:
            session.pool = _Pool(self, ray)
            session.batches = [_Batch(i, todo[s:s + self.images_per_batch])
                               for i, s in enumerate(range(0, len(todo), self.images_per_batch))]
            session.pool.start(min(session.pool.n_workers, len(session.batches)))
        except BaseException:
            session.close()
            raise
        session.startup = time.perf_counter() - t0
        self._n_workers = len(session.pool.workers)
        return session

    def _run_pool(self, session: "_Session", todo, out: Path, log: _ResultsLog, stats: dict,
                  records: list) -> None:
        pool = session.pool
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(todo), desc="ray-restore", unit="img")

        def on_record(rec: dict, png: bytes | None):
            if png is not None:
                path = out / f"{rec['id']}.png"
                try:
                    _write_bytes(path, png)
                    rec["output"] = str(path)
                    stats["written"] += 1
                except DeqirError as e:
                    rec.update(status="failed", error=str(e))
            rec.setdefault("output", None)
            log.append(rec)
            records.append(rec)
            stats[rec["status"]] = stats.get(rec["status"], 0) + 1
            if bar is not None:
                bar.update(1)
        try:
            pool.run(session.batches, on_record)
        finally:
            stats["worker_restarts"] = pool.restarts
            stats["retried_batches"] = pool.retried
            if bar is not None:
                bar.close()


@dataclass
class _Session:
    """Ray (started here or joined) and the started pool; ``close`` shuts both down."""

    ray: object
    started: bool
    pool: object = None
    batches: list = field(default_factory=list)
    startup: float = 0.0

    def close(self) -> None:
        try:
            if self.pool is not None:
                self.pool.shutdown()
        finally:
            self.pool = None
            if self.started:
                self.started = False
                self.ray.shutdown()


class _Output:
    """The folders and results file a run creates, so that a run that restored nothing can remove
    them again (folders only while empty; files that existed before are never removed)."""

    def __init__(self):
        self.dirs: list[Path] = []
        self.files: list[Path] = []

    def make_dir(self, d: Path) -> None:
        from .imageio import ensure_writable_dir
        missing = []
        p = Path(d)
        while not p.exists() and not p.is_symlink() and p != p.parent:
            missing.append(p)
            p = p.parent
        try:
            ensure_writable_dir(d)
        finally:
            self.dirs.extend(m for m in reversed(missing) if m.is_dir())    # outermost first

    def open_log(self, path: Path) -> _ResultsLog:
        existed = path.exists()
        try:
            log = _ResultsLog(path)
        except OSError as e:
            raise DeqirError(f"cannot write {path}: {_one_line(e)}") from None
        if not existed:
            self.files.append(path)
        return log

    def remove(self) -> None:
        for f in self.files:
            try:
                f.unlink()
            except OSError:
                pass
        for d in reversed(self.dirs):
            try:
                d.rmdir()                            # only if empty
            except OSError:
                pass
        self.files, self.dirs = [], []


def _check_device(device) -> str | None:
    """None, "cpu" or "cuda" (any "cuda:N" becomes "cuda": Ray gives each rank its own GPU as cuda:0)."""
    if device in (None, ""):
        return None
    import torch
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise DeqirError(f"--device must be cpu or cuda for ray-restore, got {device!r}")
    return dev.type


def _check_model(model: str | None, checkpoint: str | None, local: bool = True) -> None:
    """The checks ``load_denoiser`` makes, without building big models or reading their weights:
    known names, and for checkpoint files the header, keys and shapes (torch files are read with
    ``weights_only=True``, memory-mapped when they are zip archives; safetensors by header only).
    For a cluster (``local`` False) a checkpoint path this machine does not have is left to the
    workers, which may see a file system the driver does not."""
    from .models.loading import ARCHITECTURES, PRESETS
    from .models.registry import MODEL_NAMES, _looks_like_path
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
    name = "builtin" if model is None and checkpoint is None else model
    if name == "builtin":
        from .models import load_denoiser
        load_denoiser("builtin", checkpoint=checkpoint)     # a few MB: checks the shipped file
        return
    if name in (None, "analytic"):
        if checkpoint is not None:
            _check_checkpoint(checkpoint, None, local)
        return
    if name in PRESETS or name in ARCHITECTURES:
        if checkpoint is not None:
            _check_checkpoint(checkpoint, name, local)
        elif name in ARCHITECTURES:
            raise DeqirError(f"model {name!r} needs a checkpoint (ray-restore passes no config)")
        return
    if _looks_like_path(name):
        if checkpoint is not None and os.path.abspath(checkpoint) != os.path.abspath(name):
            raise DeqirError(f"two checkpoint files given ({name} and {checkpoint}); give one")
        _check_checkpoint(name, None, local)
        return
    raise DeqirError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}, or give a checkpoint file")


def _check_checkpoint(path: str, name: str | None, local: bool = True) -> None:
    """``models.loading.check_checkpoint``; on a cluster (``local`` False) a path this machine does
    not have is left to the workers, which may see a file system the driver does not."""
    from .models.loading import check_checkpoint
    if not local and not Path(path).exists():
        return
    check_checkpoint(path, name)


def _split_address(address: str) -> tuple[str, int] | None:
    """(host, port) of ``HOST:PORT`` / ``ray://HOST:PORT`` / ``[v6]:PORT``; None for other forms."""
    a = address
    for scheme in ("ray://", "http://", "https://"):
        if a.startswith(scheme):
            a = a[len(scheme):]
            break
    else:
        if "://" in a:
            return None
    a = a.split("/", 1)[0]
    host, sep, port = a.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host, int(port)


def _probe_address(address: str, timeout_s: float) -> None:
    """A TCP connection to HOST:PORT: an address nothing listens on fails in one line, at once."""
    hp = _split_address(address)
    if hp is None:
        return
    host, port = hp
    if not 0 < port < 65536:
        raise DeqirError(f"--address {address}: port {port} is out of range")
    try:
        with socket.create_connection((host, port), timeout=min(timeout_s, 10.0)):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        if isinstance(e, socket.timeout):
            why = f"no answer within {min(timeout_s, 10.0):g} s"
        raise DeqirError(f"cannot reach Ray at --address {address}: {why} (is the cluster running? "
                         "'ray start --head' starts one; --address local starts a private one)") from None


# Ray's waits for an unreachable GCS: each connection attempt waits for the GCS RPC channel
# (twice: GCS and pubsub) and then for the cluster id; ray.init makes up to 20 attempts.
_GCS_ENV = ("RAY_gcs_rpc_server_connect_timeout_s", "RAY_py_gcs_connect_timeout_s", "RAY_gcs_server_port_wait_time_s")


def _bound_gcs_wait(timeout_s: float) -> dict:
    """Bound ray.init's wait for a cluster's GCS to about ``timeout_s`` seconds: one attempt
    (``RAY_gcs_server_port_wait_time_s``, read by ray.init) of at most ``timeout_s`` (the
    ``RAY_*connect_timeout_s`` settings, read when Ray is imported, so they apply when Ray is not
    imported yet). Variables the user set are kept. Returns the previous values for ``_restore_env``."""
    t = max(1, int(math.ceil(timeout_s)))
    rpc = max(1, t // 5)
    want = {"RAY_gcs_server_port_wait_time_s": "1"}
    if "ray" not in sys.modules:
        want["RAY_gcs_rpc_server_connect_timeout_s"] = str(rpc)
        want["RAY_py_gcs_connect_timeout_s"] = str(max(1, t - 2 * rpc))
    saved = {}
    for k, v in want.items():
        if k not in os.environ:
            saved[k] = None
            os.environ[k] = v
    return saved


def _restore_env(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _skipped_ids(path: Path) -> set:
    out = set()
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and rec.get("status") == "skipped":
                out.add(rec.get("id"))
    return out


def _write_bytes(path: Path, data: bytes) -> None:
    from .imageio import atomic_write
    atomic_write(path, lambda fh: fh.write(data))


class _Pool:
    """Workers (actors or gangs) fed from a queue of batches; dead ones are replaced."""

    def __init__(self, job: RayRestoreJob, ray):
        self.job, self.ray = job, ray
        res = ray.cluster_resources()
        gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 0))
        local = job.address in (None, "", "local")
        dev = _check_device(job.device) or ("cuda" if gpus > 0 else "cpu")   # cuda:N -> cuda (Ray assigns GPUs)
        if dev == "cuda" and gpus <= 0 and local:
            raise DeqirError(f"--device cuda, but this machine's Ray has no GPUs ({cpus:g} CPUs); use --device cpu")
        self.device = dev
        P, c = job.gpus_per_worker, job.cpus_per_worker
        self.bundle = {"CPU": c, **({"GPU": 1} if dev == "cuda" else {})}
        fit = int(gpus // P) if dev == "cuda" else int(cpus // (c * P))
        if job.workers is None:
            if fit < 1:
                raise DeqirError(f"the cluster ({cpus:g} CPUs, {gpus:g} GPUs) cannot hold one worker of "
                                 f"{P} rank(s) x {self.bundle}")
            self.n_workers = fit
        else:
            self.n_workers = job.workers
            if job.workers > fit:
                msg = (f"{job.workers} worker(s) of {P} rank(s) x {self.bundle} need more than the cluster's "
                       f"{cpus:g} CPUs / {gpus:g} GPUs")
                if local:
                    raise DeqirError(msg)
                print(f"deqir: warning: {msg}; waiting for the autoscaler", file=sys.stderr)
        batch = job.batch_restore == "on" or (job.batch_restore == "auto" and dev == "cuda")
        self.spec = {"model": job.model, "checkpoint": job.checkpoint, "device": dev,
                     "threads": max(1, int(c)), "task": job.task,
                     "restore": {k: v for k, v in job.restore_kw.items() if k != "sigma_y"},
                     "seed": job.seed, "from_clean": job.from_clean, "bits": job.bits,
                     "batch": batch, "token": uuid.uuid4().hex[:12]}
        env = {k: v for k, v in os.environ.items() if k.startswith(TEST_ENV_PREFIX)}
        opts = {"num_cpus": c, "num_gpus": 1 if dev == "cuda" else 0, "max_restarts": 0}
        if env:
            opts["runtime_env"] = {"env_vars": env}
        self.actor_opts = opts
        self.actor_cls = ray.remote(RestoreWorker)
        self.workers: list[_Worker] = []
        self.restarts = 0
        self.retried = 0
        self.ready_timeout = 120.0 if local else 1800.0
        self._next_index = 0

    # ---------------------------------------------------------------- workers
    def start(self, n: int) -> None:
        self.workers.extend(self._make(n))

    def _make(self, n: int) -> list[_Worker]:
        ray, P = self.ray, self.job.gpus_per_worker
        made = []
        if P == 1:
            for _ in range(n):
                made.append(_Worker(self._next_index, [self.actor_cls.options(**self.actor_opts).remote(self.spec)]))
                self._next_index += 1
        else:
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
            pgs = [placement_group([dict(self.bundle) for _ in range(P)], strategy="STRICT_PACK") for _ in range(n)]
            ready, _ = ray.wait([pg.ready() for pg in pgs], num_returns=n, timeout=self.ready_timeout)
            if len(ready) < n:
                for pg in pgs:
                    ray.util.remove_placement_group(pg)
                raise DeqirError(f"could not place {n} gang(s) of {P} x {self.bundle} on one node each "
                                 f"within {self.ready_timeout:.0f} s")
            for pg in pgs:
                ranks = [self.actor_cls.options(
                    **self.actor_opts, scheduling_strategy=PlacementGroupSchedulingStrategy(
                        placement_group=pg, placement_group_bundle_index=r)).remote(self.spec) for r in range(P)]
                made.append(_Worker(self._next_index, ranks, pg))
                self._next_index += 1
        try:
            self._get([a.ready.remote() for w in made for a in w.ranks], "start")
            if P > 1:
                addrs = self._get([w.ranks[0].address.remote() for w in made], "choose a gang address")
                backend = "nccl" if self.device == "cuda" else "gloo"
                joins = [a.join.remote(addr, r, P, backend, self.job.dist_timeout)
                         for w, addr in zip(made, addrs) for r, a in enumerate(w.ranks)]
                self._get(joins, "join its gang's process group")
        except DeqirError:
            for w in made:
                self._kill(w)
            raise
        return made

    def _get(self, refs, what: str):
        ray = self.ray
        try:
            return ray.get(refs, timeout=self.ready_timeout)
        except ray.exceptions.GetTimeoutError as e:
            raise DeqirError(f"workers did not {what} within {self.ready_timeout:.0f} s") from e
        except ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None) or e
            raise DeqirError(f"a worker failed to {what}: {_ray_error_line(cause)}") from None

    def _kill(self, w: _Worker) -> None:
        w.alive = False
        for a in w.ranks:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:
                pass
        if w.pg is not None:
            try:
                self.ray.util.remove_placement_group(w.pg)
            except Exception:
                pass

    def shutdown(self) -> None:
        for w in self.workers:
            if w.alive:
                self._kill(w)
        self.workers = []

    # ---------------------------------------------------------------- scheduling
    def _payload(self, batch: _Batch):
        """Read the inputs' bytes (driver side); unreadable files become failed records."""
        items, failed = [], []
        for e, params, sigma_y, h in batch.entries:
            try:
                data = e.path.read_bytes()
                gt_data = e.gt.read_bytes() if e.gt is not None else None
            except OSError as err:
                failed.append({"id": e.id, "input": str(e.path), "config": h, "status": "failed",
                               "error": f"cannot read {err.filename or e.path}: {err.strerror or err}"})
                continue
            items.append({"id": e.id, "source": str(e.path), "suffix": e.path.suffix, "data": data,
                          "gt_data": gt_data, "gt_source": None if e.gt is None else str(e.gt),
                          "gt_suffix": "" if e.gt is None else e.gt.suffix, "op_params": params,
                          "sigma_y": sigma_y, "config": h})
        return items, failed

    def run(self, batches: list[_Batch], on_record) -> None:
        ray = self.ray
        queue = deque(batches)
        owner: dict = {}                      # ref -> (worker, entry)
        max_restarts = max(4, 2 * len(self.workers)) * (self.job.max_retries + 1)

        def submit(w: _Worker):
            while len(w.inflight) < _INFLIGHT_PER_WORKER and queue:
                b = queue.popleft()
                if b.payload is None:
                    items, failed = self._payload(b)
                    for rec in failed:
                        on_record(rec, None)
                    if not items:
                        continue
                    b.payload = ray.put(items)
                refs = [a.restore_batch.remote(b.payload) for a in w.ranks]
                entry = [b, refs, [False] * len(refs), None]
                w.inflight.append(entry)
                for r in refs:
                    owner[r] = (w, entry)

        def fail_worker(w: _Worker, err: str):
            """Kill ``w``, requeue its batches (the oldest counts an attempt), start a replacement."""
            self._kill(w)
            for r in [r for r, (ow, _) in owner.items() if ow is w]:
                del owner[r]
            lost = [e[0] for e in w.inflight]
            w.inflight = []
            for i, b in reversed(list(enumerate(lost))):
                if i == 0:
                    b.attempt += 1
                if b.attempt > self.job.max_retries:
                    for e, _, _, h in b.entries:
                        on_record({"id": e.id, "input": str(e.path), "config": h, "status": "failed",
                                   "error": f"worker died {b.attempt} time(s) on this batch: {err}"}, None)
                    continue
                self.retried += 1
                queue.appendleft(b)
            self.workers.remove(w)
            if self.restarts >= max_restarts:
                raise DeqirError(f"too many worker failures ({self.restarts}); last: {err}. "
                                 "Rerun the same command to resume")
            self.restarts += 1
            try:
                self.workers.extend(self._make(1))
            except DeqirError as e:
                if not self.workers:
                    raise DeqirError(f"no worker left ({e}); rerun the same command to resume") from None
                print(f"deqir: warning: could not replace a worker: {e}", file=sys.stderr)

        while True:
            for w in list(self.workers):
                submit(w)
            if not owner:
                if queue and not self.workers:
                    raise DeqirError("no worker left; rerun the same command to resume")
                if not queue:
                    break
                continue
            ready, _ = ray.wait(list(owner), num_returns=1, timeout=5.0)
            for ref in ready:
                if ref not in owner:          # dropped with its worker in this round
                    continue
                w, entry = owner.pop(ref)
                batch, refs, flags, _ = entry
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayError as e:
                    fail_worker(w, _ray_error_line(getattr(e, "cause", None) or e))
                    continue
                k = refs.index(ref)
                flags[k] = True
                if k == 0:
                    entry[3] = value
                if all(flags):
                    w.inflight.remove(entry)
                    for rec in entry[3]:
                        png = rec.pop("png", None)
                        rec["attempt"] = batch.attempt
                        rec["worker"] = w.index
                        on_record(rec, png)


def _ray_error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    last = [ln for ln in text if ln.strip()]
    msg = last[-1].strip() if last else type(e).__name__
    return f"{type(e).__name__}: {msg}"[:300]


# ============================================================================ command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``ray-restore`` (the flags of ``deqir restore`` plus the Ray ones)."""
    p = subparsers.add_parser("ray-restore", help="restore a folder or manifest on a Ray cluster (resumable)",
                              description="Restore a dataset on Ray: one PNG per image, results.jsonl, "
                                          "summary.json; rerunning skips the images already done.")
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from .cli import _add_output_flags, _add_sampler_flags, _add_task_flags
    p.add_argument("input", help="a folder of measurements (or clean images with --from-clean), or a JSONL "
                                 "manifest: {\"id\", \"path\", \"gt\"?, \"params\"?} per line")
    _add_output_flags(p, "output folder: <id>.png, results.jsonl, summary.json")
    g = p.add_argument_group("ray")
    g.add_argument("--address", default="local",
                   help="local (start a Ray instance here; default), auto (join the running cluster) or HOST:PORT")
    g.add_argument("--workers", type=int, help="workers (gangs); default: as many as the cluster holds")
    g.add_argument("--gpus-per-worker", type=int, default=1,
                   help="P: ranks per worker; P > 1 shards each image's chain over a gang of P "
                        "(one GPU each; on a CPU cluster, P CPU ranks on gloo) (default 1)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per rank (default 1)")
    g.add_argument("--images-per-batch", type=int, default=4, help="images per work unit (default 4)")
    g.add_argument("--batch-restore", default="auto", choices=("auto", "on", "off"),
                   help="restore the images of a unit that share an operator in one call "
                        "(auto: on CUDA only, where it pays)")
    g.add_argument("--max-retries", type=int, default=2, help="reruns of a batch whose worker died (default 2)")
    g.add_argument("--dist-timeout", type=float, default=300.0,
                   help="seconds a gang's collective may wait before the gang is replaced (default 300)")
    g.add_argument("--connect-timeout", type=float, default=30.0,
                   help="seconds to wait for the cluster at --address HOST:PORT / auto before giving up "
                        "(default 30)")
    _add_task_flags(p)
    _add_sampler_flags(p)


def job_from_args(args) -> RayRestoreJob:
    from .cli import _operator_params, _restore_kwargs
    return RayRestoreJob(
        input=args.input, out=args.out, task=args.task, op_params=_operator_params(args),
        restore_kw=_restore_kwargs(args), model=args.model, checkpoint=args.checkpoint, seed=args.seed,
        from_clean=args.from_clean, bits=args.bits, device=args.device, address=args.address,
        workers=args.workers, gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        images_per_batch=args.images_per_batch, batch_restore=args.batch_restore, max_retries=args.max_retries,
        dist_timeout=args.dist_timeout, summary_path=args.json, progress=not args.no_progress,
        connect_timeout=getattr(args, "connect_timeout", 30.0))


def cmd_ray_restore(args) -> int:
    """Run the job; print the summary. Exit status 0 (all ok), 1 (some images failed)."""
    from .cli import _check_sampler_flags
    _check_sampler_flags(args)
    summary = job_from_args(args).run()
    for f in summary["failures"][:10]:
        print(f"failed: {f['id']}: {f['error']}", file=sys.stderr)
    brief = {k: summary[k] for k in ("ok", "failed", "skipped", "images_per_second", "seconds")}
    for k in ("mean_psnr", "mean_ssim", "mean_iterations"):
        if k in summary:
            brief[k] = summary[k]
    print(f"ray-restore: {summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} skipped "
          f"({summary['skipped_done']} done before, {summary['skipped_not_image']} not images); "
          f"{summary['images_per_second']} images/s on {summary['workers']} worker(s)")
    print(json.dumps(brief))
    return 1 if summary["failed"] else 0


def main(argv: list[str] | None = None) -> int:
    """``python launch/ray_restore.py ...``: the same flags as ``deqir ray-restore``."""
    from .cli import main as cli_main
    return cli_main(["ray-restore", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

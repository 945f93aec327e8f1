"""Restore whole datasets on a Ray cluster: resumable, fault-tolerant, with gangs for chain-parallel images.

    deqir ray-restore INPUT -o OUT --task sr_bicubic --scale 4 [--address local|auto|HOST:PORT]
                      [--workers N] [--gpus-per-worker P] [--images-per-batch B] [sampler flags]

Design (docs/design.md section 9): a pool of Ray actors driven by this process.

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
* **solver auto** (the default). Decided once per job, so that every worker (and a retried
  batch) chooses alike: once the pool is up, the first worker (rank 0 of a gang) plans the first
  input that loads, from ``--profile`` or from c(b) timed there once (on its padded size, cached
  on that node), and that one c(b) table goes to every worker; each then plans its images from it
  (``restore(..., profile=table)``; on a CPU almost always serial). summary.json records what was asked
  (``solver``), the job's plan (``auto``: choice, reason, the table) and what ran (``solvers``,
  ``plans``). A gang whose plan is serial is refused before anything is written.
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

import errno
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from deqir_dist.api.budget import time_cap
from deqir_dist.api.planner import load_profile
from deqir_dist.api.profile_cache import plan_summary
from deqir_dist.api.restore import check_settings
from deqir_dist.dataset.described import check_described_inputs
from deqir_dist.dataset.items import check_declared_size
from deqir_dist.dataset.manifest import InputEntry, Ticker, _check_out, read_input
from deqir_dist.dataset.results import (
    RESULTS_NAME,
    SUMMARY_NAME,
    _model_identity,
    _ResultsLog,
    _skipped_ids,
    _write_bytes,
    config_hash,
    load_results,
)
from deqir_dist.dataset.tasks import operator_params
from deqir_dist.errors import DeqirError, is_real, one_line
from deqir_dist.io.files import check_dir_creatable, ensure_writable_dir
from deqir_dist.io.images import read_image
from deqir_dist.io.jsonio import write_json
from deqir_dist.io.outdir import OutputFolder
from deqir_dist.ray.cluster import (
    _bound_gcs_wait,
    _check_device,
    _check_model,
    _probe_address,
    _restore_env,
)
from deqir_dist.ray.pool import _Batch, _Pool, batch_size
from deqir_dist.solvers.options import DEFAULT_SOLVER


@dataclass
class RayRestoreJob:
    """A dataset restore on Ray. ``run()`` returns the summary dict (also written to ``OUT/summary.json``).

    ``op_params``: operator keyword arguments of the task (as ``cli.operator_params`` builds them);
    ``restore_kw``: sampler settings (``cli.restore_kwargs``, including sigma_y); ``device``: "cpu",
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
    provenance: dict = field(default_factory=dict)    # written into the summary as given (the CLI: argv, versions)

    @property
    def solver(self) -> str:
        """The solver asked for (``restore_kw["solver"]``; default auto)."""
        return self.restore_kw.get("solver", DEFAULT_SOLVER)

    # ---------------------------------------------------------------- preparation (no Ray)
    def prepare(self):
        """Check everything that can be checked without Ray; writes nothing (OUT is not created)."""
        if self.images_per_batch < 1:
            raise DeqirError("--images-per-batch must be at least 1")
        if self.gpus_per_worker < 1:
            raise DeqirError("--gpus-per-worker must be at least 1")
        if self.workers is not None and self.workers < 1:
            raise DeqirError("--workers must be at least 1")
        if not (is_real(self.cpus_per_worker) and 0 < self.cpus_per_worker < math.inf):
            raise DeqirError(f"--cpus-per-worker must be a finite number > 0, got {self.cpus_per_worker!r}")
        if self.max_retries < 0:
            raise DeqirError("--max-retries must be >= 0")
        if self.batch_restore not in ("auto", "on", "off"):
            raise DeqirError("--batch-restore must be auto, on or off")
        if not (is_real(self.connect_timeout) and self.connect_timeout > 0):
            raise DeqirError(f"--connect-timeout must be positive, got {self.connect_timeout!r}")
        if not (is_real(self.dist_timeout) and self.dist_timeout > 0):
            raise DeqirError(f"--dist-timeout must be positive, got {self.dist_timeout!r}")
        self.device = _check_device(self.device)
        if self.device == "cuda" and self.address in (None, "", "local"):
            import torch
            if not torch.cuda.is_available():
                raise DeqirError("--device cuda, but this machine has no usable CUDA GPU "
                                 f"(torch {torch.__version__}); use --device cpu")
        settings = {k: v for k, v in self.restore_kw.items() if k not in ("profile", "max_time")}
        time_cap(self.restore_kw.get("max_time"))      # the work cap (api.budget): a bad value, one line now
        if self.solver == "auto" and self.restore_kw.get("profile") is not None \
                and not isinstance(self.restore_kw["profile"], dict):
            # every worker must choose the same solver (a retried image must be identical): they all
            # plan from one c(b) table, this file's, read here; without one, the table is timed once
            # on one worker when the pool starts (_start, pool.plan_auto)
            self.restore_kw = {**self.restore_kw, "profile": load_profile(self.restore_kw["profile"])}
        check_settings(**settings)                # auto: validated as picard
        if self.gpus_per_worker > 1:
            if self.solver == "serial":
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
        sigma_y = self.restore_kw.get("sigma_y")        # None: each measurement's from its bit depth
        sigma_y = None if sigma_y is None else float(sigma_y)
        if not entry.params:        # the job's own settings: one hash for all such entries (10^6 lines)
            key = ("default", sigma_y)
            if key not in mask_cache:
                cfg = {**base, "op_params": params, "restore": {**base["restore"], "sigma_y": sigma_y}}
                mask_cache[key] = config_hash(cfg)
            return params, sigma_y, mask_cache[key]
        if entry.params:
            flags = {k: v for k, v in entry.params.items() if k != "sigma_y"}
            mask = flags.get("mask")
            if isinstance(mask, str) and Path(mask).suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
                mp = Path(mask) if Path(mask).is_absolute() else Path(self.input).parent / mask
                if str(mp) not in mask_cache:
                    mask_cache[str(mp)] = operator_params(self.task, {"mask": str(mp)})["mask"]
                flags["mask"] = mask_cache[str(mp)]
            mask_val = flags.pop("mask", None)
            params.update(operator_params(self.task, flags))
            if mask_val is not None:
                params["mask"] = mask_val
            if "sigma_y" in entry.params:
                sigma_y = float(entry.params["sigma_y"])
        cfg = {**base, "op_params": params, "restore": {**base["restore"], "sigma_y": sigma_y}}
        return params, sigma_y, config_hash(cfg)

    # ---------------------------------------------------------------- run
    def run(self) -> dict:
        """Check, lock OUT for the whole job (io.outdir.OutputFolder: a second job on it fails at
        once), start Ray and the workers, and only then write (see ``_Output``)."""
        t_start = time.perf_counter()
        entries, not_images, out, summary_path = self.prepare()
        with OutputFolder(out, command="deqir ray-restore"):
            return self._run(t_start, entries, not_images, out, summary_path)

    def _run(self, t_start, entries, not_images, out: Path, summary_path: Path) -> dict:
        base = {**_model_identity(self.model, self.checkpoint), "task": self.task,
                "restore": {k: v for k, v in self.restore_kw.items() if k not in ("sigma_y", "max_time")},
                "seed": self.seed, "from_clean": self.from_clean, "bits": self.bits}
        job_hash = config_hash({**base, "op_params": self.op_params, "sigma_y": self.restore_kw.get("sigma_y", 0.0)})
        results_path = out / RESULTS_NAME
        previous = load_results(results_path)
        mask_cache: dict = {}
        todo, done_before, refused = [], 0, []
        tick = Ticker("checking inputs and earlier results, image", len(entries))
        for n, e in enumerate(entries, 1):
            tick(n)
            params, sigma_y, h = self._entry_config(e, base, mask_cache)
            prev = previous.get(e.id)
            if (prev is not None and prev.get("status") == "ok" and prev.get("config") == h
                    and _output_decodes(out / f"{e.id}.png")):
                done_before += 1
                continue
            if not self.from_clean:     # a flag contradicting a measurement's description: refused before Ray
                check_described_inputs([e.path], self.task, params, sigma_y)
            try:        # the size its header or description declares, against --max-pixels: never shipped
                check_declared_size(e.path, self.task, params, self.from_clean)
            except DeqirError as err:
                refused.append({"id": e.id, "input": str(e.path), "config": h, "status": "failed", "error": str(err)})
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
            # an earlier run's summary would describe a folder this run is changing: it goes before the
            # first output (results.jsonl is the record meanwhile), the new one is written at the end
            if summary_path.is_symlink() or summary_path.is_file():
                try:
                    summary_path.unlink()
                except OSError as e:
                    raise DeqirError(f"cannot replace {summary_path}: {one_line(e, bare_deqir=True)}") from None
            try:
                skipped_logged = _skipped_ids(results_path)
                for f in not_images:
                    if f.name not in skipped_logged:
                        log.append({"id": f.name, "status": "skipped", "error": "not an image or measurement file",
                                    "input": str(f)})
                for rec in refused:           # over the pixel cap by its header: a failed record, no work
                    rec["output"] = None
                    log.append(rec)
                    records.append(rec)
                    stats["failed"] += 1
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
        restored = stats["ok"]         # throughput counts the images restored, not the failures
        summary = {
            "command": "ray-restore", "config": job_hash, "task": self.task,
            "model": self.model or ("builtin" if self.checkpoint is None else str(self.checkpoint)),
            **({"checkpoint": str(self.checkpoint)} if self.checkpoint else {}),
            "images_per_batch": getattr(self, "_batch_size", self.images_per_batch),
            "images": len(entries), "ok": stats["ok"], "failed": stats["failed"],
            "skipped": done_before + len(not_images), "skipped_done": done_before,
            "skipped_not_image": len(not_images), "written": stats["written"],
            "restored_total": done_before + stats["ok"],      # this run and the earlier ones in this -o
            "seconds": round(wall, 3), "startup_seconds": round(startup, 3),   # Ray connect + workers ready
            "images_per_second": round(restored / wall, 4) if restored else 0.0,
            "steady_images_per_second": round(restored / max(wall - startup, 1e-9), 4) if restored else 0.0,
            "workers": getattr(self, "_n_workers", 0), "ranks_per_worker": self.gpus_per_worker,
            "worker_restarts": stats["worker_restarts"], "retried_batches": stats["retried_batches"],
            "results": str(results_path), "solver": self.solver,     # asked; what ran: "solvers", "plans"
        }
        auto = getattr(self, "_auto", None)
        if auto is not None:            # the one plan every worker followed, and its c(b) table
            summary["auto"] = {k: auto[k] for k in ("chosen", "reason", "window", "K", "speedup", "procs", "image",
                                                    "image_shape", "c_ms") if auto.get(k) is not None}
            summary["auto"]["profile"] = (auto.get("profile") or {}).get("source", "profile")
        ok = [r for r in records if r["status"] == "ok"]
        if ok:
            solvers = [r["solver"] for r in ok if "solver" in r]
            if solvers:
                summary["solvers"] = {v: solvers.count(v) for v in sorted(set(solvers))}
            summary.update(plan_summary(ok))
            summary["mean_iterations"] = round(sum(r["iterations"] for r in ok) / len(ok), 3)
            # what was sampled with and where each setting came from (the model card, the user, a
            # file's bit depth: models.settings), as the workers resolved it
            samplers = [r["sampler"] for r in ok if "sampler" in r]
            if samplers:
                summary["sampler"] = samplers[0]
            for key in ("psnr", "ssim"):
                vals = [r[key] for r in ok if key in r]
                if vals:
                    summary[f"mean_{key}"] = round(sum(vals) / len(vals), 4)
        summary["failures"] = [{"id": r["id"], "error": r["error"]} for r in records if r["status"] == "failed"][:50]
        summary.update(self.provenance)
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
            main = threading.current_thread() is threading.main_thread()
            sigterm = signal.getsignal(signal.SIGTERM) if main else None
            try:
                ray.init(address=address, **kw)
            except Exception as e:           # ConnectionError, RuntimeError, ValueError from ray.init
                hint = f" within {self.connect_timeout:g} s" if bounded else ""
                raise DeqirError(f"cannot start or join Ray at --address {address}{hint}: "
                                 f"{one_line(e, bare_deqir=True)[:300]}") from None
            finally:
                # ray.init replaces the SIGTERM handler (Python's sys.exit(15), then its C++ core's
                # stack dump): put back the caller's (apps.guard: the job unwinds, one line, 143)
                if callable(sigterm):
                    signal.signal(signal.SIGTERM, sigterm)
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
            size = batch_size(len(todo), session.pool.n_workers, self.images_per_batch)   # every worker has work
            self._batch_size = size
            session.batches = [_Batch(i, todo[s:s + size]) for i, s in enumerate(range(0, len(todo), size))]
            session.pool.start(min(session.pool.n_workers, len(session.batches)))
            if self.solver == "auto":
                self._auto = self._plan_auto(session.pool, session.batches)
        except BaseException:
            session.close()
            raise
        session.startup = time.perf_counter() - t0
        self._n_workers = len(session.pool.workers)
        return session

    def _plan_auto(self, pool, batches) -> dict | None:
        """solver="auto": one plan for the job (pool.plan_auto: one worker times the model once, or
        reads the profile; every worker then plans from that table). A gang whose plan is serial
        would run the whole chain on each of its ranks: refused, before anything is written."""
        plan = pool.plan_auto(batches)
        if plan is not None and self.gpus_per_worker > 1 and plan["chosen"] == "serial":
            raise DeqirError(f"--solver auto chose serial for gangs of {self.gpus_per_worker} ranks "
                             f"({plan['reason']}): sharding is not predicted to pay here; use "
                             "--gpus-per-worker 1, or --solver picard to shard anyway")
        return plan

    def _run_pool(self, session: "_Session", todo, out: Path, log: _ResultsLog, stats: dict,
                  records: list) -> None:
        pool = session.pool
        bar = None
        if self.progress:
            from deqir_dist.sampling.progress import progress_bar
            bar = progress_bar(len(todo), "ray-restore", "img")

        def on_record(rec: dict, png: bytes | None):
            if png is not None:
                path = out / f"{rec['id']}.png"
                try:
                    _write_bytes(path, png)
                    rec["output"] = str(path)
                    stats["written"] += 1
                except DeqirError as e:
                    cause = e.__cause__
                    if isinstance(cause, OSError) and cause.errno in _FATAL_ERRNOS:   # disk full: stop here
                        raise DeqirError(f"{e}; the images written so far are recorded in {RESULTS_NAME}: "
                                         "free space and rerun the same command to resume") from None
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


_FATAL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


def _output_decodes(path: Path) -> bool:
    """Resume skips an image only if its output is a regular file that decodes."""
    try:
        read_image(path)
    except DeqirError:
        return False
    return True


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
            raise DeqirError(f"cannot write {path}: {one_line(e, bare_deqir=True)}") from None
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


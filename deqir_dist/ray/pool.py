"""The driver's pool of Ray workers: batches in flight, retries, replacement of dead workers."""
from __future__ import annotations

import math
import os
import sys
import uuid
from collections import deque
from dataclasses import dataclass, field

from deqir_dist.errors import DeqirError
from deqir_dist.io import limits
from deqir_dist.io.limits import read_file_bytes
from deqir_dist.ray.cluster import _check_device, _ray_error_line
from deqir_dist.ray.worker import TEST_ENV_PREFIX, RestoreWorker

_INFLIGHT_PER_WORKER = 2
_PLAN_INPUTS = 8               # solver="auto": inputs tried, in order, for the one planning load




# ============================================================================ the driver


def batch_size(images: int, workers: int, per_batch: int) -> int:
    """Images per work unit: ``per_batch``, but at most ceil(images / workers), so that a small
    job still gives every worker a batch."""
    return max(1, min(int(per_batch), math.ceil(images / max(1, int(workers)))))


def least_loaded(workers: list, cap: int):
    """The live worker with the fewest batches in flight (the lowest index on a tie) that can take
    one more (fewer than ``cap``), or None."""
    free = [w for w in workers if w.alive and len(w.inflight) < cap]
    return min(free, key=lambda w: (len(w.inflight), w.index)) if free else None


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


class _Pool:
    """Workers (actors or gangs) fed from a queue of batches; dead ones are replaced."""

    def __init__(self, job, ray):      # job: the RayRestoreJob being run
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
                     "batch": batch, "token": uuid.uuid4().hex[:12], "limits": limits.current()}
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

    # ---------------------------------------------------------------- solver="auto"
    def plan_auto(self, batches: list[_Batch]) -> dict | None:
        """solver="auto", decided once for the job: the first worker (rank 0 of a gang) plans the
        first input that loads (tried ``_PLAN_INPUTS`` at a time, in order), from the given profile
        or c(b) timed there once; that c(b) table then goes to every worker (and every replacement,
        through the spec), so that all of them, planning each image from the same table, choose
        alike. None when no input loads (each fails, and is recorded, when its batch runs)."""
        entries = [e for b in batches for e in b.entries]
        for start in range(0, len(entries), _PLAN_INPUTS):
            items, _ = self._payload(_Batch(-1, entries[start:start + _PLAN_INPUTS]))
            plan = self._get([self.workers[0].ranks[0].plan_auto.remote(items)], "plan solver auto")[0] \
                if items else None
            if plan is not None:
                self.spec["restore"] = {**self.spec["restore"], "profile": plan["c_ms"]}
                self._get([a.set_profile.remote(plan["c_ms"]) for w in self.workers for a in w.ranks],
                          "take the cost profile")
                return plan
        return None

    # ---------------------------------------------------------------- scheduling
    def _payload(self, batch: _Batch):
        """Read the inputs' bytes (driver side); unreadable files become failed records."""
        items, failed = [], []
        for e, params, sigma_y, h in batch.entries:
            try:      # regular files within the byte cap only; never blocks on a pipe (io.limits)
                data = read_file_bytes(e.path, "input")
                gt_data = read_file_bytes(e.gt, "ground truth") if e.gt is not None else None
            except DeqirError as err:
                failed.append({"id": e.id, "input": str(e.path), "config": h, "status": "failed",
                               "error": f"cannot read {err}"})
                continue
            items.append({"id": e.id, "source": str(e.path), "suffix": e.path.suffix, "data": data,
                          "gt_data": gt_data, "gt_source": None if e.gt is None else str(e.gt),
                          "gt_suffix": "" if e.gt is None else e.gt.suffix, "op_params": params,
                          "sigma_y": sigma_y, "config": h})
        return items, failed

    def run(self, batches: list[_Batch], on_record) -> None:
        """Feed ``batches`` to the workers until every one is recorded (``on_record(rec, png)``)."""
        ray = self.ray
        queue = deque(batches)
        owner: dict = {}                      # ref -> (worker, entry)
        max_restarts = max(4, 2 * len(self.workers)) * (self.job.max_retries + 1)
        while True:
            while queue:                      # one batch at a time to the least-loaded worker
                w = least_loaded(self.workers, _INFLIGHT_PER_WORKER)
                if w is None:
                    break
                self._submit(w, queue, owner, on_record)
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
                try:
                    value = ray.get(ref)
                except ray.exceptions.RayError as e:
                    self._fail_worker(w, _ray_error_line(getattr(e, "cause", None) or e), queue, owner, on_record,
                                      max_restarts)
                    continue
                self._collect(w, entry, ref, value, on_record)

    def _submit(self, w: _Worker, queue: deque, owner: dict, on_record) -> None:
        """Give ``w`` the next batch (batches whose every input is unreadable are recorded and passed)."""
        while queue:
            b = queue.popleft()
            if b.payload is None:
                items, failed = self._payload(b)
                for rec in failed:
                    on_record(rec, None)
                if not items:
                    continue
                b.payload = self.ray.put(items)
            refs = [a.restore_batch.remote(b.payload) for a in w.ranks]
            entry = [b, refs, [False] * len(refs), None]
            w.inflight.append(entry)
            for r in refs:
                owner[r] = (w, entry)
            return

    def _fail_worker(self, w: _Worker, err: str, queue: deque, owner: dict, on_record, max_restarts: int) -> None:
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

    def _collect(self, w: _Worker, entry: list, ref, value, on_record) -> None:
        """One rank's answer for a batch; once every rank answered, record rank 0's results."""
        batch, refs, flags, _ = entry
        k = refs.index(ref)
        flags[k] = True
        if k == 0:
            entry[3] = value
        if all(flags):
            w.inflight.remove(entry)
            batch.payload = None          # its inputs leave the object store once written
            results, entry[1], entry[3] = entry[3], None, None
            for rec in results:
                png = rec.pop("png", None)
                rec["attempt"] = batch.attempt
                rec["worker"] = w.index
                on_record(rec, png)

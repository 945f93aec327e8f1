"""The serving engine: a bounded queue, batches of compatible requests, deadlines, cancellation
and metrics. It hands each batch to an executor (``serve.executor``: in-process, or a local
gang of ranks) and never touches sockets or ranks itself.

* **Queue.** At most ``max_queue`` requests wait; one more is refused at once (:class:`QueueFull`,
  HTTP 429 with Retry-After), so memory is bounded and a client learns to back off.
* **Batching.** Requests with the same compatibility key (``serve.inputs.compatibility_key``) go
  into one restore() call, up to ``max_batch``; the oldest waiting request's key goes first
  (FIFO by head age). The engine waits ``batch_wait_s`` for company only when the executor was
  idle; while it is busy, arrivals simply accumulate.
* **Deadlines and cancellation.** A request past its deadline or whose client left is dropped
  from the queue; inside a running batch it is dropped at the next stopping decision when every
  image of the batch is gone (in-process executor), else its result is discarded: a collective
  is never interrupted, and the neighbours' results do not change.
* **A broken gang** (:class:`GangFailed`) fails its batch and everything queued with 503, turns
  readiness off for good and calls ``on_broken``: the process exits for its supervisor.
"""
from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
import uuid
from dataclasses import dataclass, field

import torch

from deqir_dist.errors import DeqirError, TooLarge, one_line
from deqir_dist.serve.batch import Batch, encode_png, image_record, output_image
from deqir_dist.serve.inputs import Prepared
from deqir_dist.serve.metrics import Metrics


class ServeError(Exception):
    """A request's failure with its HTTP status and one line."""

    status = 500
    outcome = "error"

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(ServeError):
    status, outcome = 429, "queue_full"


class NotReady(ServeError):
    status, outcome = 503, "not_ready"


class GangFailed(ServeError):
    status, outcome = 503, "gang_failed"


class DeadlineExceeded(ServeError):
    status, outcome = 504, "deadline"


class Cancelled(ServeError):
    status, outcome = 499, "cancelled"


class _Abort(Exception):
    """Raised from restore's callback: every image of the batch is cancelled or past its deadline."""


@dataclass
class Job:
    prepared: Prepared
    deadline: float                      # time.monotonic() by which the reply is due
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    enqueued: float = field(default_factory=time.monotonic)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: bool = False

    def gone(self, now: float) -> bool:
        return self.cancelled or now >= self.deadline


@dataclass
class JobResult:
    png: bytes
    record: dict                         # iterations, solver, plan, metrics (as the CLI's records)
    queue_s: float
    solve_s: float
    batch_size: int
    plan: str                            # "sharded over P ranks" / "one process"
    settings: dict = field(default_factory=dict)
    settings_source: dict = field(default_factory=dict)


class Engine:
    def __init__(self, executor, metrics: Metrics | None = None, max_queue: int = 16, max_batch: int = 4,
                 batch_wait_s: float = 0.002, on_broken=None, batch_cap=None):
        self.executor, self.metrics = executor, metrics or Metrics()
        self.max_queue, self.max_batch, self.batch_wait_s = max_queue, max_batch, batch_wait_s
        self.on_broken = on_broken
        self.batch_cap = batch_cap             # (Prepared, max_batch) -> the key's cap (--slo-ms), memoised
        self._caps: dict[str, int] = {}
        self._queues: dict[str, collections.deque] = {}
        self._waiting = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._inflight: list[Job] = []
        self._told = False                 # on_broken called
        self.ready = False
        self.broken: str | None = None
        self.solve_ewma: float | None = None     # seconds per batch, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="deqir-engine", daemon=True)

    # --- life cycle ---------------------------------------------------------------------------
    def start(self, executor=None) -> None:
        """Warm the executor up (given here, or at construction), then take requests."""
        if executor is not None:
            self.executor = executor
        if hasattr(self.executor, "on_failure"):      # a gang's watcher: a rank died, even while idle
            self.executor.on_failure = self.mark_broken
        self.executor.warmup()
        self.ready = True
        self.metrics.set("deqir_ready", 1)
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests; the queued and running ones finish (drain)."""
        with self._cond:
            self._stopping = True
            self.ready = False
            self._cond.notify_all()
        self.metrics.set("deqir_ready", 0)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def mark_broken(self, reason: str) -> None:
        """The gang lost a rank: fail everything waiting with 503 and never run again."""
        with self._cond:
            if self.broken is None:
                self.broken = reason
                self.metrics.inc("deqir_gang_failures_total")
            self.ready = False
            first, self._told = not self._told, True
            queued = [j for q in self._queues.values() for j in q] + list(self._inflight)
            self._queues.clear()
            self._waiting = 0
            self._cond.notify_all()
        self.metrics.set("deqir_ready", 0)
        self.metrics.set("deqir_queue_depth", 0)
        for j in queued:
            _fail(j, GangFailed(f"the gang broke: {self.broken}"))
        if first and self.on_broken is not None:
            self.on_broken(self.broken)

    # --- requests -----------------------------------------------------------------------------
    def submit(self, prepared: Prepared, timeout_s: float) -> Job:
        job = Job(prepared, time.monotonic() + timeout_s)
        with self._cond:
            if self.broken is not None:
                raise GangFailed(self.broken)
            if self._stopping or not self.ready:
                raise NotReady("the server is not ready (starting or shutting down)", retry_after=1)
            if self._waiting >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later",
                                retry_after=self.retry_after())
            self._queues.setdefault(prepared.key, collections.deque()).append(job)
            self._waiting += 1
            self.metrics.set("deqir_queue_depth", self._waiting)
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> None:
        """The client left: drop the job (now if queued; at the next stopping decision if running)."""
        job.cancelled = True
        with self._cond:
            q = self._queues.get(job.prepared.key)
            if q is not None and job in q:
                q.remove(job)
                self._waiting -= 1
                self.metrics.set("deqir_queue_depth", self._waiting)
                if not q:
                    del self._queues[job.prepared.key]
        _fail(job, Cancelled("the client disconnected"))

    def retry_after(self) -> int:
        per_batch = self.solve_ewma or 1.0
        batches = max(1, -(-self._waiting // max(self.max_batch, 1)))
        return max(1, int(round(per_batch * batches)))

    def queue_depth(self) -> int:
        return self._waiting

    # --- the loop -----------------------------------------------------------------------------
    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            idle_since = None
            while True:
                self._drop_gone()
                if self._queues:
                    break
                if self._stopping or self.broken is not None:
                    return None
                self._cond.wait(0.5)
                idle_since = time.monotonic()
            key = min(self._queues, key=lambda k: self._queues[k][0].enqueued)     # oldest head first
            head = self._queues[key][0].prepared
        cap = self._cap(key, head)           # outside the lock: the cost model may time the model once
        with self._cond:
            if idle_since is not None and self.batch_wait_s > 0:     # idle: wait briefly for company
                until = time.monotonic() + self.batch_wait_s
                while len(self._queues.get(key, ())) < cap and time.monotonic() < until \
                        and not self._stopping:
                    self._cond.wait(max(until - time.monotonic(), 0))
            self._drop_gone()
            if key not in self._queues:
                return []
            q = self._queues[key]
            jobs = [q.popleft() for _ in range(min(cap, len(q)))]
            if not q:
                del self._queues[key]
            self._waiting -= len(jobs)
            self.metrics.set("deqir_queue_depth", self._waiting)
            return jobs

    def _cap(self, key: str, prepared: Prepared) -> int:
        """The batch cap of a key: --max-batch, lowered so the modelled latency fits --slo-ms
        (engine thread only; memoised per key)."""
        if self.batch_cap is None or self.max_batch == 1:
            return self.max_batch
        if key not in self._caps:
            if len(self._caps) > 4096:
                self._caps.clear()
            try:
                self._caps[key] = max(1, min(self.max_batch, int(self.batch_cap(prepared, self.max_batch))))
            except Exception:              # the cost model could not be evaluated: no batching for the key
                self._caps[key] = 1
        return self._caps[key]

    def _drop_gone(self) -> None:
        now = time.monotonic()
        for key in list(self._queues):
            q = self._queues[key]
            for j in [j for j in q if j.gone(now)]:
                q.remove(j)
                self._waiting -= 1
                _fail(j, Cancelled("the client disconnected") if j.cancelled else
                      DeadlineExceeded("the request's deadline passed while it waited in the queue"))
            if not q:
                del self._queues[key]
        self.metrics.set("deqir_queue_depth", self._waiting)

    def _loop(self) -> None:
        while True:
            jobs = self._next_batch()
            if jobs is None:
                return
            if jobs:
                self._run(jobs)

    def _run(self, jobs: list[Job]) -> None:
        first = jobs[0].prepared
        batch = Batch([j.prepared.item.name for j in jobs], [j.prepared.seed for j in jobs],
                      torch.cat([j.prepared.item.y for j in jobs]), first.item.op, first.kw,
                      [j.prepared.item.gt for j in jobs])
        started = time.monotonic()
        self.metrics.set("deqir_inflight", len(jobs))
        with self._cond:
            self._inflight = list(jobs)

        def abort(*_):
            if all(j.gone(time.monotonic()) for j in jobs):
                raise _Abort()
        try:
            res = self.executor.run(batch, abort)
        except _Abort:
            for j in jobs:
                _fail(j, Cancelled("the client disconnected") if j.cancelled else
                      DeadlineExceeded("the request's deadline passed while it was restored"))
            return
        except GangFailed as e:
            for j in jobs:
                _fail(j, e)
            self.mark_broken(str(e))
            return
        except DeqirError as e:
            err = ServeError(one_line(e, bare_deqir=True))
            err.status, err.outcome = (413, "too_large") if isinstance(e, TooLarge) else (400, "bad_request")
            for j in jobs:
                _fail(j, err)
            return
        except Exception as e:             # a bug: a one-line 500, and the server carries on
            for j in jobs:
                _fail(j, ServeError(f"internal error: {one_line(e)}"))
            return
        finally:
            self.metrics.set("deqir_inflight", 0)
            with self._cond:
                self._inflight = []
        solve_s = time.monotonic() - started
        self.solve_ewma = solve_s if self.solve_ewma is None else 0.8 * self.solve_ewma + 0.2 * solve_s
        self.metrics.observe("deqir_batch_size", len(jobs))
        plan = getattr(res, "gang_plan", None) or self.executor.plan_name
        self.metrics.inc("deqir_batches_total", plan=plan.split(" over ")[0].replace("chain ", ""))
        for i, j in enumerate(jobs):
            if j.gone(time.monotonic()):
                _fail(j, Cancelled("the client disconnected") if j.cancelled else
                      DeadlineExceeded("the request's deadline passed while it was restored"))
                continue
            try:
                image = output_image(res, i, batch)
                png = encode_png(image[0], j.prepared.bits)
                rec = image_record(res, i, batch, image)
            except Exception as e:
                _fail(j, ServeError(f"internal error: {one_line(e)}"))
                continue
            self.metrics.observe("deqir_iterations", rec["iterations"])
            _set(j, JobResult(png, rec, started - j.enqueued, solve_s, len(jobs), plan,
                              dict(res.settings), dict(res.settings_source)))


def _fail(job: Job, err: Exception) -> None:
    if not job.future.done():
        job.future.set_exception(err)


def _set(job: Job, result: JobResult) -> None:
    if not job.future.done():
        job.future.set_result(result)

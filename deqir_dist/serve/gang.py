"""A local gang: rank 0 (this process) runs the engine and the HTTP server, ranks 1..P-1 are
spawned here and follow. The shape of vLLM's multiprocessing executor and xDiT's old host:

* **Joining.** Every rank joins one process group at ``tcp://127.0.0.1:<free port>`` (gloo on
  CPU, NCCL on CUDA, each rank its own GPU), loads the model, and reports ready on its pipe.
* **Each batch.** Rank 0 sends the batch (ids, seeds, stacked y, the operator, restore's
  arguments) down every follower's pipe, then all P ranks call ``restore(distributed=True)``
  (``serve.batch.run_batch``): the chain is sharded with the plan ``auto`` picks for P
  processes (rank 0 decides, ``Comm.share`` tells the others), the final rows are broadcast,
  and rank 0 answers. Followers wait on their pipe, not in a collective, so an idle gang never
  times out; a follower whose pipe closes (rank 0 died) exits.
* **Failure.** A follower that dies or hangs fails the next (or the running) collective within
  ``--dist-timeout`` (``parallel.dist``: the survivors name the missing rank), and a watcher
  sees a dead follower within a fraction of a second even while idle. Either way the gang is
  never used again: ``GangFailed`` (503 for its requests), readiness off, and the server exits
  with status 3 for its supervisor. Followers ignore SIGTERM and SIGINT: the server drains and
  then stops them itself, so a signal to the whole process group still drains cleanly.
"""
from __future__ import annotations

import math
import multiprocessing
import os
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch

from deqir_dist.errors import DeqirError, one_line
from deqir_dist.serve.batch import Batch, run_batch
from deqir_dist.serve.engine import GangFailed
from deqir_dist.serve.executor import warmup_batch
from deqir_dist.serve.plan import choose_layout, deal

JOIN_TIMEOUT_S = 300.0
_COLLECTIVE_FAILED = re.compile(r"^rank \d+: collective|were given different inputs|failed to prepare")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rank_device(rank: int, device: str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _join(rank: int, world: int, spec: dict):
    """Join the group and load the model: (model, device)."""
    import torch.distributed as dist
    from deqir_dist.models import load_denoiser
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    dev = rank_device(rank, spec.get("device"))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = spec.get("backend") or ("nccl" if dev.type == "cuda" else "gloo")
    # joining waits JOIN_TIMEOUT_S (a rank that imports torch on a loaded machine takes many seconds);
    # the collectives then fail after --dist-timeout, so a dead or hung rank is noticed in time
    host, port = spec["init_method"].removeprefix("tcp://").rsplit(":", 1)
    store = dist.TCPStore(host, int(port), world, is_master=rank == 0, timeout=timedelta(seconds=JOIN_TIMEOUT_S))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=spec["dist_timeout"]))
    model = load_denoiser(spec["model"], checkpoint=spec.get("checkpoint"), device=dev,
                          emulate_cost=spec.get("emulate_cost"))
    return model, dev


def follower_main(conn, rank: int, world: int, spec: dict) -> None:
    """Rank r >= 1 of a local gang: join, report, then follow rank 0 until told to stop."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)      # rank 0 drains, then stops us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        model, _ = _join(rank, world, spec)
    except BaseException as e:
        conn.send(("error", one_line(e, bare_deqir=True)))
        os._exit(2)
    conn.send(("ready", os.getpid()))

    def recv():
        try:
            return conn.recv()
        except (EOFError, OSError):         # rank 0 is gone
            return None
    code = follow(model, rank, recv, conn.send)
    conn.close()
    os._exit(code)


def follow(model, rank: int, recv, send) -> int:
    """A follower's loop: ("batch", b) -> its part of the sharded restore; ("dp", b) -> its own
    images, the result sent back; ("stop", None) -> leave the group (0); rank 0 gone (None) or
    a failed collective -> 3."""
    while True:
        msg = recv()
        if msg is None:
            return 3
        if msg[0] == "stop":
            break
        what, value = handle(model, rank, msg)
        if what == "exit":
            return value
        if what == "reply":
            send(value)
    import torch.distributed as dist
    dist.destroy_process_group()
    return 0


def handle(model, rank: int, msg) -> tuple[str, object]:
    """One message from rank 0 (not "stop"): ("reply", what to send back) for a data-parallel
    part, ("done", None) after a sharded batch, ("exit", 3) when its collective failed (the gang
    is broken: the follower leaves). Shared by the pipe loop above and serve.ray_gang's actors."""
    kind, batch = msg
    if kind == "dp":                          # data-parallel: my own images, in this process
        try:
            return "reply", ("result", _portable(run_batch(model, batch)))
        except DeqirError as e:
            return "reply", ("error", one_line(e, bare_deqir=True))
        except Exception as e:
            return "reply", ("error", f"rank {rank}: {one_line(e)}")
    try:
        run_batch(model, batch, distributed=True)
    except DeqirError as e:
        if _COLLECTIVE_FAILED.search(str(e)):
            return "exit", 3
    except Exception:
        return "exit", 3
    return "done", None


@dataclass
class GangResult:
    """A data-parallel batch's results, in the batch's order (what the engine reads of a RestoreResult)."""

    image: torch.Tensor
    iterations_per_image: list
    solver: str
    plan: dict | None
    settings: dict
    settings_source: dict
    gang_plan: str


def _portable(res) -> dict:
    return {"image": res.image.detach().cpu(), "iterations_per_image": list(res.iterations_per_image),
            "solver": res.solver, "plan": res.plan, "settings": res.settings, "settings_source": res.settings_source}


class LocalGangExecutor:
    """P ranks on this machine; this process is rank 0."""

    def __init__(self, model, procs, conns, world: int, device):
        self.model, self.procs_list, self.conns, self.procs = model, procs, conns, world
        self.device = device
        self.plan_name = f"chain sharded over {world} ranks"
        self.layout = "auto"                 # --plan: auto (the cost model), sharded, data-parallel
        self.dist_timeout = 30.0
        self.on_failure = None
        self.broken: str | None = None
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="deqir-gang-watch", daemon=True)

    @classmethod
    def start(cls, args) -> "LocalGangExecutor":
        world = args.ranks
        spec = {"init_method": f"tcp://127.0.0.1:{free_port()}", "dist_timeout": args.dist_timeout,
                "model": args.model, "checkpoint": args.checkpoint, "device": args.device,
                "emulate_cost": args.emulate_cost, "threads": args.threads, "backend": args.backend}
        ctx = multiprocessing.get_context("spawn")
        procs, conns = [], []
        for r in range(1, world):
            here, there = ctx.Pipe()
            p = ctx.Process(target=follower_main, args=(there, r, world, spec), name=f"deqir-rank{r}", daemon=False)
            p.start()
            there.close()
            procs.append(p)
            conns.append(here)
        try:
            model, dev = _join(0, world, spec)
            deadline = time.monotonic() + JOIN_TIMEOUT_S
            for r, (p, c) in enumerate(zip(procs, conns), start=1):
                while not c.poll(0.2):
                    if not p.is_alive() or time.monotonic() > deadline:
                        raise DeqirError(f"rank {r} did not start (exit status {p.exitcode})")
                kind, info = c.recv()
                if kind != "ready":
                    raise DeqirError(f"rank {r} could not start: {info}")
        except BaseException:
            for p in procs:
                p.kill()
                p.join(5)
            raise
        ex = cls(model, procs, conns, world, dev)
        ex.layout, ex.dist_timeout = getattr(args, "plan", "auto"), args.dist_timeout
        ex._watcher.start()
        return ex

    def pids(self) -> list[int]:
        return [os.getpid()] + [p.pid for p in self.procs_list]

    def warmup(self) -> None:
        for images in (1, 2):
            self.run(warmup_batch(self.model, images))

    # --- how rank 0 talks to follower r (a pipe here; the store under torchrun: serve.torchrun) ---
    def _send(self, r: int, msg) -> None:
        self.conns[r - 1].send(msg)

    def _poll(self, r: int, timeout: float) -> bool:
        return self.conns[r - 1].poll(timeout)

    def _recv(self, r: int):
        return self.conns[r - 1].recv()

    def _gone(self, r: int) -> str | None:
        p = self.procs_list[r - 1]
        return None if p.is_alive() else f"rank {r} (pid {p.pid}) exited with status {p.exitcode}"

    def _followers(self) -> range:
        return range(1, self.procs)

    def health(self) -> str | None:
        if self.broken:
            return self.broken
        for r in self._followers():
            why = self._gone(r)
            if why is not None:
                return why
        return None

    def _fail(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            if self.on_failure is not None:
                self.on_failure(reason)

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            why = self.health()
            if why is not None:
                self._fail(why)
                return

    def run(self, batch: Batch, abort=None):
        """Every rank restores the batch (``abort`` is not used: a collective is never cut short;
        the engine discards a gone request's result)."""
        if self.broken:
            raise GangFailed(self.broken)
        layout, _ = choose_layout(self.model, batch, self.procs, self.layout)
        if layout == "data-parallel":
            return self._run_data_parallel(batch)
        try:
            for r in self._followers():
                self._send(r, ("batch", batch))
        except (OSError, ValueError, RuntimeError) as e:
            self._fail(f"rank {r} is gone ({one_line(e)})")
            raise GangFailed(self.broken) from None
        try:
            return run_batch(self.model, batch, distributed=True)
        except DeqirError as e:
            if _COLLECTIVE_FAILED.search(str(e)):
                self._fail(one_line(e, bare_deqir=True))
                raise GangFailed(self.broken) from None
            raise
        except Exception as e:              # RuntimeError / DistBackendError from torch.distributed
            self._fail(f"the gang failed: {one_line(e)}")
            raise GangFailed(self.broken) from None

    def _run_data_parallel(self, batch: Batch) -> GangResult:
        """Each rank restores its share of the images in one process; rank 0 gathers them."""
        parts = deal(batch, self.procs)
        busy = []
        try:
            for r in self._followers():
                if parts[r] is not None:
                    self._send(r, ("dp", parts[r]))
                    busy.append(r)
        except (OSError, ValueError, RuntimeError) as e:
            self._fail(f"rank {r} is gone ({one_line(e)})")
            raise GangFailed(self.broken) from None
        t0 = time.monotonic()
        results = {0: _portable(run_batch(self.model, parts[0]))}
        deadline = time.monotonic() + 3 * (time.monotonic() - t0) + self.dist_timeout
        errors = []
        for r in busy:
            while not self._poll(r, 0.05):
                gone = self._gone(r)
                if gone is not None or time.monotonic() > deadline:
                    why = gone or f"rank {r} did not answer within {self.dist_timeout:g} s of rank 0"
                    self._fail(f"{why} (during a data-parallel batch)")
                    raise GangFailed(self.broken)
            kind, payload = self._recv(r)
            if kind == "error":
                errors.append(payload)
            else:
                results[r] = payload
        if errors:
            raise DeqirError(errors[0])
        ranks = sorted(results)
        first = results[0]
        per = math.ceil(len(batch.names) / self.procs)
        return GangResult(torch.cat([results[r]["image"] for r in ranks]),
                          [k for r in ranks for k in results[r]["iterations_per_image"]], first["solver"],
                          first["plan"], first["settings"], first["settings_source"],
                          f"data-parallel over {len(ranks)} rank(s) ({per} image(s) each)")

    def close(self) -> None:
        """Stop the followers (after a drain), or kill them when the gang broke."""
        self._stop.set()
        for p, c in zip(self.procs_list, self.conns):
            try:
                if self.broken is None and p.is_alive():
                    c.send(("stop", None))
            except (OSError, ValueError):
                pass
        for p in self.procs_list:
            p.join(10 if self.broken is None else 0.1)
            if p.is_alive():
                p.kill()
                p.join(5)
        if self.broken is None:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()

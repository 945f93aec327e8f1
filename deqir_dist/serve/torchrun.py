"""The gang under torchrun (several nodes): rank 0 serves, the other ranks follow.

``torchrun --nnodes N --nproc-per-node G ... -m deqir_dist serve --model M``: every rank joins
the env:// group torchrun set up; rank 0 runs the engine and the HTTP server, the others run
``serve.gang.follow``, the same loop as the local gang's followers. The messages go through the
group's key-value store (torchrun's rendezvous store) instead of pipes: rank 0 writes follower
r's n-th message under ``deqir/serve/to/r/n``, a follower its replies under ``.../from/r/m``,
and every rank beats a heartbeat key once a second. A follower whose leader's heartbeat is older
than ``STALE_S`` exits (3); rank 0 treats a follower's stale heartbeat as a dead rank (the gang
breaks: 503, not ready, exit 3). Followers poll with ``check`` (never a timed-out ``wait``), so
an idle gang never times out, and they ignore SIGTERM: torchrun signals every rank at once, and
rank 0 drains its requests before it stops them.
"""
from __future__ import annotations

import os
import pickle
import signal
import threading
import time

import torch

from deqir_dist.errors import DeqirError
from deqir_dist.serve.gang import JOIN_TIMEOUT_S, LocalGangExecutor, follow

STALE_S = 10.0
POLL_S = 0.02
_PREFIX = "deqir/serve"


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _store():
    import torch.distributed.distributed_c10d as c10d
    return c10d._get_default_store()


class _Heartbeat:
    """Sets ``deqir/serve/alive/<rank>`` to the time every second, from a thread."""

    def __init__(self, store, rank: int):
        self.store, self.key, self._stop = store, f"{_PREFIX}/alive/{rank}", threading.Event()
        self.store.set(self.key, repr(time.time()))
        threading.Thread(target=self._beat, name="deqir-heartbeat", daemon=True).start()

    def _beat(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.store.set(self.key, repr(time.time()))
            except Exception:
                return

    def stop(self) -> None:
        self._stop.set()


def _age(store, rank: int) -> float:
    return time.time() - float(store.get(f"{_PREFIX}/alive/{rank}").decode())


def run_follower(model, rank: int) -> int:
    """This rank (> 0) under torchrun: follow rank 0 until it says stop (0) or is gone (3)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    store = _store()
    beat = _Heartbeat(store, rank)
    store.set(f"{_PREFIX}/ready/{rank}", str(os.getpid()))
    sent, got = [0], [0]

    def recv():
        key = f"{_PREFIX}/to/{rank}/{got[0]}"
        while True:
            try:
                if store.check([key]):
                    msg = pickle.loads(store.get(key))
                    store.delete_key(key)
                    got[0] += 1
                    return msg
                if _age(store, 0) > STALE_S:
                    return None
            except Exception:               # the store is gone: so is the job
                return None
            time.sleep(POLL_S)

    def send(msg):
        store.set(f"{_PREFIX}/from/{rank}/{sent[0]}", pickle.dumps(msg))
        sent[0] += 1
    try:
        return follow(model, rank, recv, send)
    finally:
        beat.stop()


class TorchrunExecutor(LocalGangExecutor):
    """Rank 0 of a torchrun group: the local gang's executor with the store as its channels."""

    def __init__(self, model, world: int, device, store):
        super().__init__(model, [], [], world, device)
        self.store = store
        self._sent = {r: 0 for r in range(1, world)}
        self._got = {r: 0 for r in range(1, world)}
        self.plan_name = f"chain sharded over {world} ranks (torchrun)"

    @classmethod
    def start(cls, args, model, device) -> "TorchrunExecutor":
        import torch.distributed as dist
        world = dist.get_world_size()
        store = _store()
        ex = cls(model, world, device, store)
        ex.beat = _Heartbeat(store, 0)
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for r in range(1, world):
            while not store.check([f"{_PREFIX}/ready/{r}"]):
                if time.monotonic() > deadline:
                    raise DeqirError(f"rank {r} did not report ready within {JOIN_TIMEOUT_S:g} s")
                time.sleep(0.05)
        ex.layout, ex.dist_timeout = getattr(args, "plan", "auto"), args.dist_timeout
        ex._watcher.start()
        return ex

    def pids(self) -> list[int]:
        return [os.getpid()] + [int(self.store.get(f"{_PREFIX}/ready/{r}").decode()) for r in self._followers()]

    def _send(self, r: int, msg) -> None:
        self.store.set(f"{_PREFIX}/to/{r}/{self._sent[r]}", pickle.dumps(msg))
        self._sent[r] += 1

    def _poll(self, r: int, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while True:
            if self.store.check([f"{_PREFIX}/from/{r}/{self._got[r]}"]):
                return True
            if time.monotonic() >= end:
                return False
            time.sleep(min(POLL_S, max(end - time.monotonic(), 0)))

    def _recv(self, r: int):
        key = f"{_PREFIX}/from/{r}/{self._got[r]}"
        msg = pickle.loads(self.store.get(key))
        self.store.delete_key(key)
        self._got[r] += 1
        return msg

    def _gone(self, r: int) -> str | None:
        try:
            age = _age(self.store, r)
        except Exception as e:
            return f"rank {r}: the store does not answer ({type(e).__name__})"
        return None if age <= STALE_S else f"rank {r} has not beaten its heartbeat for {age:.0f} s"

    def close(self) -> None:
        self._stop.set()
        if self.broken is None:
            for r in self._followers():
                try:
                    self._send(r, ("stop", None))
                except Exception:
                    pass
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
        self.beat.stop()


def torch_device_for(args) -> torch.device:
    from deqir_dist.parallel.dist import init_distributed
    return init_distributed(args.backend, args.dist_timeout, args.device)

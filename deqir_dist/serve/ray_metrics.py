"""One ``/metrics`` reply for all the replicas of a Ray Serve deployment.

Serve's proxy routes a scrape to one replica, and a replica counts only its own requests. So each
replica reports its snapshot (``serve.metrics.Metrics.snapshot``) to one hub actor, every
``PUSH_S`` seconds and again just before it answers ``/metrics``; the reply is the sum over the
replicas heard from in the last ``STALE_S`` seconds (``Metrics.merged``: counters, gauges and
histogram buckets add exactly) with ``deqir_replicas``, the number summed. A replica that stops
(drained) withdraws its numbers; one that died drops out after ``STALE_S``: the totals then fall,
which Prometheus reads as a counter reset, as it would for the replica's own restart.

The hub is created by ``apps.serve_ray.deploy`` (no CPU, owned by the driver, so it ends with
``deqir serve --ray``); a replica that cannot find it answers with its own numbers.
"""
from __future__ import annotations

import threading
import time

from deqir_dist.serve.metrics import Metrics

HUB_NAME, HUB_NAMESPACE = "deqir-metrics", "deqir"
PUSH_S = 1.0
STALE_S = 10.0
_hub = None                 # the driver's handle (see start_hub)


class MetricsHub:
    """The replicas' latest snapshots (the actor's state; plain, so it is tested without Ray)."""

    def __init__(self, stale_s: float = STALE_S):
        self.stale_s = stale_s
        self.snaps: dict[str, tuple[float, dict]] = {}

    def put(self, replica: str, snapshot: dict, now: float | None = None) -> None:
        self.snaps[replica] = (time.monotonic() if now is None else now, snapshot)

    def drop(self, replica: str) -> None:
        self.snaps.pop(replica, None)

    def render(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        self.snaps = {r: (t, s) for r, (t, s) in self.snaps.items() if now - t <= self.stale_s}
        return Metrics.merged([s for _, s in self.snaps.values()]).render()


def start_hub():
    """The deployment's hub actor (an existing one is reused), registered once this returns, so
    every replica started after it finds it."""
    global _hub
    import ray
    hub = ray.remote(num_cpus=0)(MetricsHub).options(name=HUB_NAME, namespace=HUB_NAMESPACE,
                                                     get_if_exists=True).remote()
    ray.get(hub.render.remote(), timeout=60)
    _hub = hub              # the driver holds it: an actor nobody holds a handle to is ended
    return hub


class Reporter:
    """A replica's side: pushes its snapshot to the hub and answers ``/metrics`` with the sum."""

    def __init__(self, metrics: Metrics, replica: str):
        import ray
        self.metrics, self.replica = metrics, replica
        try:
            self.hub = ray.get_actor(HUB_NAME, namespace=HUB_NAMESPACE)
        except ValueError:          # no hub (the deployment was started some other way): own numbers
            self.hub = None
        self._stop = threading.Event()
        if self.hub is not None:
            threading.Thread(target=self._loop, name="deqir-metrics-push", daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.wait(PUSH_S):
            try:
                self.hub.put.remote(self.replica, self.metrics.snapshot())
            except Exception:  # noqa: BLE001  (the hub ends with the driver; the replica goes on)
                return

    async def text(self) -> str:
        """The deployment's sum, this replica's numbers up to date; its own alone without a hub."""
        if self.hub is not None:
            try:
                await self.hub.put.remote(self.replica, self.metrics.snapshot())
                return await self.hub.render.remote()
            except Exception:  # noqa: BLE001
                pass
        return self.metrics.render()

    def close(self) -> None:
        self._stop.set()
        if self.hub is not None:
            try:
                self.hub.drop.remote(self.replica)
            except Exception:  # noqa: BLE001
                pass

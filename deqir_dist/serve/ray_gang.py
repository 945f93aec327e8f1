"""A gang inside a Ray Serve replica (``deqir serve --ray``): the replica is rank 0 and runs the
engine; ranks 1..P-1 are :class:`RankActor` actors in the replica's own placement group (Serve
reserves it per replica: ``placement_group_bundles``, STRICT_PACK, so every rank is on the
replica's node), bundle r for rank r (a GPU each on a GPU cluster, NCCL; else CPUs, gloo).

It is ``serve.gang.LocalGangExecutor`` with Ray in place of the pipes: a batch goes to a
follower as an actor call (``step``), a data-parallel part comes back as that call's result,
and a follower's death is seen through its ``lifeline`` call (a second concurrency group, blocked
until the rank stops), which Ray fails as soon as the actor's process is gone: the watcher marks
the gang broken within a fraction of a second, the replica's ``check_health`` raises, and Serve
replaces the replica (its rank actors, owned by it, die with it). Followers run the same per-message
code as the local gang's (``serve.gang.handle``); one whose collective failed leaves its process.
"""
from __future__ import annotations

import os
import threading

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from deqir_dist.errors import DeqirError, one_line
from deqir_dist.serve.engine import GangFailed
from deqir_dist.serve.gang import JOIN_TIMEOUT_S, LocalGangExecutor, _join, free_port, handle


@ray.remote(concurrency_groups={"life": 1})
class RankActor:
    """Rank r >= 1 of a replica's gang."""

    def __init__(self):
        self.model = None
        self.rank = None
        self._stopped = threading.Event()

    def join(self, rank: int, world: int, spec: dict) -> int:
        """Join rank 0's process group and load the model; the pid (health pages, tests)."""
        self.rank = rank
        self.model, _ = _join(rank, world, spec)
        return os.getpid()

    def step(self, msg):
        """One message from rank 0 (serve.gang.handle); a data-parallel part's reply is returned."""
        if msg[0] == "stop":
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()
            self._stopped.set()
            return None
        what, value = handle(self.model, self.rank, msg)
        if what == "exit":                  # the collective failed: the gang is broken, leave
            os._exit(value)
        return value if what == "reply" else None

    @ray.method(concurrency_group="life")
    def lifeline(self) -> bool:
        """Returns once the rank stopped; fails (ActorDiedError) the moment its process dies."""
        self._stopped.wait()
        return True


class RayGangExecutor(LocalGangExecutor):
    """P ranks in this replica's placement group; this process (the replica) is rank 0."""

    @classmethod
    def start(cls, args) -> "RayGangExecutor":
        world = args.ranks
        pg = ray.util.get_current_placement_group()
        if pg is None:
            raise DeqirError("a gang of ranks in Ray Serve needs the replica's placement group "
                             "(deploy it with placement_group_bundles)")
        host = ray.util.get_node_ip_address()
        gpu = bool(ray.get_runtime_context().get_accelerator_ids().get("GPU"))
        spec = {"init_method": f"tcp://{host}:{free_port(host)}", "dist_timeout": args.dist_timeout,
                "model": args.model, "checkpoint": args.checkpoint, "device": None if gpu else "cpu",
                "emulate_cost": args.emulate_cost, "threads": args.threads, "backend": args.backend}
        cpus = args.threads or 1
        actors = [RankActor.options(num_cpus=cpus, num_gpus=1 if gpu else 0, max_restarts=0, max_task_retries=0,
                                    name=None, scheduling_strategy=PlacementGroupSchedulingStrategy(
                                        placement_group=pg, placement_group_bundle_index=r)).remote()
                  for r in range(1, world)]
        joins = [a.join.remote(r, world, spec) for r, a in enumerate(actors, start=1)]
        try:
            model, dev = _join(0, world, spec)
            pids = ray.get(joins, timeout=JOIN_TIMEOUT_S)
        except BaseException as e:
            for a in actors:
                ray.kill(a, no_restart=True)
            if isinstance(e, ray.exceptions.RayError):
                raise DeqirError(f"a rank of the gang could not start: {one_line(e)[:300]}") from None
            raise
        ex = cls(model, [], [], world, dev)
        ex.actors, ex.actor_pids = actors, pids
        ex.plan_name = f"chain sharded over {world} ranks (Ray)"
        ex.lifelines = [a.lifeline.remote() for a in actors]
        ex.pending = {}
        ex.layout, ex.dist_timeout = getattr(args, "plan", "auto"), args.dist_timeout
        ex._watcher.start()
        return ex

    def pids(self) -> list[int]:
        return [os.getpid(), *self.actor_pids]

    def _send(self, r: int, msg) -> None:
        self.pending[r] = self.actors[r - 1].step.remote(msg)

    def _poll(self, r: int, timeout: float) -> bool:
        ready, _ = ray.wait([self.pending[r]], timeout=timeout)
        return bool(ready)

    def _recv(self, r: int):
        try:
            return ray.get(self.pending.pop(r))
        except ray.exceptions.RayError as e:
            self._fail(f"rank {r} (pid {self.actor_pids[r - 1]}) failed: {one_line(e)[:200]}")
            raise GangFailed(self.broken) from None

    def _gone(self, r: int) -> str | None:
        ready, _ = ray.wait([self.lifelines[r - 1]], timeout=0)
        if not ready:
            return None
        try:
            ray.get(ready[0])
            return f"rank {r} (pid {self.actor_pids[r - 1]}) stopped"
        except ray.exceptions.RayError as e:
            return f"rank {r} (pid {self.actor_pids[r - 1]}) died ({type(e).__name__})"

    def close(self) -> None:
        """Stop the followers after a drain (or kill them when the gang broke), then leave the group."""
        self._stop.set()
        if self.broken is None:
            stops = [a.step.remote(("stop", None)) for a in self.actors]
            ray.wait(stops, num_returns=len(stops), timeout=10)
        for a in self.actors:
            ray.kill(a, no_restart=True)
        if self.broken is None:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()

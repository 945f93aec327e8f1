"""Serial images dealt over torchrun's ranks instead of run on every one of them.

The serial solver does not shard: under torchrun (``restore(distributed=True)``) each rank would run
an image's whole chain, P times the work for one image's time. When an image's solver is serial
(asked for, or auto's plan, decided collectively by rank 0 as ``restore`` decides it), it is put
aside; every P of them, rank r restores the r-th alone (``distributed=False``, solver serial, its
noise drawn from (seed, id) as anywhere), and each image and its record then go from its rank to
all ranks (``broadcast_object_list``, in order), so rank 0 writes every output exactly as one
process would. A failure on one rank reaches all of them as the same one-line error.

Ranks wait in those broadcasts for the slowest image of the round, which may take far longer than a
collective's timeout (``--dist-timeout``, 300 s): they go over a gloo group of their own whose
timeout is twice the work cap (``api.budget.time_cap``: no image modelled longer may start), at
least the default group's (a rank that dies ends the job through torchrun anyway).
"""
from __future__ import annotations

import time
from datetime import timedelta

from deqir_dist.api.budget import time_cap
from deqir_dist.api.profile_cache import plan_record
from deqir_dist.api.restore import restore
from deqir_dist.errors import DeqirError, one_line
from deqir_dist.solvers.options import DEFAULT_SOLVER


def dealing(restore_kw: dict) -> tuple[int, int] | None:
    """(rank, world size) when serial images are dealt: under an initialised group of more than one
    rank, with no ``tile`` given (a serial chain with tiles splits each call's tiles over the ranks
    instead, ``models.tiled``)."""
    if not restore_kw.get("distributed") or restore_kw.get("tile") or restore_kw.get("group") is not None:
        return None
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return None
    return dist.get_rank(), dist.get_world_size()


def serial_plan(model, item, kw: dict, generator) -> dict | None:
    """The record's plan fields when ``item`` would run serial (``{}`` when serial was asked), else
    None. solver="auto" plans collectively, every rank the same (``restore(plan_only=True)``)."""
    solver = kw.get("solver", DEFAULT_SOLVER)
    if solver == "serial":
        return {}
    if solver != "auto":
        return None
    res = restore(model, item.y, item.op, generator=generator, plan_only=True, **kw)
    return {k: v for k, v in plan_record(res).items() if k == "plan"} if res.solver == "serial" else None


_GROUPS: dict = {}
WEEK_S = 7 * 24 * 3600.0


def _group(max_time):
    """The gloo group the dealt images' broadcasts go over (made once, by every rank at the same
    point: the first round), with a timeout the longest image allowed can wait out."""
    import torch.distributed as dist
    cap_s = time_cap(max_time)[0]
    timeout = timedelta(seconds=max(2 * cap_s if cap_s is not None else WEEK_S, 300.0))
    key = (id(dist.group.WORLD), timeout)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(backend="gloo", timeout=timeout)
    return _GROUPS[key]


def restore_dealt(model, pending: list, rank: int, generator_for, seed: int) -> list:
    """``pending``: at most P (item, restore kw, plan fields) of serial images, the same on every
    rank. Rank r restores the r-th; returns, on every rank and in order, (image, steps, record
    fields, seconds) of each."""
    import torch.distributed as dist
    mine = None
    if rank < len(pending):
        it, kw, planned = pending[rank]
        t0 = time.perf_counter()
        try:
            res = restore(model, it.y, it.op, generator=generator_for(seed, it.name),
                          **{**kw, "solver": "serial", "distributed": False, "progress": False})
            mine = ("ok", res.image.detach().cpu(), res.iterations,
                    {**plan_record(res), **planned, "dealt_to_rank": rank}, time.perf_counter() - t0)
        except Exception as e:          # every rank learns of it, instead of waiting at the next broadcast
            mine = ("error", f"{it.source}: {one_line(e, bare_deqir=True)}")
    out = []
    group = _group(pending[0][1].get("max_time"))
    for j in range(len(pending)):
        box = [mine if j == rank else None]
        try:
            dist.broadcast_object_list(box, src=j, group=group)
        except RuntimeError as e:      # a rank gone or silent past the group's timeout: one line
            raise DeqirError(f"rank {j} did not hand over {pending[j][0].source} ({one_line(e)})") from None
        if box[0][0] == "error":
            raise DeqirError(box[0][1])
        out.append(box[0][1:])
    return out

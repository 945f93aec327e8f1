"""Worker functions for the multi-process tests (spawned, so they live in an importable module)."""
import json
import os
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

SHAPE = (3, 8, 8)


def _init(rank, world, port, timeout_s=30):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def _problem(n_images, seed=0, task="sr_avgpool"):
    from deqir_dist import make_operator
    from deqir_dist.models import GaussianMixtureDenoiser
    model = GaussianMixtureDenoiser(seed=0)
    g = torch.Generator().manual_seed(seed)
    op = make_operator(task, SHAPE, **({"scale": 2} if task == "sr_avgpool" else {}))
    x = model.sample(n_images, SHAPE, g)
    return model, op, op.A(x), torch.randn((n_images, *SHAPE), generator=g)


def equivalence(rank, world, port, out_dir):
    """Every case: distributed result vs the same process's single-process result."""
    from deqir_dist import restore
    _init(rank, world, port)
    rows = []
    for steps in (10, 25):
        for solver in ("picard", "anderson"):
            for batch in (1, 2):
                for nw, task, stop in ((0.0, "sr_avgpool", "final"), (0.3, "inpaint", "final"),
                                       (0.0, "inpaint", "rows")):
                    if (nw and (steps, batch) != (10, 2)) or (stop == "rows" and (steps, batch) != (25, 2)):
                        continue
                    model, op, y, xi = _problem(batch, seed=steps + batch, task=task)
                    kw = dict(steps=steps, solver=solver, noise=xi, nw=nw, stop=stop,
                              generator=torch.Generator().manual_seed(5))
                    single = restore(model, y, op, **kw)
                    kw["generator"] = torch.Generator().manual_seed(5)
                    multi = restore(model, y, op, distributed=True, **kw)
                    rows.append({"steps": steps, "solver": solver, "batch": batch, "nw": nw, "stop": stop,
                                 "diff": float((multi.image - single.image).abs().max()),
                                 "k_single": single.iterations_per_image, "k_multi": multi.iterations_per_image,
                                 "rows": list(multi.rank_rows), "state_rows": multi.state_rows,
                                 "image_sum": float(multi.image.double().sum())})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def window_equivalence(rank, world, port, out_dir):
    """The sliding window sharded over the group vs the same window in one process."""
    from deqir_dist import restore
    _init(rank, world, port)
    rows = []
    for steps, window, nw, sigma_y, task in ((12, 12, 0.0, 0.0, "sr_avgpool"), (25, 7, 0.0, 0.0, "inpaint"),
                                             (25, 2, 0.3, 0.0, "inpaint"), (12, 5, 0.3, 0.1, "sr_avgpool")):
        model, op, y, xi = _problem(2, seed=steps + window, task=task)
        kw = dict(steps=steps, solver="picard", noise=xi, nw=nw, sigma_y=sigma_y, window=window,
                  generator=torch.Generator().manual_seed(5))
        single = restore(model, y, op, **kw)
        kw["generator"] = torch.Generator().manual_seed(5)
        multi = restore(model, y, op, distributed=True, **kw)
        rows.append({"steps": steps, "window": window, "nw": nw,
                     "diff": float((multi.image - single.image).abs().max()),
                     "k_single": single.iterations_per_image, "k_multi": multi.iterations_per_image,
                     "state_rows": multi.state_rows, "image_sum": float(multi.image.double().sum()),
                     "bytes": sum(t.bytes_sent for t in multi.timings)})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def dies_mid_window(rank, world, port, out_dir):
    """The same death inside the sliding window (re-split, frozen-row broadcast)."""
    dies_mid_solve(rank, world, port, out_dir, stop="rows", stop_tol=1e-9, window=6)


def two_die_mid_solve(rank, world, port, out_dir):
    """Ranks 1 and 2 of 4 exit abruptly in their third denoiser call: 0 and 3 must name both.
    Rank 3 reaches the failure 2 s after rank 0, so its grace period ends after rank 0's."""
    dies_mid_solve(rank, world, port, out_dir, dying=(1, 2), late=(3,))


def dies_mid_solve(rank, world, port, out_dir, dying=(1,), late=(), **solve):
    """Rank 1 exits abruptly in its third denoiser call; the others must fail fast, naming it."""
    from deqir_dist import DeqirError, restore
    _init(rank, world, port, timeout_s=20)
    model, op, y, xi = _problem(1)
    calls = [0]

    def denoiser(x, t):
        calls[0] += 1
        if rank in dying and calls[0] == 3:
            os._exit(17)
        if rank in late and calls[0] == 3:
            time.sleep(2.0)
        return model(x, t)
    try:
        restore(denoiser, y, op, steps=12, solver="picard", noise=xi, distributed=True, **(solve or {"stop": "none"}))
    except DeqirError as e:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(str(e))
        sys.exit(1)
    sys.exit(0)


def mismatched(rank, world, port, out_dir):
    from deqir_dist import DeqirError, restore
    _init(rank, world, port)
    model, op, y, xi = _problem(1)
    if rank == 1:
        y = y + 1e-3
    err = None
    try:
        restore(model, y, op, steps=10, solver="picard", noise=xi, distributed=True)
    except DeqirError as e:
        err = str(e)
    except Exception:
        traceback.print_exc()
        sys.exit(2)
    _fail_after_error(rank, out_dir, err)   # the group is healthy: the check failed after a good all_gather
    sys.exit(0)


def run_then_exit(fn, rank, world, port, out_dir) -> None:
    """Run a worker and leave with its exit code through os._exit, once its outputs are written and
    its group destroyed: torch/gloo's C++ teardown at interpreter exit aborted a finished rank now
    and then (-6, "terminate called without an active exception"; 1-2 of ~15 runs in fresh clones),
    which is not what these tests examine."""
    code = 0
    try:
        fn(rank, world, port, out_dir)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 3
    if code:        # a failing rank leaves as before: exiting at once, it would be the peer a third rank
        sys.exit(code)  # sees die first (the dead-rank tests name the rank that really died)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _fail_after_error(rank, out_dir, err) -> None:
    """Record the error, destroy the group and exit 1, outside the except block: a traceback kept
    alive through sys.exit holds restore()'s frames (its DistComm and groups) into interpreter
    teardown, after the default group is gone, where gloo's threads can abort the process (-6)."""
    if err is None:
        return
    with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
        f.write(err)
    dist.destroy_process_group()
    sys.exit(1)


def too_many_ranks(rank, world, port, out_dir):
    from deqir_dist import DeqirError, restore
    _init(rank, world, port)
    model, op, y, xi = _problem(1)
    err = None
    try:
        restore(model, y, op, steps=2, solver="picard", noise=xi, distributed=True)
    except DeqirError as e:
        err = str(e)
    _fail_after_error(rank, out_dir, err)
    sys.exit(0)


class _Timed(torch.nn.Module):
    """The same eps, at a set cost: each call sleeps fixed_ms + row_ms per row."""

    def __init__(self, inner, fixed_ms, row_ms):
        super().__init__()
        self.inner = inner
        self.register_buffer("cost_ms", torch.tensor([fixed_ms, row_ms]))    # in the state: its own cache key

    def forward(self, x, t):
        fixed, row = self.cost_ms.tolist()
        time.sleep((fixed + row * x.shape[0]) / 1e3)
        return self.inner(x, t)


def auto_plan_agrees(rank, world, port, out_dir):
    """solver="auto" (the default) under distributed=True: rank 0 times its model and decides, every
    rank runs that plan. Rank 0's model costs 2 ms a row (compute-bound: serial); rank 1's 30 ms a
    call whatever its rows (launch-bound: its own timing would pick picard)."""
    from deqir_dist import DeqirError, restore
    from deqir_dist.api.restore import plan_auto
    _init(rank, world, port)
    model, op, y, xi = _problem(1, seed=4)
    mine = _Timed(model, 30.0, 0.0) if rank == 1 else _Timed(model, 0.0, 2.0)
    rows = []
    for profile in (None, {1: 1.0, 25: 1.1}):       # measured on rank 0; a flat profile: picard pays
        res = restore(mine, y, op, steps=25, noise=xi, distributed=True, profile=profile)
        rows.append({"solver": res.solver, "chosen": res.plan["chosen"], "reason": res.plan["reason"],
                     "c_ms": {str(k): v for k, v in res.plan["c_ms"].items()},
                     "source": res.plan["profile"]["source"], "rows": list(res.rank_rows or (0, 25)),
                     "image_sum": float(res.image.double().sum())})
    own = plan_auto(mine, op, world, None, 25)[0]       # what this rank alone would have chosen
    try:
        restore(model, y, op, steps=25, noise=xi, distributed=True, profile=os.path.join(out_dir, "none.json"))
        err = ""
    except DeqirError as e:
        err = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"runs": rows, "own": own, "error": err}, f)
    dist.destroy_process_group()


def noise_gradient_equivalence(rank, world, port, out_dir):
    """The sharded implicit xi-gradient (adjoint Picard over ranks) vs the single-process one, float64."""
    from deqir_dist import DeqirError
    from deqir_dist.api.inversion import noise_gradient
    _init(rank, world, port)
    rows = []
    # case 2: lam < 1 from row 4 on (sigma_y = 4), so the range-space reverse carry (and its decay)
    # crosses the rank boundaries; with z rows (nw > 0), each rank using its own slice
    for task, solver, etw, sigma_y, nw in (("sr_avgpool", "serial", 0.0, 0.0, 0.0),
                                           ("sr_avgpool", "anderson", 0.5, 4.0, 0.3)):
        model, op, y, xi = _problem(1, seed=3, task=task)
        y, xi = y.double(), xi.double()
        z = torch.randn((1, 10, *SHAPE), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
        target = torch.linspace(-0.5, 0.5, xi.numel(), dtype=torch.float64).view_as(xi)

        def loss(h):
            return (h - target).pow(2).flatten(1).mean(1)
        kw = dict(steps=10, solver=solver, etw=etw, sigma_y=sigma_y, nw=nw, step_noise=z if nw else None,
                  dtype=torch.float64, adjoint="picard")
        single = noise_gradient(model, y, op, xi, loss, **kw)
        multi = noise_gradient(model, y, op, xi, loss, distributed=True, **kw)
        rel = float((multi.grad - single.grad).norm() / single.grad.norm())
        rows.append({"task": task, "solver": solver, "etw": etw, "rel": rel,
                     "grad_norm": float(single.grad.norm()),
                     "loss_diff": float((multi.loss - single.loss).abs().max()),
                     "image_diff": float((multi.image - single.image).abs().max()),
                     "k_adj": [single.adjoint_iterations, multi.adjoint_iterations],
                     "trace_diff": max(abs(a - c) / max(abs(c), 1e-300)
                                       for a, c in zip(multi.adjoint_trace, single.adjoint_trace)),
                     "rows": list(multi.rank_rows or (0, 10)), "traj_rows": multi.trajectory.shape[1],
                     "grad_sum": float(multi.grad.sum())})
    errors = []
    for bad in (dict(method="phantom"), dict(adjoint="anderson")):
        try:
            noise_gradient(model, y, op, xi, loss, steps=10, dtype=torch.float64, distributed=True, **bad)
            errors.append("")
        except DeqirError as e:
            errors.append(str(e))
    rows.append({"errors": errors})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def tiled_serial(rank, world, port, out_dir):
    """A large photograph under torchrun: the serial chain on every rank, each call's tiles split over
    the ranks (TiledDenoiser.shard); equal to one process's tiled restore."""
    from deqir_dist import make_operator, restore
    from deqir_dist.models import load_denoiser
    _init(rank, world, port)
    model = load_denoiser("builtin")
    op = make_operator("sr_avgpool", (3, 48, 64), scale=4)
    y = op.A(torch.rand((1, 3, 48, 64), generator=torch.Generator().manual_seed(0)) * 2 - 1)
    from deqir_dist.api.budget import model_footprint
    kw = dict(steps=4, solver="serial", tile=16)
    model_footprint(model, 3)            # the estimate's probe, before the calls are counted
    rows = [0]
    model.register_forward_pre_hook(lambda m, args: rows.__setitem__(0, rows[0] + args[0].shape[0]))
    single = restore(model, y, op, generator=torch.Generator().manual_seed(3), **kw)
    rows_single, rows[0] = rows[0], 0
    multi = restore(model, y, op, generator=torch.Generator().manual_seed(3), distributed=True, **kw)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"diff": float((multi.image - single.image).abs().max()), "tiles": multi.budget["tiles"],
                   "tile_rows_single": rows_single, "tile_rows_this_rank": rows[0]}, f)
    dist.destroy_process_group()

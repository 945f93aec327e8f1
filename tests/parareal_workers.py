"""Spawned ranks for tests/test_parareal.py: the pipelined parareal solver on gloo."""
import json
import os
import sys

import torch
import torch.distributed as dist

from .dist_workers import _init, _problem


def equivalence(rank, world, port, out_dir):
    """Distributed parareal vs the same process's single-process result, several layouts."""
    from deqir_dist import restore
    _init(rank, world, port)
    rows = []
    for steps, blocks, m, batch, nw, task, stop, coarse, secant in (
            (12, 4, 1, 2, 0.0, "sr_avgpool", "final", "normalized", 2),
            (12, 5, 2, 1, 0.3, "inpaint", "final", "ab2", 0),
            (10, 3, 1, 3, 0.0, "inpaint", "none", "ddim", 3),
            (9, 7, 1, 2, 0.0, "sr_avgpool", "final", "normalized", 2),
            (6, 2, 1, 2, 0.0, "inpaint", "none", "normalized", 2)):      # P = 3 > B: a rank without blocks
        model, op, y, xi = _problem(batch, seed=steps + batch, task=task)
        kw = {"steps": steps, "solver": "parareal", "noise": xi, "nw": nw, "stop": stop, "blocks": blocks,
              "coarse_steps": m, "coarse": coarse, "secant": secant, "generator": torch.Generator().manual_seed(5),
              "dtype": torch.float64, "stop_tol": None}
        single = restore(model, y, op, **kw)
        kw["generator"] = torch.Generator().manual_seed(5)
        multi = restore(model, y, op, distributed=True, **kw)
        rows.append({"blocks": blocks, "diff": float((multi.image - single.image).abs().max()),
                     "k_single": single.iterations_per_image, "k_multi": multi.iterations_per_image,
                     "trace_single": single.trace, "trace_multi": multi.trace,
                     "image_sum": float(multi.image.double().sum()), "crit": multi.critical_path_calls,
                     "timings_single": len(single.timings), "rows_single": sum(t.rows for t in single.timings),
                     "timings_multi": len(multi.timings), "bytes_multi": sum(t.bytes_sent for t in multi.timings),
                     "comm_multi": sum(t.comm_s for t in multi.timings)})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(rows, f)
    dist.barrier()                      # nobody exits while another rank still talks to it
    dist.destroy_process_group()


def dies_mid_solve(rank, world, port, out_dir):
    """Rank 1 exits abruptly in its fourth denoiser call; the others must fail fast, naming it."""
    from deqir_dist import DeqirError, restore
    _init(rank, world, port, timeout_s=20)
    model, op, y, xi = _problem(1)
    calls = [0]

    def denoiser(x, t):
        calls[0] += 1
        if rank == 1 and calls[0] == 4:
            os._exit(17)
        return model(x, t)
    try:
        restore(denoiser, y, op, steps=12, solver="parareal", blocks=3, noise=xi, distributed=True, stop="none")
    except DeqirError as e:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(str(e))
        sys.exit(1)
    sys.exit(0)

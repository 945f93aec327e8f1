"""Per-iteration accounting of the sharded chain: denoiser / solver / communication, per rank.

    torchrun --standalone --nproc_per_node=P launch/bench_chain.py --steps 25 50 100 --json out.json

Restores the same images (from the analytic Gaussian-mixture oracle, held-out crops for the
built-in prior, uniform noise images for another --model; sr_avgpool x2) with the chain sharded
over the P ranks (``--window``: the sliding window's rows, 0 for plain sweeps; default: the
library's, a frozen prefix for picard), and reports per iteration: seconds in the denoiser, in the
solver, in collectives (each the mean over iterations, max over ranks), bytes sent per rank, K,
wall-clock, and PSNR against the serial sampler; ``comm_idle_ms`` replays the same collectives
with every rank idle (the transfer cost without waiting for the slowest rank); ``peak_mb`` is the
rank's peak memory: CUDA memory allocated during the solve on a GPU, the process's peak resident
set on CPU (model and Python included, the maximum so far: run the larger N last). Rank 0 prints
the table; JSON with --json.

Bad arguments fail before any work with one line per rank (``bench_chain: error: ...``, exit
status 2): the arguments before joining the process group, the model, the JSON path (rank 0) and
the world size after, with every rank agreeing (one all_reduce) so that none waits for a rank
that stopped.
"""
import argparse
import platform
import resource
import sys
import time

import torch
import torch.distributed as dist

from deqir_dist import make_operator, restore
from deqir_dist.errors import DeqirError
from deqir_dist.models import GaussianMixtureDenoiser, load_denoiser
from deqir_dist.parallel.dist import DEFAULT_TIMEOUT_S, all_ranks_ok, init_distributed
from deqir_dist.quality.metrics import psnr


def idle_comm_ms(images: int, shape, steps: int, frozen: bool, device, reps: int = 50) -> float:
    """ms per iteration of the same collectives with every rank idle: the transfer cost alone.

    Plain sweeps: halo row, summary all_gather, stats all_reduce. Frozen prefix: also the
    float64 frozen-row broadcast and a re-split that moves one row per block boundary."""
    from deqir_dist.parallel.comm import offset_split
    from deqir_dist.parallel.dist import DistComm
    from deqir_dist.sampling.chain import Carry, Summary
    comm = DistComm(device=device)
    world = comm.size
    comm.block_decays = [(1.0, 1.0)] * world
    row = torch.zeros((images, *shape), device=device)
    acc = torch.zeros((images, *shape), dtype=torch.float64, device=device)
    stats = torch.zeros((images, 2 * world), dtype=torch.float64, device=device)
    packed = torch.zeros((images, 2, *shape), dtype=torch.float64, device=device)
    old, new = offset_split(0, steps, world), offset_split(1, steps, world)
    mine = torch.zeros((images, old[comm.rank][1] - old[comm.rank][0], *shape), device=device)

    def once():
        comm.halo(row, row)
        comm.carry(Carry(acc, acc), Summary(acc, acc, 1.0, 1.0), False)
        comm.all_sum(stats)
        if frozen:
            comm.from_rank(packed, 0)
            comm.reshard(mine, old, new, steps)
    once()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(reps):
        once()
    return 1e3 * (time.perf_counter() - t0) / reps


PROG = "bench_chain"


def check_args(args) -> None:
    """The arguments alone (before joining the process group): DeqirError on a bad one."""
    from deqir_dist.api.restore import check_settings
    if not args.steps:
        raise DeqirError("--steps needs at least one number of steps")
    for key in ("size", "images"):
        v = getattr(args, key)
        if v < 1:
            raise DeqirError(f"--{key} must be a positive integer, got {v}")
    if args.dist_timeout is None or not args.dist_timeout > 0:
        raise DeqirError(f"--dist-timeout must be positive, got {args.dist_timeout}")
    if args.size % 2:
        raise DeqirError(f"--size must be even (the task is sr_avgpool x2), got {args.size}")
    extra = {} if args.window is None else {"window": args.window}
    for steps in args.steps:
        try:
            check_settings(steps, args.solver, **extra)
        except DeqirError as e:
            raise DeqirError(f"--steps {steps}: {e}") from None


def _prepare(args, rank: int, world: int, device):
    """Per rank: the model, the images; rank 0 also checks the JSON path. DeqirError on a bad one."""
    if world > min(args.steps):
        raise DeqirError(f"{world} ranks for a chain of {min(args.steps)} rows (--steps {min(args.steps)}): "
                         "use at most one rank per row")
    if rank == 0 and args.json:
        from pathlib import Path

        from deqir_dist.io.files import ensure_writable_dir
        if Path(args.json).is_dir():
            raise DeqirError(f"--json {args.json} is a folder; give a file name")
        ensure_writable_dir(Path(args.json).parent)
    model = load_denoiser(args.model, device=device)
    shape = (3, args.size, args.size)
    g = torch.Generator().manual_seed(0)
    op = make_operator("sr_avgpool", shape, scale=2)
    if args.model == "analytic":
        clean = GaussianMixtureDenoiser(seed=0).sample(args.images, shape, g)
    elif args.model == "builtin":
        from deqir_dist.models.builtin import builtin_bench_images
        clean = builtin_bench_images(args.images, args.size)
    else:
        clean = torch.rand((args.images, *shape), generator=g) * 2 - 1
    return model, shape, g, op, clean


def main(argv=None):
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100])
    ap.add_argument("--model", default="analytic", help="analytic (default) or builtin, or a checkpoint")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--solver", default="picard", choices=("picard", "anderson"))
    ap.add_argument("--window", type=int, help="picard: rows of the sliding window (0: every row every sweep)")
    ap.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                    help=f"seconds any collective may wait for another rank (default {DEFAULT_TIMEOUT_S:g})")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rank = None
    try:
        check_args(args)
        device = init_distributed(timeout_s=args.dist_timeout)
        rank, world = dist.get_rank(), dist.get_world_size()
        return _run(args, rank, world, device)
    except DeqirError as e:
        where = "" if rank is None else f"rank {rank}: "
        line = " ".join(f"{PROG}: error: {where}{e}".split())
        sys.stderr.write(line + "\n")           # one write: the ranks share the terminal
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _run(args, rank: int, world: int, device) -> int:
    model, shape, g, op, clean = all_ranks_ok(lambda: _prepare(args, rank, world, device), device)
    extra = {} if args.window is None else {"window": args.window}
    y = op.A(clean)
    xi = torch.randn((args.images, *shape), generator=g)
    restore(model, y, op, steps=min(args.steps), solver=args.solver, noise=xi, distributed=True, **extra)  # warm-up
    rows = []
    for steps in args.steps:
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        res = restore(model, y, op, steps=steps, solver=args.solver, noise=xi, distributed=True, **extra)
        wall = time.perf_counter() - t0
        peak_mb = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
        its = res.timings
        mine = {"rank": rank, "rows": list(res.rank_rows),
                "denoiser_s": sum(t.denoiser_s for t in its) / len(its),
                "solver_s": sum(t.solver_s for t in its) / len(its),
                "comm_s": sum(t.comm_s for t in its) / len(its),
                "bytes": sum(t.bytes_sent for t in its) / len(its),
                "denoiser_rows": sum(t.rows for t in its), "peak_mb": round(peak_mb, 1)}
        per_rank = [None] * world
        dist.all_gather_object(per_rank, mine)
        if rank == 0:
            serial = restore(model, y, op, steps=steps, solver="serial", noise=xi)
            den = max(r["denoiser_s"] for r in per_rank)
            sol = max(r["solver_s"] for r in per_rank)
            com = max(r["comm_s"] for r in per_rank)
        idle = idle_comm_ms(args.images, shape, steps, args.window != 0 and args.solver == "picard", device)
        if rank == 0:
            rows.append({"P": world, "steps": steps, "K": res.iterations, "wall_s": round(wall, 4),
                         "denoiser_rows_max_rank": max(r["denoiser_rows"] for r in per_rank),
                         "peak_mb_max_rank": max(r["peak_mb"] for r in per_rank),
                         "iter_ms": round(1e3 * wall / res.iterations, 3),
                         "denoiser_ms": round(1e3 * den, 3), "solver_ms": round(1e3 * sol, 3),
                         "comm_ms": round(1e3 * com, 3), "comm_idle_ms": round(idle, 3),
                         "solver_comm_share": round((sol + com) / (den + sol + com), 4),
                         "bytes_per_iter_per_rank": int(max(r["bytes"] for r in per_rank)),
                         "psnr_vs_serial": round(float(psnr(res.image.cpu(), serial.image.cpu()).min()), 2),
                         "per_rank": per_rank})
    if rank == 0:
        cols = ["P", "steps", "K", "denoiser_rows_max_rank", "wall_s", "denoiser_ms", "solver_ms", "comm_ms",
                "comm_idle_ms", "solver_comm_share", "peak_mb_max_rank", "bytes_per_iter_per_rank", "psnr_vs_serial"]
        print(" ".join(f"{c:>12}" for c in cols))
        for r in rows:
            print(" ".join(f"{r[c]!s:>12}" for c in cols))
        if args.json:
            from deqir_dist.io.jsonio import write_json
            write_json(args.json, {"solver": args.solver, "window": args.window, "image_shape": list(shape),
                                   "images": args.images,
                                   "model": args.model, "task": "sr_avgpool x2", "torch": torch.__version__,
                                   "machine": platform.machine(), "backend": dist.get_backend(),
                                   "threads_per_rank": torch.get_num_threads(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

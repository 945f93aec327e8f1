"""Emulated end to end: serial, picard and parareal on P real processes with real gloo collectives, each
denoiser call held to a GPU's c(b) (models.emulated), measured wall-clock against the cost model.

    python bench/emulated_e2e.py --procs 5 10 20 --steps 25 100 \
        --out bench/results/emulated-e2e-adm256-h200-cpu.json

Every rank runs the analytic oracle (3 x 16 x 16, x2 average-pool SR, one image) wrapped in
``CostEmulatingDenoiser`` with the ADM-256 H200 CUDA-graph table
(bench/results/adm256-h200-design-cb.json): a call of b rows lasts c(b), so P processes on this
machine spend in their denoisers what P H200s would, while the chain map, the solver, the
collectives (gloo over localhost TCP) and Python are the real ones. Ranks are spawned with
torch.multiprocessing, as tests/test_distributed.py does.

Per (P, N, solver) and repeat, with K the joint-map evaluations that ran:
* ``wall_ms``: restore() on every rank between two barriers (slowest rank);
* ``model_ms``: the planner's prediction with the measured K (``api.planner.predict_ms``:
  warm start c(1) + K c(ceil(N/P)); an upper bound for picard's frozen prefix, which shrinks
  the batch); serial: N c(1);
* ``schedule_ms``: the same cost model on the schedule that ran: c(1) for the warm start +
  sum over iterations of max over ranks of c(rows that rank evaluated); serial: N c(1);
* the critical path split: per iteration the rank with the largest c(b) (the one the others
  wait for): its denoiser time (held c(b) + wake-up and compute overrun), its time in
  collectives (transfers, and waiting on ranks slower than it), its solver time (the rest of
  the iteration: scans, updates, norms, Python); outside the iterations: validation, input
  digests, the warm start, the final broadcast;
* ``non_denoiser_share``: 1 - (denoiser time on the critical path) / wall;
* ``cpu_load``: CPU seconds of all ranks / (wall x cores): above 1 the ranks queued for this
  machine's cores, which P GPUs (each with its own host cores) would not;
* ``overruns``: denoiser calls whose real compute alone exceeded c(b) (none expected).
parareal runs when ``restore(solver="parareal", distributed=True)`` exists (solvers.registry).
"""
import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deqir_dist import make_operator, restore
from deqir_dist.api.planner import cost_at, predict_ms
from deqir_dist.models import load_denoiser
from deqir_dist.models.emulated import load_cost_file
from deqir_dist.quality.metrics import psnr
from deqir_dist.solvers import registry

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "bench" / "results" / "adm256-h200-design-cb.json"
SHAPE = (3, 16, 16)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem(images: int):
    oracle = load_denoiser("analytic")
    g = torch.Generator().manual_seed(0)
    op = make_operator("sr_avgpool", SHAPE, scale=2)
    return op, op.A(oracle.sample(images, SHAPE, g)), torch.randn((images, *SHAPE), generator=g)


def _timings(res) -> list:
    return [[t.total_s, t.denoiser_s, t.comm_s, t.rows] for t in res.timings]


def worker(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    emu = load_denoiser(None, emulate_cost=cfg["table"])
    op, y, xi = _problem(cfg["images"])
    # the floor of one collective on this host: a small all_reduce (what the stopping rule costs)
    t = torch.zeros(8, dtype=torch.float64)
    lat = []
    for _ in range(40):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        lat.append(time.perf_counter() - t0)
    runs = [{"steps": 0, "solver": "all_reduce", "repeat": 0, "latency_ms": sorted(1e3 * v for v in lat)}]
    for n in cfg["steps"]:
        ref = None
        for solver in ["serial"] + cfg["solvers"]:
            for rep in range(cfg["repeats"]):
                kw = dict(cfg["solver_kw"].get(solver, {}))
                emu.reset()
                dist.barrier()
                cpu0, t0 = time.process_time(), time.perf_counter()
                if solver == "serial":
                    res = restore(emu, y, op, steps=n, solver="serial", noise=xi) if rank == 0 else None
                else:
                    res = restore(emu, y, op, steps=n, solver=solver, noise=xi, distributed=True, **kw)
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                dist.barrier()
                if res is None:
                    continue
                if solver == "serial":
                    ref = res.image
                row = {"steps": n, "solver": solver, "repeat": rep, "wall_s": wall, "cpu_s": cpu,
                       "K": res.iterations, "emulated": emu.stats(), "timings": _timings(res),
                       "psnr_vs_serial": (None if solver == "serial" or ref is None else
                                          round(float(psnr(res.image, ref).min()), 2))}
                for key in ("blocks", "coarse_steps", "critical_path_calls", "denoiser_calls"):
                    if getattr(res, key, None) is not None:
                        row[key] = getattr(res, key)
                runs.append(row)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(runs, f)
    dist.destroy_process_group()


def _spawn(world: int, cfg: dict, out_dir: str, timeout: float) -> None:
    ctx = mp.get_context("spawn")
    port = _port()
    procs = [ctx.Process(target=worker, args=(r, world, port, cfg, out_dir)) for r in range(world)]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    for p in procs:
        p.join(max(1.0, timeout - (time.monotonic() - t0)))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    codes = [p.exitcode for p in procs]
    if alive or any(codes):
        raise SystemExit(f"P={world}: ranks failed or hung (exit codes {codes})")


def _aggregate(world: int, ranks: list[list[dict]], c_ms: dict, cores: int) -> list[dict]:
    out = []
    keyed = [{(r["steps"], r["solver"], r["repeat"]): r for r in rk} for rk in ranks]
    lat = sorted(v for rk in ranks for v in rk[0]["latency_ms"])
    out.append({"procs": world, "solver": "all_reduce", "median_ms": lat[len(lat) // 2],
                "p90_ms": lat[int(0.9 * len(lat))], "samples": len(lat)})
    for r0 in ranks[0][1:]:
        n, solver, k = r0["steps"], r0["solver"], r0["K"]
        row = {"procs": world, "steps": n, "solver": solver, "repeat": r0["repeat"], "K": k,
               "psnr_vs_serial": r0["psnr_vs_serial"]}
        c1 = cost_at(c_ms, 1)
        if solver == "serial":
            wall = r0["wall_s"]
            row.update(wall_ms=1e3 * wall, model_ms=n * c1, schedule_ms=n * c1,
                       critical={"denoiser_ms": 1e3 * r0["emulated"]["held_s"]},
                       cpu_load=r0["cpu_s"] / wall, overruns=r0["emulated"]["overruns"])
        else:
            runs = [rk[(n, solver, r0["repeat"])] for rk in keyed]
            wall = max(r["wall_s"] for r in runs)
            iters = max(len(r["timings"]) for r in runs)
            crit = {"denoiser_ms": 0.0, "target_ms": 0.0, "comm_ms": 0.0, "solver_ms": 0.0, "iterations_ms": 0.0}
            for i in range(iters):
                cand = [(cost_at(c_ms, r["timings"][i][3]) if i < len(r["timings"]) and r["timings"][i][3] else 0.0,
                         r["timings"][i] if i < len(r["timings"]) else None) for r in runs]
                target, t = max(cand, key=lambda c: c[0])
                total, den, comm = t[0], t[1], t[2]
                crit["target_ms"] += target
                crit["denoiser_ms"] += 1e3 * den
                crit["comm_ms"] += 1e3 * comm
                crit["solver_ms"] += 1e3 * max(total - den - comm, 0.0)
                crit["iterations_ms"] += 1e3 * total
            warm = c1 if r0["emulated"]["calls"] > len(r0["timings"]) else 0.0   # restore's warm start: 1 call
            crit["denoiser_ms"] += warm
            crit["outside_iterations_ms"] = 1e3 * wall - crit["iterations_ms"]
            schedule = warm + crit["target_ms"]
            if "critical_path_calls" in r0:      # parareal: batch-1 calls, its own pipelined schedule
                model = schedule = r0["critical_path_calls"] * c1
                # no per-iteration timings: the critical path's calls, each held as long as the calls
                # were on average relative to their c(b)
                ratio = sum(r["emulated"]["held_s"] for r in runs) / max(sum(r["emulated"]["target_s"] for r in runs),
                                                                         1e-12)
                crit = {"denoiser_ms": model * ratio, "held_over_target": ratio,
                        "busiest_rank_denoiser_ms": 1e3 * max(r["emulated"]["held_s"] for r in runs)}
            else:
                model = predict_ms(c_ms, n, world, iterations=k, window=n, warm_start=1 if warm else 0)["parallel_ms"]
            row.update(wall_ms=1e3 * wall, model_ms=model, schedule_ms=schedule, critical=crit,
                       cpu_load=sum(r["cpu_s"] for r in runs) / (wall * cores),
                       overruns=sum(r["emulated"]["overruns"] for r in runs),
                       denoiser_calls=sum(r["emulated"]["calls"] for r in runs))
            for key in ("blocks", "coarse_steps", "critical_path_calls", "denoiser_calls"):
                if key in r0:
                    row[key] = r0[key]
        row["non_denoiser_share"] = 1 - row["critical"]["denoiser_ms"] / row["wall_ms"]
        row["wall_vs_model"] = row["wall_ms"] / row["model_ms"] - 1
        row["wall_vs_schedule"] = row["wall_ms"] / row["schedule_ms"] - 1
        out.append(row)
    return out


def _summary(rows: list[dict]) -> list[dict]:
    """Per (P, N, solver): the fastest repeat, and the speed-up over the same P's serial run."""
    best = {}
    for r in rows:
        if r["solver"] == "all_reduce":
            continue
        key = (r["procs"], r["steps"], r["solver"])
        if key not in best or r["wall_ms"] < best[key]["wall_ms"]:
            best[key] = r
    out = []
    for (p, n, s), r in sorted(best.items()):
        ser = best[(p, n, "serial")]
        out.append({"procs": p, "steps": n, "solver": s, "K": r["K"], "wall_ms": round(r["wall_ms"], 1),
                    "model_ms": round(r["model_ms"], 1), "schedule_ms": round(r["schedule_ms"], 1),
                    "wall_vs_model": round(r["wall_vs_model"], 3), "wall_vs_schedule": round(r["wall_vs_schedule"], 3),
                    "non_denoiser_share": round(r["non_denoiser_share"], 3), "cpu_load": round(r["cpu_load"], 2),
                    "speedup_measured": round(ser["wall_ms"] / r["wall_ms"], 3),
                    "speedup_model": round(ser["model_ms"] / r["model_ms"], 3),
                    "psnr_vs_serial": r["psnr_vs_serial"], "overruns": r["overruns"],
                    "loadavg_1min_after": r.get("loadavg_1min_after")})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 100])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--table", default=str(TABLE))
    ap.add_argument("--solvers", nargs="+", default=["picard", "parareal"])
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per P")
    ap.add_argument("--raw", action="store_true", help="also keep every rank's per-iteration timings")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    c_ms = load_cost_file(args.table)
    available = set(registry.names("restore"))
    solvers = [s for s in args.solvers if s in available]
    skipped = [s for s in args.solvers if s not in available]
    cfg = {"table": args.table, "steps": args.steps, "repeats": args.repeats, "images": args.images,
           "solvers": solvers, "solver_kw": {}}
    cores = os.cpu_count() or 1
    rows = []
    raw = {}
    t_all = time.perf_counter()
    for world in args.procs:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            _spawn(world, cfg, d, args.timeout)
            ranks = [json.loads((Path(d) / f"rank{r}.json").read_text()) for r in range(world)]
        agg = _aggregate(world, ranks, c_ms, cores)
        load = os.getloadavg()
        for r in agg:
            r["loadavg_1min_after"] = round(load[0], 2)
        rows += agg
        raw[str(world)] = ranks
        print(f"P={world}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        for r in _summary(agg):
            print(json.dumps(r), file=sys.stderr)
        with open(args.out + ".partial", "w") as f:        # what is done so far, in case a later P fails
            json.dump({"runs": rows}, f)
    result = {"command": "python bench/emulated_e2e.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "table": os.path.relpath(args.table, ROOT), "c_ms": {str(k): v for k, v in c_ms.items()},
              "model": "analytic oracle (3x16x16), CostEmulatingDenoiser", "task": "sr_avgpool x2",
              "images": args.images, "solvers_skipped": skipped, "machine": platform.machine(), "cores": cores,
              "torch": torch.__version__, "backend": "gloo", "seconds": round(time.perf_counter() - t_all, 1),
              "summary": _summary(rows), "runs": rows, "ranks": raw if args.raw else None}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, allow_nan=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

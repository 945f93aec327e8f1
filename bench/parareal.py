"""Parareal (solver="parareal") against the serial sampler: K, the oracle bound K40, PSNR from serial,
the pipelined critical path and the modelled speed-up, per image.

    python bench/parareal.py --model analytic --steps 25 50 100 --etw 0 0.8 -o bench/results/parareal-analytic-cpu.json
    python bench/parareal.py --model builtin --images 2 -o bench/results/parareal-builtin-cpu.json

For each (N, etw, task) the images are restored serially, then by parareal with ``stop="none"``
run until every image has reached 40 dB from serial and its stopping rule has fired (at most B
iterations); the per-iteration stopping quantities of both rules ("rows", "final") and the PSNR
from serial are recorded, so K under any tolerance and K40 (the first iteration >= 40 dB) come
from one run. The modelled latency is the pipelined schedule (one block per device, every call
batch 1: ``solvers.parareal.parareal_schedule``) priced with the c(b) table of ``--cost``
against serial N c(1); its ratio does not depend on c(1) (every call is c(1)), picard's would.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deqir_dist.api.planner import cost_at, load_profile
from deqir_dist.dataset.tasks import DEMO_TASKS
from deqir_dist.io.jsonio import write_json
from deqir_dist.models import GaussianMixtureDenoiser
from deqir_dist.models.builtin import builtin_bench_images
from deqir_dist.models.registry import load_denoiser
from deqir_dist.physics.registry import make_operator
from deqir_dist.sampling.denoiser import EpsFn
from deqir_dist.sampling.schedule import chain_coefficients
from deqir_dist.sampling.serial import sample_serial
from deqir_dist.solvers.parareal import (
    PararealOptions,
    block_bounds,
    parareal_schedule,
    solve_parareal,
)

DEFAULT_BLOCKS = {25: 5, 50: 7, 100: 10}
RULES = {"final": 40.0}           # the default rule; K at 35 / 45 dB is recorded beside it
TOLS = (35.0, 40.0, 45.0)


class _Enough(Exception):
    pass


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a - b).double().flatten(1).pow(2).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-30))


def first(seq, ok) -> int | None:
    return next((k for k, v in enumerate(seq) if ok(v)), None)


@torch.no_grad()
def run_case(model, op, x, coeffs, opts, c_ms, gen_seed: int):
    g = torch.Generator().manual_seed(gen_seed)
    n = x.shape[0]
    xi = torch.randn(x.shape, generator=g, dtype=torch.float64)
    y = op.A(x)
    eps = EpsFn(model, x.shape[1], torch.float64)
    t0 = time.perf_counter()
    serial = sample_serial(eps, op, coeffs, y, xi)
    t_serial = time.perf_counter() - t0
    finals, qf = {}, {}   # k -> U_B of every image; k -> its change in dB

    def cb(k, ids, fin, q):
        finals[k] = fin.detach().clone()
        if q is not None:
            qf[k] = q.tolist()
        reached = bool((psnr(fin, serial) >= 40).all())
        fired = all(any(qf[j][i] >= max(TOLS) for j in qf) for i in range(n))
        if k >= opts.blocks or (k >= 1 and reached and fired):
            raise _Enough
    t0 = time.perf_counter()
    try:
        solve_parareal(eps, op, coeffs, y, xi, opts, callback=cb)
    except _Enough:
        pass
    t_par = time.perf_counter() - t0
    ks = sorted(finals)
    bounds = block_bounds(coeffs.steps, opts.blocks, opts.layout)
    mcalls = [min(opts.coarse_steps, hi - lo) for lo, hi in bounds]
    serial_ms = coeffs.steps * cost_at(c_ms, 1)
    images = []
    for i in range(n):
        p_ser = [float(psnr(finals[k][i:i + 1], serial[i:i + 1])) for k in ks]
        q_final = [None] + [qf[k][i] for k in ks[1:]]
        k40 = first(p_ser, lambda v: v >= 40)
        rec = {"psnr_vs_serial": p_ser, "q_final": q_final, "K40": k40}
        for tol in TOLS:
            k = first(q_final, lambda v, t=tol: v is not None and v >= t)
            k = opts.blocks if k is None else k
            sched = parareal_schedule(bounds, mcalls, k)
            rec[f"final{tol:g}"] = {"K": k, "psnr": p_ser[min(k, len(p_ser) - 1)],
                                    "critical_path": sched["critical_path"], "calls": sched["calls"],
                                    "speedup": serial_ms / (sched["critical_path"] * cost_at(c_ms, 1))}
        rec["final"] = rec["final40"]
        if k40 is not None:
            rec["speedup_at_K40"] = serial_ms / (parareal_schedule(bounds, mcalls, k40)["critical_path"]
                                                 * cost_at(c_ms, 1))
        images.append(rec)
    return images, {"serial_s": t_serial, "parareal_s": t_par}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("analytic", "builtin"), default="analytic")
    p.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100])
    p.add_argument("--etw", type=float, nargs="+", default=[0.0, 0.8])
    p.add_argument("--tasks", nargs="+", default=list(DEMO_TASKS), choices=list(DEMO_TASKS))
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--blocks", type=int, nargs="*", default=None, help="B per N (default 25:5, 50:7, 100:10)")
    p.add_argument("--coarse-steps", type=int, default=1)
    p.add_argument("--coarse", default="normalized")  # the defaults: PararealOptions' (solvers.parareal)
    p.add_argument("--layout", type=float, default=1.0)
    p.add_argument("--data-std", type=float, default=0.5)
    p.add_argument("--secant", type=int, default=2)
    p.add_argument("--cost", default="bench/results/adm256-h200-design-cb.json")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("-o", "--output", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    c_ms = load_profile(a.cost)
    shape = (3, a.size, a.size)
    if a.model == "analytic":
        model = GaussianMixtureDenoiser(seed=0).double()
        x = model.sample(a.images, shape, torch.Generator().manual_seed(1)).double()
    else:
        model = load_denoiser("builtin")
        x = builtin_bench_images(a.images, a.size).double()
    blocks = dict(DEFAULT_BLOCKS)
    if a.blocks:
        blocks = dict(zip(a.steps, a.blocks, strict=True))
    cases, t_start = [], time.perf_counter()
    for steps in a.steps:
        for etw in a.etw:
            coeffs = chain_coefficients(steps, etw=etw)
            opts = PararealOptions.make(steps, blocks[steps], a.coarse_steps, stop="none", coarse=a.coarse,
                                        layout=a.layout, data_std=a.data_std, secant=a.secant)
            for task in a.tasks:
                name, params = DEMO_TASKS[task]
                op = make_operator(name, shape, **params)
                imgs, secs = run_case(model, op, x, coeffs, opts, c_ms, gen_seed=steps)
                row = {"steps": steps, "etw": etw, "task": task, "blocks": opts.blocks,
                       "coarse_steps": opts.coarse_steps, "coarse": opts.coarse, "layout": opts.layout,
                       "secant": opts.secant,
                       "images": imgs, **secs}
                for rule in ("final", "final35", "final45"):
                    row[rule] = {"K_max": max(r[rule]["K"] for r in imgs),
                                 "worst_psnr": min(r[rule]["psnr"] for r in imgs),
                                 "min_speedup": min(r[rule]["speedup"] for r in imgs)}
                k40 = [r["K40"] for r in imgs]
                row["K40_max"] = None if None in k40 else max(k40)
                cases.append(row)
                print(f"N={steps} etw={etw} {task}: K40 {k40} " + " ".join(
                    f"{rule} K {[r[rule]['K'] for r in imgs]} worst {row[rule]['worst_psnr']:.1f} dB "
                    f"x{row[rule]['min_speedup']:.2f}" for rule in RULES), flush=True)
    write_json(a.output, {"command": "python bench/parareal.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                          "model": a.model, "images": a.images, "image_shape": list(shape), "rules": RULES,
                          "cost_profile": a.cost, "c1_ms": cost_at(c_ms, 1), "threads": a.threads,
                          "seconds": time.perf_counter() - t_start, "cases": cases})


if __name__ == "__main__":
    main()

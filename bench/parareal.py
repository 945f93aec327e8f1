"""Parareal (solver="parareal") against the serial sampler: K, the oracle bound K40, PSNR from serial,
the pipelined critical path and the modelled speed-up, per image.

    python bench/parareal.py --model analytic --steps 25 50 100 --etw 0 0.8 -o bench/results/parareal-analytic-cpu.json
    python bench/parareal.py --model builtin --images 2 -o bench/results/parareal-builtin-cpu.json
    python bench/parareal.py --summarize bench/results/parareal-*-cpu.json     (the docs table)
    python bench/parareal.py --plot docs/parareal_speedup.png bench/results/parareal-{analytic,builtin}-cpu.json
    python bench/parareal.py --plan bench/results/parareal-plan-h200.json     (what solver="auto" picks)

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
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deqir_dist.api.planner import choose_solver, cost_at, load_profile, predict_ms
from deqir_dist.dataset.tasks import DEMO_TASKS
from deqir_dist.io.jsonio import write_json
from deqir_dist.models import GaussianMixtureDenoiser
from deqir_dist.models.builtin import builtin_bench_images, load_builtin
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
from deqir_dist.solvers.parareal_dist import STOP_LAG

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
def bench_problem(model_name: str, images: int, size: int, weights=None):
    """(model, x in float64): the analytic oracle's own samples, or the built-in prior's held-out crops
    (``weights``: a prior written by deqir train-prior instead of the shipped one)."""
    if model_name == "analytic":
        model = GaussianMixtureDenoiser(seed=0).double()
        return model, model.sample(images, (3, size, size), torch.Generator().manual_seed(1)).double()
    model = load_builtin(path=weights) if weights else load_denoiser("builtin")
    return model, builtin_bench_images(images, size, weights).double()


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


def _lagged_speedup(case) -> float:
    """The worst image's speed-up with the ranks' lagged stopping decision (parareal_dist.STOP_LAG)."""
    bounds = block_bounds(case["steps"], case["blocks"], case["layout"])
    mcalls = [min(case["coarse_steps"], hi - lo) for lo, hi in bounds]
    return min(case["steps"] / parareal_schedule(bounds, mcalls, r["final"]["K"], stop_lag=STOP_LAG)["critical_path"]
               for r in case["images"])


def summarize(paths) -> str:
    """The docs table (markdown) from result files: one row per (prior, N, etw), tasks in DEMO_TASKS order."""
    lines = [("| prior | N | B, m | etw | K40 per task | K per task | worst PSNR vs serial | critical path (calls) "
              "| modelled speed-up per task (worst image) | the same, as the ranks run it (stop_lag 2) |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        data = json.loads(Path(path).read_text())
        groups: dict = {}
        for c in data["cases"]:
            groups.setdefault((c["steps"], c["etw"]), []).append(c)
        for (n, etw), cases in sorted(groups.items()):
            order = sorted(cases, key=lambda c: list(DEMO_TASKS).index(c["task"]))
            k40 = "/".join("?" if c["K40_max"] is None else str(c["K40_max"]) for c in order)
            ks = "/".join(str(c["final"]["K_max"]) for c in order)
            worst = min(c["final"]["worst_psnr"] for c in order)
            crit = "/".join(f"{max(r['final']['critical_path'] for r in c['images']):g}" for c in order)
            sp = "/".join(f"{c['final']['min_speedup']:.2f}" for c in order)
            lag = "/".join(f"{_lagged_speedup(c):.2f}" for c in order)
            lines.append(f"| {data['model']} | {n} | {order[0]['blocks']}, {order[0]['coarse_steps']} | {etw:g} | "
                         f"{k40} | {ks} | {worst:.1f} dB | {crit} | {sp} | {lag} |")
    return "\n".join(lines)


def speedup_vs_ranks(path, steps: int, etw: float, ranks=range(1, 21)) -> dict:
    """Modelled speed-up over serial per rank count P (blocks spread over P ranks), at the largest K
    over the file's tasks and images for (steps, etw): parareal's, and picard's (the planner's model
    with the benchmarked picard K) with the same c(b) table."""
    data = json.loads(Path(path).read_text())
    cases = [c for c in data["cases"] if c["steps"] == steps and c["etw"] == etw]
    c_ms = load_profile(data["cost_profile"])
    b, m = cases[0]["blocks"], cases[0]["coarse_steps"]
    k = max(c["final"]["K_max"] for c in cases)
    bounds = block_bounds(steps, b, cases[0]["layout"])
    out = {"parareal": [], "picard": [], "K": k, "blocks": b}
    for p in ranks:
        crit = parareal_schedule(bounds, [min(m, hi - lo) for lo, hi in bounds], k, p)["critical_path"]
        out["parareal"].append((p, steps / crit))
        if etw == 0:            # picard's K is benchmarked at etw = 0 only
            out["picard"].append((p, predict_ms(c_ms, steps, p, etw=etw)["speedup"]))
    return out


def plot(png, paths, steps: int = 100) -> None:
    """docs figure: modelled speed-up vs ranks P at N = ``steps``, etw 0 and 0.8, each result file."""
    from PIL import Image, ImageDraw

    from deqir_dist.apps.figures import _COLOURS, _font, _panel
    from deqir_dist.io.files import atomic_write
    img = Image.new("RGB", (900, 420), "white")
    d = ImageDraw.Draw(img)
    font = _font(11)
    d.text((10, 4), f"modelled speed-up over serial vs ranks P, N = {steps} (ADM-256 H200 c(b); worst image "
           "and task)", fill="black", font=_font(13))
    series = []
    for path in paths:
        model = json.loads(Path(path).read_text())["model"]
        for etw in (0.0, 0.8):
            r = speedup_vs_ranks(path, steps, etw)
            series.append((f"parareal {model} etw={etw:g} (B={r['blocks']}, K={r['K']})", r["parareal"]))
            if model == "builtin" and r["picard"]:
                series.append((f"picard {model} etw={etw:g}", r["picard"]))
    _panel(d, (0, 24, 560, 410), series, "speed-up (x)", "", hline=1.0, font=font)
    d.rectangle((230, 395, 420, 410), fill="white")
    d.text((250, 397), "ranks P", fill="black", font=font)
    for c, (label, _) in enumerate(series):
        y = 60 + 18 * c
        d.line((570, y + 6, 590, y + 6), fill=_COLOURS[c % len(_COLOURS)], width=3)
        d.text((596, y), label, fill="black", font=font)
    atomic_write(Path(png), lambda fh: img.save(fh, format="PNG"))


def plan_table(out, cost) -> None:
    """What solver="auto" picks (``api.planner.choose_solver``, K from the committed benchmarks) for
    N = 25, 50, 100, P = 1, 5, 10, 20 and etw = 0, 0.8 with the c(b) table ``cost``."""
    c_ms = load_profile(cost)
    rows = []
    for etw in (0.0, 0.8):
        for n in (25, 50, 100):
            for p in (1, 5, 10, 20):
                choice, best = choose_solver(c_ms, n, p, etw=etw)
                rows.append({"etw": etw, "steps": n, "procs": p, "chosen": choice, **best})
                print(f"etw={etw:g} N={n} P={p}: {choice} (best parallel: {best['solver']} K={best['K']} "
                      f"B={best.get('blocks')} x{best['speedup']:.2f})")
    lag = {}
    for n, b in ((25, 8), (50, 12), (100, 20)):
        bounds = block_bounds(n, b)
        for k in (2, 4, 6):
            lag[f"N={n} B={b} K={k}"] = {f"stop_lag {s}": parareal_schedule(bounds, [1] * b, k, stop_lag=s)
                                         ["critical_path"] for s in (0, 1, 2, 3)}
    write_json(out, {"command": f"python bench/parareal.py --plan {out} {cost}", "cost_profile": cost, "rows": rows,
                     "stop_lag": lag})


def main(argv=None):
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--plan":
        plan_table(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "bench/results/adm256-h200-design-cb.json")
        return
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--summarize":
        print(summarize(sys.argv[2:]))
        return
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--plot":
        plot(sys.argv[2], sys.argv[3:])
        return
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
    p.add_argument("--weights", help="with --model builtin: a prior written by deqir train-prior (default: the shipped one)")
    p.add_argument("-o", "--output", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    c_ms = load_profile(a.cost)
    shape = (3, a.size, a.size)
    model, x = bench_problem(a.model, a.images, a.size, a.weights)
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
                          "model": a.model, "weights": a.weights, "images": a.images, "image_shape": list(shape), "rules": RULES,
                          "cost_profile": a.cost, "c1_ms": cost_at(c_ms, 1), "threads": a.threads,
                          "seconds": time.perf_counter() - t_start, "cases": cases})


if __name__ == "__main__":
    main()

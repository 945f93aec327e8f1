"""Which coarse propagator G: K40 (first iteration >= 40 dB from serial) and the K of the default
stopping rule for each variant, on the same images (bench/parareal.py's run_case).

    python bench/parareal_coarse.py --model builtin --steps 25 --images 1 -o bench/results/parareal-coarse-builtin-cpu.json
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from parareal import bench_problem, run_case

from deqir_dist.api.planner import load_profile
from deqir_dist.dataset.tasks import DEMO_TASKS
from deqir_dist.io.jsonio import write_json
from deqir_dist.physics.registry import make_operator
from deqir_dist.sampling.schedule import chain_coefficients
from deqir_dist.solvers.parareal import PararealOptions

# (name, coarse, m, layout, data_std[, secant])
VARIANTS = [("ddim m1 secant2", "ddim", 1, 1.0, 0.5, 2), ("normalized m1 secant2", "normalized", 1, 1.0, 0.5, 2),
            ("normalized m2 secant2", "normalized", 2, 1.0, 0.5, 2),
            ("normalized m1 secant2 layout0.7", "normalized", 1, 0.7, 0.5, 2),
            ("normalized m1 secant4", "normalized", 1, 1.0, 0.5, 4), ("ddim m1", "ddim", 1, 1.0, 0.5), ("unrolled m1", "unrolled", 1, 1.0, 0.5),
            ("normalized m1", "normalized", 1, 1.0, 0.5), ("normalized c=1 m1", "normalized", 1, 1.0, 1.0),
            ("normalized m1 layout1.5", "normalized", 1, 1.5, 0.5), ("ddim m2", "ddim", 2, 1.0, 0.5),
            ("normalized m2", "normalized", 2, 1.0, 0.5), ("ab2 m2", "ab2", 2, 1.0, 0.5)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("analytic", "builtin"), default="builtin")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--etw", type=float, nargs="+", default=[0.0, 0.8])
    p.add_argument("--tasks", nargs="+", default=["sr_bicubic_x4", "inpaint_random", "deblur_gauss"])
    p.add_argument("--images", type=int, default=1)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--cost", default="bench/results/adm256-h200-design-cb.json")
    p.add_argument("--only", nargs="*", help="run only these variants (labels)")
    p.add_argument("-o", "--output", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    c_ms = load_profile(a.cost)
    shape = (3, a.size, a.size)
    model, x = bench_problem(a.model, a.images, a.size)
    rows, t0 = [], time.perf_counter()
    for etw in a.etw:
        coeffs = chain_coefficients(a.steps, etw=etw)
        for task in a.tasks:
            name, params = DEMO_TASKS[task]
            op = make_operator(name, shape, **params)
            for label, coarse, m, layout, c, *sec in VARIANTS:
                if a.only and label not in a.only:
                    continue
                opts = PararealOptions.make(a.steps, a.blocks, m, stop="none", coarse=coarse, layout=layout,
                                            data_std=c, secant=sec[0] if sec else 0)
                imgs, _ = run_case(model, op, x, coeffs, opts, c_ms, gen_seed=a.steps)
                row = {"etw": etw, "task": task, "variant": label, "K40": [r["K40"] for r in imgs],
                       "K": [r["final"]["K"] for r in imgs], "worst_psnr": min(r["final"]["psnr"] for r in imgs),
                       "min_speedup": min(r["final"]["speedup"] for r in imgs),
                       "psnr_vs_serial": [r["psnr_vs_serial"] for r in imgs]}
                rows.append(row)
                print(f"etw={etw} {task:15s} {label:24s} K40 {row['K40']} K {row['K']} "
                      f"x{row['min_speedup']:.2f} psnr/k {[round(v, 1) for v in imgs[0]['psnr_vs_serial']]}",
                      flush=True)
    write_json(a.output, {"command": "python bench/parareal_coarse.py " + " ".join(argv or sys.argv[1:]),
                          "model": a.model, "steps": a.steps, "blocks": a.blocks, "images": a.images,
                          "image_shape": list(shape), "seconds": time.perf_counter() - t0, "rows": rows})


if __name__ == "__main__":
    main()

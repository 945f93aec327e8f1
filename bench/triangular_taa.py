"""ParaTAA (solvers/triangular.py) against picard on the built-in prior: K per image and distance to serial.

    python bench/triangular_taa.py --out bench/results/parataa-builtin-cpu.json

For N in --steps and each task (sr_bicubic x4, inpaint box), a batch of --images held-out crops
(--size px): the serial reference, picard (its default: the frozen prefix, window N), picard
plain (window 0: every row every sweep, the sweep ParaTAA accelerates) and ParaTAA with history m
in --histories (2 is ParaTAA's). All with the default 'rows' rule (tol 0.03) and warm start 1.
Per image: K (joint-map evaluations), denoiser rows evaluated, PSNR vs serial, and K40: the first
evaluation whose final row is within 40 dB of serial (an oracle bound, seen through the callback;
null if the rule stopped before).
"""
import argparse
import json
import platform
import sys
import time

import torch

from deqir_dist import make_operator, restore
from deqir_dist.models import load_denoiser
from deqir_dist.models.builtin import builtin_bench_images
from deqir_dist.quality.metrics import psnr

TASKS = {"sr_bicubic_x4": ("sr_bicubic", {"scale": 4}), "inpaint_box": ("inpaint", {"mask": "box"})}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--histories", type=int, nargs="+", default=[2])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_denoiser("builtin")
    shape = (3, args.size, args.size)
    gt = builtin_bench_images(args.images, args.size)
    rows = []
    t_all = time.perf_counter()
    for label in args.tasks:
        task, params = TASKS[label]
        op = make_operator(task, shape, **params)
        y = op.A(gt)
        xi = torch.randn((args.images, *shape), generator=torch.Generator().manual_seed(0))
        for n in args.steps:
            ref = restore(model, y, op, steps=n, solver="serial", noise=xi)
            variants = [("picard", {}), ("picard plain", {"window": 0})] + \
                [(f"parataa m={m}", {"m": m}) for m in args.histories]
            for name, kw in variants:
                solver = name.split()[0]
                k40 = [None] * args.images

                def seen(k, ids, rows, q, ref=ref, k40=k40):
                    d = psnr(rows.cpu(), ref.image[ids].cpu())
                    for j, i in enumerate(ids):
                        if k40[i] is None and float(d[j]) >= 40:
                            k40[i] = k + 1
                t0 = time.perf_counter()
                res = restore(model, y, op, steps=n, solver=solver, noise=xi, callback=seen, **kw)
                secs = time.perf_counter() - t0
                vs = psnr(res.image.cpu(), ref.image.cpu())
                rows.append({"task": label, "steps": n, "solver": name, "K": res.iterations_per_image,
                             "K_max": max(res.iterations_per_image), "K40": k40,
                             "rows_per_image": round(sum(t.rows for t in res.timings) / args.images, 1),
                             "psnr_vs_serial": [round(float(v), 2) for v in vs],
                             "worst_psnr_vs_serial": round(float(vs.min()), 2), "seconds": round(secs, 2)})
                print(json.dumps(rows[-1]), flush=True)
    result = {"command": "python bench/triangular_taa.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": "builtin", "image_shape": list(shape), "images": args.images, "stop": "rows",
              "stop_tol": 0.03, "warm_start": 1, "torch": torch.__version__, "machine": platform.machine(),
              "threads": args.threads, "seconds": round(time.perf_counter() - t_all, 1), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

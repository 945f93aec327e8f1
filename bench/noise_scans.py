"""The two noise constants behind sigma_y defaults, scanned (issue 16): NOISE_KEEP and JPEG_SIGMA.

* ``SeparableOperator.NOISE_KEEP`` (physics/base.py): a direction of gain s is left to the prior
  when s <= NOISE_KEEP * sigma_y. Scanned on 8-bit measurements (sigma_y from the bit depth).
* ``io.quantization.JPEG_SIGMA``: the sigma_y a JPEG file gets. Scanned on RGB JPEGs written by
  Pillow at quality 95 and 75.

Both on the held-out *tuning* crops (``builtin_bench_images(4, 64)``: the first four, which
``bench/defaults_quality.py`` leaves out of its evaluation), the built-in prior at the model
card's settings, serial sampler, with the best classical baseline of each task beside it.
Tasks with a separable SVD operator where the constant matters: deblur_gauss and sr_bicubic x4.

    python bench/noise_scans.py --json bench/results/noise-scans-builtin-cpu.json
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from defaults_quality import jpeg, quantize8
from deqir_dist.api.restore import restore
from deqir_dist.dataset.tasks import DEMO_TASKS
from deqir_dist.io.jsonio import write_json
from deqir_dist.io.quantization import JPEG_SIGMA, quantization_sigma
from deqir_dist.models.builtin import builtin_bench_images, load_builtin
from deqir_dist.physics.base import SeparableOperator
from deqir_dist.physics.registry import make_operator
from deqir_dist.quality.baselines import baselines_for
from deqir_dist.quality.metrics import psnr

KEEPS = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
SIGMAS = (0.00226, 0.005, 0.01, 0.02, 0.04)


def _score(model, x, op, y, sigma_y, seed) -> float:
    res = restore(model, y, op, solver="serial", sigma_y=sigma_y, generator=torch.Generator().manual_seed(seed))
    return round(float(psnr(res.images, x).mean()), 3)


def _best_baseline(op, y, x) -> tuple[str, float]:
    scores = {n: float(psnr(e.clamp(-1, 1), x).mean()) for n, e in baselines_for(op, y).items()}
    best = max(scores, key=scores.get)
    return best, round(scores[best], 3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="deblur_gauss,sr_bicubic_x4")
    p.add_argument("--qualities", default="95,75", help="JPEG qualities")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_builtin()
    x = builtin_bench_images(4, 64)
    out = {"command": "python bench/noise_scans.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "model": "builtin", "images": "builtin_bench_images(4, 64): the tuning crops (not evaluated elsewhere)",
           "sampler": "restore() at the model card's settings, solver serial", "shipped": {
               "NOISE_KEEP": SeparableOperator.NOISE_KEEP, "JPEG_SIGMA": JPEG_SIGMA},
           "noise_keep": {}, "jpeg_sigma": {}}
    shipped_keep = SeparableOperator.NOISE_KEEP
    for task in args.tasks.split(","):
        name, params = DEMO_TASKS[task]
        op = make_operator(name, tuple(x.shape[1:]), **params)
        y8 = quantize8(op.A(x))
        base, base_psnr = _best_baseline(op, y8, x)
        row = {"baseline": base, "baseline_psnr": base_psnr, "prior_psnr": {}}
        try:
            for keep in KEEPS:
                SeparableOperator.NOISE_KEEP = keep
                row["prior_psnr"][str(keep)] = _score(model, x, op, y8, quantization_sigma(8), args.seed)
                print(f"NOISE_KEEP {task:14s} {keep:5.0f}: {row['prior_psnr'][str(keep)]:6.2f} dB "
                      f"(best baseline {base} {base_psnr:.2f})", flush=True)
        finally:
            SeparableOperator.NOISE_KEEP = shipped_keep
        out["noise_keep"][task] = row
        for q in (int(v) for v in args.qualities.split(",")):
            yj = jpeg(op.A(x), q)
            base, base_psnr = _best_baseline(op, yj, x)
            row = {"baseline": base, "baseline_psnr": base_psnr, "prior_psnr": {}}
            for s in SIGMAS:
                row["prior_psnr"][str(s)] = _score(model, x, op, yj, s, args.seed)
                print(f"JPEG q{q} {task:14s} sigma {s:.5f}: {row['prior_psnr'][str(s)]:6.2f} dB "
                      f"(best baseline {base} {base_psnr:.2f})", flush=True)
            out["jpeg_sigma"][f"{task}/q{q}"] = row
    out["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Other estimators than one posterior draw at the card's settings, on whole held-out photographs.

Issue 22 asks, for the tasks where the built-in prior loses to a classical baseline (box
inpainting) or barely wins (colourisation), whether a different estimator built from the same
prior would win. Each variant is a restore() at the card's settings plus one change:

* ``draws=K``: the mean of K posterior draws (xi from the image's generator, K of them): an
  estimate of the posterior mean, which for an uncertain answer has lower squared error than one
  draw (half, for a Gaussian posterior).
* ``from_baseline=S``: the chain starts at S < 1000 (N steps on the shorter grid) from the
  task's classical estimate forward-diffused to tau_1, h_0 = sqrt(a_1) x_b + sqrt(1 - a_1) xi
  (Chung et al. 2022, "come closer, diffuse faster"). The math contract holds for any xi, so this
  is restore() with ``noise`` and ``start`` given.
* any restore() keyword as JSON (``clip_x0``, ``etw``, ``steps``...).

The measurement is 8-bit (sigma_y from the bit depth), whole photographs at a short side of
``--whole`` px cropped to the model's size multiple (a few px), serial sampler; every classical baseline of ``quality.baselines`` is beside them.

    python bench/estimators.py --heldout-dir /work/prior-data/heldout --tasks inpaint_box,colorize \\
        --variant 'card={}' --variant 'draws4={"draws": 4}' --variant 'clip={"clip_x0": true}' \\
        --variant 'from_baseline400={"from_baseline": 400}' --json bench/results/estimators-round1-cpu.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time

import torch

from defaults_quality import quantize8      # bench/: y as an 8-bit PNG stores it
from deqir_dist.api.restore import restore
from deqir_dist.data.photos import resize_short, stored_photo_folder, to_tensor
from deqir_dist.dataset.tasks import DEMO_TASKS, measurable
from deqir_dist.io.jsonio import write_json
from deqir_dist.io.quantization import default_sigma_y
from deqir_dist.models.builtin import heldout_images, load_builtin
from deqir_dist.models.settings import resolve_settings
from deqir_dist.physics.registry import make_operator
from deqir_dist.quality.baselines import baselines_for
from deqir_dist.quality.metrics import psnr
from deqir_dist.sampling.schedule import chain_coefficients

# The classical estimate a chain started from_baseline starts from: the baseline that is best on
# average per task in bench/results/defaults-quality-11photos-round1-cpu.json (chosen without
# looking at the image being restored).
START_FROM = {"sr_bicubic_x4": "bicubic+bp", "deblur_gauss": "tikhonov(0.001)", "inpaint_box": "harmonic",
              "inpaint_random": "harmonic", "colorize": "pinv"}


def run_variant(model, y, op, task: str, sigma_y: float, seed: int, spec: dict, baselines: dict) -> torch.Tensor:
    kw = dict(spec)
    draws = int(kw.pop("draws", 1))
    s_start = kw.pop("from_baseline", None)
    gen = torch.Generator().manual_seed(seed)
    if s_start is not None:
        settings, _ = resolve_settings(model, op.name, {"steps": kw.get("steps"), "etw": kw.get("etw")})
        n = min(int(settings["steps"]), int(s_start))
        a1 = float(chain_coefficients(n, int(s_start), float(settings["etw"])).a[0])
        xi = torch.randn((draws, *op.image_shape), generator=gen)
        kw.update(noise=math.sqrt(a1) * baselines[START_FROM[task]] + math.sqrt(1 - a1) * xi, start=int(s_start),
                  steps=n)
    else:
        kw["generator"] = gen
    res = restore(model, y.repeat(draws, *[1] * (y.dim() - 1)), op, solver="serial", sigma_y=sigma_y, value_range=(-1, 1),
                  **kw)
    return res.images.mean(0, keepdim=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default="inpaint_box,colorize")
    p.add_argument("--variant", action="append", required=True,
                   help="NAME=JSON: restore() keywords plus draws / from_baseline (repeatable)")
    p.add_argument("--whole", type=int, default=64, help="short side of the whole photos (default 64)")
    p.add_argument("--heldout-dir", help="held-out PNG photographs (default: those stored with the prior)")
    p.add_argument("--weights", help="a prior written by deqir train-prior (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = {}
    for v in args.variant:
        name, _, spec = v.partition("=")
        variants[name] = json.loads(spec or "{}")
    model = load_builtin(path=args.weights)
    held = stored_photo_folder(args.heldout_dir) if args.heldout_dir else heldout_images(args.weights)
    photos = {name: to_tensor(resize_short(img, args.whole)) for name, img in held.items()}
    wpath = getattr(model, "weights_path", None)
    out = {"command": "python bench/estimators.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "weights": wpath, "weights_sha256": hashlib.sha256(open(wpath, "rb").read()).hexdigest() if wpath else None,
           "variants": variants, "start_from": START_FROM, "measurement": "8bit", "whole": args.whole,
           "torch_threads": args.threads, "results": {}}
    t0 = time.perf_counter()
    for task in args.tasks.split(","):
        op_name, params = DEMO_TASKS[task]
        rows = []
        for k, (name, x) in enumerate(photos.items()):
            m = getattr(model, "size_multiple", 1)       # so a chain can start from an estimate of the image's size
            x = measurable(x, task)
            x = x[:, :x.shape[1] // m * m, :x.shape[2] // m * m]
            op = make_operator(op_name, tuple(x.shape), **params)
            y = quantize8(op.A(x[None]))
            sigma_y = default_sigma_y(y)[0]
            base = {n: e.clamp(-1, 1) for n, e in baselines_for(op, y).items()}
            row = {"image": name, "baselines": {n: round(float(psnr(e, x[None])[0]), 3) for n, e in base.items()}}
            for vname, spec in variants.items():
                est = run_variant(model, y, op, task, sigma_y, args.seed + k, spec, base)
                row[vname] = round(float(psnr(est, x[None])[0]), 3)
            rows.append(row)
            print(task, name[:30], {n: row[n] for n in variants}, "best baseline",
                  max(row["baselines"].values()), flush=True)
        mean = {n: round(sum(r[n] for r in rows) / len(rows), 3) for n in variants}
        best = max(rows[0]["baselines"], key=lambda b: sum(r["baselines"][b] for r in rows))
        mean_best = round(sum(r["baselines"][best] for r in rows) / len(rows), 3)
        out["results"][task] = {"mean_psnr": mean, "best_baseline": best, "best_baseline_psnr": mean_best,
                                "minus_best_db": {n: round(v - mean_best, 3) for n, v in mean.items()}, "rows": rows}
        print(task, "MEAN", mean, best, mean_best, flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

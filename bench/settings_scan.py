"""Sampler settings per task for the built-in prior, scanned on tuning crops (issue 16, part 1).

The model card recommends one etw and one N for every task. This scan asks whether a task would
rather have its own: for each task, N x etw (x0 clipping as the card says for that task), serial
sampler, on the held-out *tuning* crops (the first four of ``heldout_crops``, which
``bench/defaults_quality.py`` leaves out of its evaluation), with the best classical baseline of
the task beside it. Mean PSNR / SSIM.

    python bench/prior_data.py -o /tmp/prior-photos --exclude abstract,desktop,plasma,ukui,lomiri
    python bench/settings_scan.py --heldout-dir /tmp/prior-photos/heldout --json bench/results/settings-scan-builtin-cpu.json
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from deqir_dist.api.restore import restore
from deqir_dist.data.photos import heldout_crops, stored_photo_folder
from deqir_dist.dataset.tasks import DEMO_TASKS
from deqir_dist.io.jsonio import write_json
from deqir_dist.io.quantization import default_sigma_y
from deqir_dist.models.builtin import builtin_bench_images, load_builtin
from deqir_dist.models.settings import resolve_settings
from deqir_dist.physics.registry import make_operator
from deqir_dist.quality.baselines import baselines_for
from deqir_dist.quality.metrics import psnr, ssim


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", default=",".join(DEMO_TASKS))
    p.add_argument("--steps", default="25,50")
    p.add_argument("--etw", default="0.5,0.7,0.8,0.9")
    p.add_argument("--heldout-dir", help="PNG photographs to crop (default: those stored with the prior)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--measurement", default="8bit", choices=("8bit", "float"),
                   help="y rounded to 8 bits as a PNG stores it, sigma_y from the bit depth (default), or float")
    p.add_argument("--weights", help="a prior written by deqir train-prior (default: the shipped one)")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_builtin(path=args.weights)
    if args.heldout_dir:
        held = stored_photo_folder(args.heldout_dir)
        x = heldout_crops(held, 64, 4)
    else:
        held, x = None, builtin_bench_images(4, 64, args.weights)
    out = {"command": "python bench/settings_scan.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "model": "builtin", "photographs": list(held) if held else "stored with the prior",
           "crops": "the first 4 held-out crops (tuning; not in defaults_quality's evaluation)",
           "measurement": args.measurement, "weights": args.weights, "tasks": {}}
    for task in args.tasks.split(","):
        name, params = DEMO_TASKS[task]
        op = make_operator(name, tuple(x.shape[1:]), **params)
        y = op.A(x)
        sigma_y = 0.0
        if args.measurement == "8bit":
            y = (((y + 1) / 2).clamp(0, 1) * 255).round() / 255 * 2 - 1
            sigma_y = default_sigma_y(y)[0]
        base = {n: e.clamp(-1, 1) for n, e in baselines_for(op, y).items()}
        best = max(base, key=lambda n: float(psnr(base[n], x).mean()))
        clip = resolve_settings(model, name)[0]["clip_x0"]
        row = {"baseline": best, "baseline_psnr": round(float(psnr(base[best], x).mean()), 3),
               "baseline_ssim": round(float(ssim(base[best], x).mean()), 4), "clip_x0": clip, "prior": {}}
        for n in (int(v) for v in args.steps.split(",")):
            for etw in (float(v) for v in args.etw.split(",")):
                res = restore(model, y, op, steps=n, etw=etw, nw=0.0, clip_x0=clip, solver="serial", sigma_y=sigma_y,
                              value_range=(-1, 1), generator=torch.Generator().manual_seed(args.seed))
                pv, sv = float(psnr(res.images, x).mean()), float(ssim(res.images, x).mean())
                row["prior"][f"N={n} etw={etw:g}"] = {"psnr": round(pv, 3), "ssim": round(sv, 4)}
                print(f"{task:15s} N={n:3d} etw={etw:4.2f}: {pv:6.2f} dB {sv:.3f}   best baseline {best} "
                      f"{row['baseline_psnr']:.2f}", flush=True)
        out["tasks"][task] = row
    out["seconds"] = round(time.perf_counter() - t0, 1)
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

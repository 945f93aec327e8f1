"""Sweep solver settings: K (mean / max over images) and the worst PSNR against serial, per N.

    python bench/stopping_sweep.py "{'solver': 'anderson'}" "{'solver': 'anderson', 'stop': 'rows'}"
    python bench/stopping_sweep.py --model builtin --steps 25 100 "{'solver': 'anderson'}"

analytic: sr_avgpool x2, inpaint (box), colorize; 3 images of 3x16x16 from the Gaussian-mixture
prior; without and with injected noise (nw = 0.3). builtin: sr_bicubic x4, inpaint (box),
deblur_gauss on 3 held-out 3x32x32 crops (``demo.builtin_bench_images``), nw = 0. Each
positional argument is a Python dict literal of keyword arguments for ``deqir_dist.restore``.

``--bound`` instead runs plain Picard for N sweeps per case and reports K40, the first
evaluation after which the final row stays >= 40 dB from serial: no stopping rule can stop
Picard earlier at that accuracy (it would need to know the serial result).
"""
import argparse
import ast
import json
import shlex
import sys

import torch

from deqir_dist import load_denoiser, make_operator, restore
from deqir_dist.quality.metrics import psnr

TASKS = {
    "analytic": [("sr_avgpool", {"scale": 2}), ("inpaint", {"mask": "box"}), ("colorize", {})],
    "builtin": [("sr_bicubic", {"scale": 4}), ("inpaint", {"mask": "box"}), ("deblur_gauss", {})],
}


def cases(model_name: str, model, steps_list):
    """(nw, steps, task, op, y, xi, z, serial result) for every case of the sweep."""
    size = 16 if model_name == "analytic" else 32
    shape = (3, size, size)
    if model_name == "builtin":
        from deqir_dist.models.builtin import builtin_bench_images
        clean = builtin_bench_images(3, size)
    out = []
    for name, params in TASKS[model_name]:
        for nw in ((0.0, 0.3) if model_name == "analytic" else (0.0,)):
            g = torch.Generator().manual_seed(1)
            op = make_operator(name, shape, **params)
            x = model.sample(3, shape, g) if model_name == "analytic" else clean
            y, xi = op.A(x), torch.randn(3, *shape, generator=g)
            for steps in steps_list:
                z = torch.randn(3, steps, *shape, generator=g) if nw else None
                ref = restore(model, y, op, steps=steps, solver="serial", noise=xi, nw=nw, step_noise=z).image
                out.append((nw, steps, name, op, y, xi, z, ref))
    return out


def sweep(model_name: str, steps_list, configs) -> list[dict]:
    model = load_denoiser(model_name)
    data = cases(model_name, model, steps_list)
    rows = []
    for cfg in configs:
        for nw in sorted({c[0] for c in data}):
            for steps in steps_list:
                ks, worst, rows_eval = [], float("inf"), []
                for c_nw, c_steps, _, op, y, xi, z, ref in data:
                    if (c_nw, c_steps) != (nw, steps):
                        continue
                    r = restore(model, y, op, steps=steps, noise=xi, nw=nw, step_noise=z, **cfg)
                    ks += r.iterations_per_image
                    rows_eval.append(sum(t.rows for t in r.timings) / len(r.iterations_per_image))
                    worst = min(worst, float(psnr(r.image, ref).min()))
                rows.append({"config": cfg, "nw": nw, "steps": steps, "K_mean": round(sum(ks) / len(ks), 2),
                             "K_max": max(ks), "rows_mean": round(sum(rows_eval) / len(rows_eval), 1),
                             "worst_psnr_vs_serial": round(worst, 2)})
                print(f"{cfg} nw={nw} N={steps}: K mean {sum(ks) / len(ks):.1f} max {max(ks)}, "
                      f"denoiser rows per image {rows[-1]['rows_mean']}, worst {worst:.1f} dB vs serial", flush=True)
    return rows


def bound(model_name: str, steps_list, cfg: dict) -> list[dict]:
    """K40 of every case (see the module docstring) beside K of ``cfg`` (the default rule)."""
    model = load_denoiser(model_name)
    rows = []
    for nw, steps, name, op, y, xi, z, ref in cases(model_name, model, steps_list):
        seen = []

        def callback(k, ids, final_rows, q, seen=seen):
            seen.append(psnr(final_rows.float(), ref[ids].float()).tolist())
        restore(model, y, op, steps=steps, noise=xi, nw=nw, step_noise=z, stop="none", window=0, callback=callback)
        k40 = []
        for i in range(ref.shape[0]):
            below = [k for k, v in enumerate(seen) if v[i] < 40]
            k40.append(below[-1] + 2 if below else 1)
        r = restore(model, y, op, steps=steps, noise=xi, nw=nw, step_noise=z, **cfg)
        rows.append({"task": name, "nw": nw, "steps": steps, "K40": k40, "K_rule": r.iterations_per_image,
                     "rule": cfg or "default", "rule_psnr_vs_serial": [round(v, 2) for v in psnr(r.image, ref).tolist()]})
        print(f"{name} nw={nw} N={steps}: K40 {k40}  {cfg or 'default'} K {r.iterations_per_image}", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="*", help="restore() keyword dicts (default {'solver': 'anderson'}; "
                    "--bound: the rule to compare, default the library's)")
    ap.add_argument("--model", default="analytic", choices=sorted(TASKS))
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 100])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bound", action="store_true", help="K40 per case: the least K any stopping rule could reach")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    configs = [ast.literal_eval(c) for c in args.configs]
    if args.bound:
        rows = bound(args.model, args.steps, configs[0] if configs else {})
    else:
        rows = sweep(args.model, args.steps, configs or [{"solver": "anderson"}])
    if args.json:
        command = "python bench/stopping_sweep.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        with open(args.json, "w") as f:
            json.dump({"command": command, "model": args.model, "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

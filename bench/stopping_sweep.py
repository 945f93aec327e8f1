"""Sweep solver settings on the analytic oracle: mean K and the worst PSNR against serial.

    python bench/stopping_sweep.py "{'solver': 'anderson'}" "{'solver': 'anderson', 'stop_tol': 40}"

Cases: sr_avgpool x2, inpaint (box), colorize; 3 images of 3x16x16 from the Gaussian-mixture
prior; N = 25 and 100; without and with injected noise (nw = 0.3). Each argument is a Python
dict literal of keyword arguments for ``deqir_dist.restore``.
"""
import ast
import sys

import torch

from deqir_dist import make_operator, restore
from deqir_dist.metrics import psnr
from deqir_dist.models import GaussianMixtureDenoiser


def cases(model):
    out = []
    for name, params in [("sr_avgpool", {"scale": 2}), ("inpaint", {"mask": "box"}), ("colorize", {})]:
        for nw in (0.0, 0.3):
            g = torch.Generator().manual_seed(1)
            op = make_operator(name, (3, 16, 16), **params)
            x = model.sample(3, (3, 16, 16), g)
            y, xi = op.A(x), torch.randn(3, 3, 16, 16, generator=g)
            for steps in (25, 100):
                z = torch.randn(3, steps, 3, 16, 16, generator=g) if nw else None
                ref = restore(model, y, op, steps=steps, solver="serial", noise=xi, nw=nw, step_noise=z).image
                out.append((nw, steps, op, y, xi, z, ref))
    return out


def main(argv):
    torch.set_num_threads(1)
    model = GaussianMixtureDenoiser()
    data = cases(model)
    for text in argv or ["{'solver': 'anderson'}"]:
        cfg = ast.literal_eval(text)
        ks, worst = {0.0: [], 0.3: []}, {0.0: float("inf"), 0.3: float("inf")}
        k_by_steps = {}
        for nw, steps, op, y, xi, z, ref in data:
            r = restore(model, y, op, steps=steps, noise=xi, nw=nw, step_noise=z, **cfg)
            ks[nw] += r.iterations_per_image
            worst[nw] = min(worst[nw], float(psnr(r.image, ref).min()))
            if nw == 0:
                k_by_steps.setdefault(steps, []).extend(r.iterations_per_image)
        per = ", ".join(f"N={n}: K mean {sum(v) / len(v):.1f} max {max(v)}" for n, v in k_by_steps.items())
        print(f"{cfg}\n  nw=0:   K mean {sum(ks[0.0]) / len(ks[0.0]):.1f}, worst {worst[0.0]:.1f} dB vs serial ({per})"
              f"\n  nw=0.3: K mean {sum(ks[0.3]) / len(ks[0.3]):.1f}, worst {worst[0.3]:.1f} dB vs serial")


if __name__ == "__main__":
    main(sys.argv[1:])

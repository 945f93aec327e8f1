"""DEQ inversion on the analytic oracle or the built-in prior: gradient accuracy, then what noise
optimisation does.

    python bench/inversion.py                       # default run, about 1-2 minutes on 2 CPU cores
    python bench/inversion.py --json bench/results/inversion-cpu.json
    python bench/inversion.py --model builtin --images 4 --json bench/results/inversion-builtin-cpu.json

(a) Gradient of a loss on the restored image w.r.t. the initial noise xi, against autograd
    through the serial sampler in float64 (the exact reference): cosine similarity, relative
    error, forward/adjoint evaluations, seconds, and the peak bytes held by autograd graphs
    (saved tensors, tracked with saved_tensors_hooks: what grows with the number of steps).
    The loss is the official default, the squared error to the ground truth.
(b) Adam on xi (``optimize_noise``) with noisy measurements (sigma_y > 0, the only setting where
    the blind consistency loss ||A x0 - y||^2 depends on xi): PSNR against the ground truth
    before (plain restoration with the same xi) and after (best iterate). The ORACLE loss (MSE to
    the ground truth) is reported separately as an upper bound; it is not a restoration method.

``--model builtin``: the shipped prior on held-out crops (``deqir_dist.models.builtin.builtin_bench_images``:
the centre crop of each held-out photograph, then offset crops), its demo sampler settings
(etw = DEMO_ETW, nw = DEMO_NW) and the exact serial forward solve (Anderson needs K = N with this
prior, at more cost). Part (a) is skipped: its float64 reference needs the analytic oracle.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import weakref
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deqir_dist import make_operator  # noqa: E402
from deqir_dist.api.inversion import noise_gradient
from deqir_dist.api.optimize import optimize_noise  # noqa: E402
from deqir_dist.apps.demo import DEMO_ETW, DEMO_NW
from deqir_dist.models import GaussianMixtureDenoiser  # noqa: E402
from deqir_dist.models.builtin import (
    builtin_bench_images,  # noqa: E402
    load_builtin,  # noqa: E402
)
from deqir_dist.quality.metrics import psnr  # noqa: E402
from deqir_dist.sampling.denoiser import EpsFn  # noqa: E402
from deqir_dist.sampling.schedule import chain_coefficients  # noqa: E402
from deqir_dist.sampling.serial import sample_serial  # noqa: E402

OP_PARAMS = {"sr_avgpool": {"scale": 2}, "sr_bicubic": {"scale": 2}, "inpaint": {"mask": "box"}, "colorize": {},
             "deblur_gauss": {}, "deblur_uniform": {}, "deblur_aniso": {}, "cs_wht": {"ratio": 4}, "denoise": {}}


class GraphMemory:
    """Peak bytes of tensors saved for backward that are alive at the same time (approximate:
    storages are counted once; a saved tensor the caller also holds counts until it dies)."""

    def __init__(self):
        self.live: dict[int, list] = {}
        self.cur = self.peak = 0

    def _release(self, key):
        ent = self.live.get(key)
        if ent is None:
            return
        ent[1] -= 1
        if ent[1] == 0:
            self.cur -= ent[0]
            del self.live[key]

    def pack(self, t):
        st = t.untyped_storage()
        key, nb = st.data_ptr(), st.nbytes()
        if nb == 0:
            return t
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [nb, 1]
            self.cur += nb
            self.peak = max(self.peak, self.cur)
        weakref.finalize(t, self._release, key)
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


ORACLE_SAMPLER = {"etw": 0.0, "nw": 0.0, "clip_x0": False}   # what autograd_serial runs (not a model card's)


def autograd_serial(model, op, y, xi, loss_fn, steps, dtype, sigma_y=0.0):
    c = chain_coefficients(steps, sigma_y=sigma_y)
    x = xi.to(dtype).clone().requires_grad_(True)
    h = sample_serial(EpsFn(model, xi.shape[1], dtype), op, c, y.to(dtype), x)
    g, = torch.autograd.grad(loss_fn(h).sum(), x)
    return g


def timed(fn):
    mem = GraphMemory()
    t0 = time.perf_counter()
    with mem:
        out = fn()
    return out, time.perf_counter() - t0, mem.peak


def gradient_rows(model, ops, size, steps, seed, repeat=3):
    rows = []
    shape = (3, size, size)
    for name in ops:
        gen = torch.Generator().manual_seed(seed)
        op = make_operator(name, shape, **OP_PARAMS[name])
        x = model.sample(1, shape, gen)
        y = op.A(x)
        xi = torch.randn((1, *shape), generator=gen)
        other = model.sample(1, shape, gen)          # a reference image: another draw of the prior
        for loss_name, tgt in (("gt-sse", x), ("ref-sse", other)):
            rows += _gradient_cases(model, op, name, loss_name, tgt, y, xi, steps, repeat)
    return rows


def _gradient_cases(model, op, name, loss_name, tgt, y, xi, steps, repeat):
    rows = []
    td = tgt.double()

    def loss(h):
        return (h - td.to(h)).pow(2).flatten(1).sum(1)        # sum-squared error (the official loss form)

    ref = autograd_serial(model, op, y.double(), xi.double(), loss, steps, torch.float64)
    cases = [
        ("autograd-serial f32", "ref", dict()),
        ("implicit (default)", "ng", dict()),
        ("implicit, serial forward", "ng", dict(solver="serial")),
        ("implicit, anderson adjoint (N evals)", "ng", dict(adjoint="anderson")),
        ("implicit, anderson adjoint, stop 1e-3", "ng", dict(adjoint="anderson", adjoint_tol=1e-3)),
        ("phantom k=1 tau=0.1 (official)", "ng", dict(method="phantom")),
        ("phantom k=3 tau=0.1", "ng", dict(method="phantom", phantom_steps=3)),
    ]
    for label, kind, kw in cases:
        secs = math.inf
        for _ in range(repeat):                      # best of `repeat`: the machine is shared
            if kind == "ref":
                g, s, mem = timed(lambda: autograd_serial(model, op, y, xi, loss, steps, torch.float32))
                kf, ka = steps, steps
            else:
                r, s, mem = timed(lambda: noise_gradient(model, y, op, xi, loss, steps=steps, **ORACLE_SAMPLER, **kw))
                g, kf, ka = r.grad, r.forward_iterations, r.adjoint_iterations
            secs = min(secs, s)
        g = g.double()
        cos = float(torch.nn.functional.cosine_similarity(g.flatten(), ref.flatten(), 0))
        err = float((g - ref).norm() / ref.norm())
        rows.append({"op": name, "loss": loss_name, "method": label, "cos": cos, "rel_err": err,
                     "norm_ratio": float(g.norm() / ref.norm()), "K_forward": kf,
                     "K_adjoint": ka, "seconds": round(secs, 4), "graph_bytes": mem})
    return rows


def ground_truth(model, images: int, shape, gen) -> torch.Tensor:
    """The images to restore: draws of the analytic prior, or held-out crops for a network prior."""
    if isinstance(model, GaussianMixtureDenoiser):
        return model.sample(images, shape, gen)
    return builtin_bench_images(images, shape[-1])


def optimisation_rows(model, tasks, size, steps, images, iters, lr, sigma_y, seed, sampler=None):
    """Adam on xi for each task and loss; ``sampler``: extra keywords for ``optimize_noise`` (etw, solver, ...)."""
    rows = []
    shape = (3, size, size)
    sampler = sampler or {}
    for task in tasks:
        name, _, scale = task.partition(":")
        params = dict(OP_PARAMS[name])
        if scale:
            params["scale"] = int(scale)
        gen = torch.Generator().manual_seed(seed)
        op = make_operator(name, shape, **params)
        x = ground_truth(model, images, shape, gen)
        clean = op.A(x)
        y = clean + sigma_y * torch.randn(clean.shape, generator=gen)
        xi = torch.randn((images, *shape), generator=gen)
        noise_norm = sigma_y * math.sqrt(clean[0].numel())
        for loss, method in (("consistency", "implicit"), ("oracle", "implicit"), ("oracle", "phantom")):
            t0 = time.perf_counter()
            r = optimize_noise(model, y, op, loss=loss, target=x if loss == "oracle" else None, steps=steps,
                               iters=iters, lr=lr, xi=xi, sigma_y=sigma_y, method=method, **sampler)
            secs = time.perf_counter() - t0
            before = psnr(r.initial_image.clamp(-1, 1), x)
            after = psnr(r.image.clamp(-1, 1), x)
            best = r.best_iteration
            cons_after = [r.history[b]["consistency"][i] for i, b in enumerate(best)]
            rows.append({"task": task, "loss": loss, "method": method, "oracle": r.oracle, "sigma_y": sigma_y,
                         "psnr_before": round(float(before.mean()), 3), "psnr_after": round(float(after.mean()), 3),
                         "psnr_gain_per_image": [round(float(a - b), 3) for a, b in zip(after, before)],
                         "consistency_before": round(sum(r.history[0]["consistency"]) / images, 4),
                         "consistency_after": round(sum(cons_after) / images, 4),
                         "noise_norm": round(noise_norm, 4), "best_iteration": best, "iters": iters,
                         "seconds": round(secs, 2)})
    return rows


def print_gradient_rows(grad, args):
    print(f"(a) gradient w.r.t. xi vs autograd through the serial sampler (float64), 3x{args.size}x{args.size}, "
          f"N={args.steps}, 1 image; loss = sum-squared error to the GT (gt-sse, the official default) or to "
          f"another prior draw (ref-sse); float32 unless said")
    print(f"{'op':<13}{'loss':<9}{'method':<40}{'cos':>10}{'rel.err':>10}{'|g|/|ref|':>10}{'K_fwd':>6}{'K_adj':>6}{'sec':>8}"
          f"{'graph MB':>10}")
    for r in grad:
        print(f"{r['op']:<13}{r['loss']:<9}{r['method']:<40}{r['cos']:>10.6f}{r['rel_err']:>10.2e}{r['norm_ratio']:>10.3g}{r['K_forward']:>6}"
              f"{r['K_adjoint']:>6}{r['seconds']:>8.3f}{r['graph_bytes'] / 2**20:>10.2f}")


def load_model(name: str):
    """(denoiser, sampler keywords for optimize_noise): the analytic oracle runs at the library defaults."""
    if name == "analytic":
        return GaussianMixtureDenoiser(seed=0), {}
    return load_builtin(), {"etw": DEMO_ETW, "nw": DEMO_NW, "solver": "serial"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="analytic", choices=("analytic", "builtin"),
                    help="analytic: the Gaussian-mixture oracle; builtin: the shipped prior on held-out crops")
    ap.add_argument("--size", type=int, default=16, help="image size for (a) (3 x size x size)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--ops", default="sr_avgpool,inpaint,colorize,cs_wht",
                    help="(a) operators; noiseless deblur at small sizes has no null space: the gradient is ~0")
    ap.add_argument("--opt-size", type=int, default=32, help="image size for (b)")
    ap.add_argument("--opt-tasks", default="sr_avgpool:4,inpaint,colorize", help="name[:scale],...")
    ap.add_argument("--images", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--sigma-y", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine 2 threads ran up to 100x slower)")
    ap.add_argument("--repeat", type=int, default=3, help="(a) timings: best of this many runs")
    ap.add_argument("--skip-opt", action="store_true")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, sampler = load_model(args.model)
    t0 = time.perf_counter()
    if sampler:
        grad = []
        print(f"(a) skipped for --model {args.model}: its float64 reference needs the analytic oracle")
    else:
        grad = gradient_rows(model, args.ops.split(","), args.size, args.steps, args.seed, args.repeat)
        print_gradient_rows(grad, args)
    opt = []
    if not args.skip_opt:
        opt = optimisation_rows(model, args.opt_tasks.split(","), args.opt_size, args.steps, args.images,
                                args.iters, args.lr, args.sigma_y, args.seed, sampler)
        print(f"\n(b) Adam on xi, model {args.model}, {args.iters} evaluations, lr {args.lr}, "
              f"3x{args.opt_size}x{args.opt_size}, N={args.steps}, sigma_y={args.sigma_y}, {args.images} images, "
              f"sampler {sampler or 'defaults'}; PSNR vs GT (mean over images)")
        print(f"{'task':<14}{'loss':<26}{'gradient':<10}{'PSNR before':>12}{'after':>8}{'|Ax-y| before':>15}{'after':>8}"
              f"{'noise |n|':>10}{'sec':>8}")
        for r in opt:
            label = r["loss"] + (" (ORACLE: uses GT)" if r["oracle"] else "")
            print(f"{r['task']:<14}{label:<26}{r['method']:<10}{r['psnr_before']:>12.2f}{r['psnr_after']:>8.2f}"
                  f"{r['consistency_before']:>15.3f}{r['consistency_after']:>8.3f}{r['noise_norm']:>10.3f}"
                  f"{r['seconds']:>8.1f}")
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.1f} s")
    if args.json:
        out = {"command": " ".join(["python", "bench/inversion.py", *(argv if argv is not None else sys.argv[1:])]),
               "args": vars(args), "sampler": sampler, "torch": torch.__version__, "machine": platform.machine(),
               "threads": torch.get_num_threads(), "seconds": round(total, 2), "gradient": grad, "optimisation": opt}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

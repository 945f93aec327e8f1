"""``deqir bench``: serial vs Picard vs Anderson on the same measurements.

For each N it reports K (joint-map evaluations), the denoiser rows evaluated per image (N per
sweep without a window; fewer with a frozen prefix), wall-clock seconds, PSNR of the parallel
result against the serial one (the reference: higher is closer; inf = identical, null in JSON) and PSNR
against the ground truth. ``windows`` adds Picard with a sliding window of round(f N) rows
(f = 0: plain Picard, every row in every sweep; plain ``picard`` freezes the settled prefix).
Images are drawn from the model's own prior when it has one (the analytic oracle).
"""
from __future__ import annotations

import math
import platform
import time
from pathlib import Path

import torch

from deqir_dist.api.planner import (
    DEFAULT_BATCHES,
    choose_solver,
    load_profile,
    measure_cost,
)
from deqir_dist.api.restore import restore
from deqir_dist.apps.tables import format_table
from deqir_dist.errors import DeqirError, check_int
from deqir_dist.models import load_denoiser
from deqir_dist.models.builtin import builtin_bench_images
from deqir_dist.models.emulated import CostEmulatingDenoiser
from deqir_dist.models.loading import PRESETS
from deqir_dist.physics.registry import make_operator
from deqir_dist.quality.metrics import psnr


def _clean_images(model_name: str, model, n: int, shape, gen: torch.Generator) -> torch.Tensor:
    """Test images: the oracle's own samples, or held-out photograph crops for the builtin prior."""
    if hasattr(model, "sample"):
        return model.sample(n, shape, generator=gen)
    if model_name == "builtin":
        return builtin_bench_images(n, shape[-1])
    raise DeqirError("bench needs --model analytic or builtin (they come with test images)")


def run_bench(model: str = "analytic", checkpoint=None, steps=(25, 50, 100), task: str = "sr_avgpool",
              scale: int = 2, size: int = 32, images: int = 3, stop: str = "rows",
              stop_tol: float | None = None, seed: int = 0, device=None,
              solvers=("picard", "anderson"), warm_start: int = 1, windows=(), progress: bool = False,
              emulate_cost=None, etw: float | None = None) -> dict:
    """Run the comparison (``etw``: the chain's eta; None: the model card's, as restore() would); returns a JSON-ready dict with one row per (N, solver); a progress bar
    over the cases when ``progress``. ``emulate_cost`` (a c(b) table file): the model is held to
    it (``models.emulated``), so seconds are those of the table's device, in one process."""
    check_int("images", images)
    check_int("size", size)
    for f in windows:
        if not 0 <= f <= 1:
            raise DeqirError(f"window fractions must lie in [0, 1], got {f}")
    den = load_denoiser(model, checkpoint=checkpoint, device=device, emulate_cost=emulate_cost)
    emulated = den if isinstance(den, CostEmulatingDenoiser) else None
    shape = (3, size, size)
    gen = torch.Generator().manual_seed(seed)
    gt = _clean_images(model, den if emulated is None else emulated.model, images, shape, gen)
    params = {"scale": scale} if task.startswith("sr_") else {}
    op = make_operator(task, shape, **params)
    y = op.A(gt)
    xi = torch.randn((images, *shape), generator=gen)
    gt_dev = gt
    restore(den, y, op, steps=min(steps), solver="anderson", noise=xi, etw=etw)   # warm-up: first calls are slow
    rows = []
    bar = None
    if progress:
        from deqir_dist.sampling.progress import progress_bar
        bar = progress_bar(len(steps) * (1 + len(solvers) + len(windows)), "bench", "run", dynamic_ncols=True)
    for n in steps:
        if bar is not None:
            bar.set_postfix_str(f"N={n} serial")
        t0 = time.perf_counter()
        ref = restore(den, y, op, steps=n, solver="serial", noise=xi, etw=etw)
        t_serial = time.perf_counter() - t0
        rows.append({"steps": n, "solver": "serial", "K": n, "K_mean": float(n), "rows": float(n),
                     "seconds": round(t_serial, 4),
                     "psnr_vs_serial": math.inf,
                     "psnr_gt": round(float(psnr(ref.image.clamp(-1, 1).cpu(), gt_dev).mean()), 3)})
        if bar is not None:
            bar.update(1)
        variants = [(s, None) for s in solvers] + [("picard", max(1, round(f * n)) if f else 0) for f in windows]
        for solver, window in variants:
            extra = {} if window is None else {"window": window}
            if bar is not None:
                bar.set_postfix_str(f"N={n} {solver}" + ("" if window is None else f" W={window}"))
            t0 = time.perf_counter()
            res = restore(den, y, op, steps=n, solver=solver, noise=xi, etw=etw, stop=stop, stop_tol=stop_tol,
                          warm_start=warm_start, **extra)
            secs = time.perf_counter() - t0
            vs = psnr(res.image.cpu(), ref.image.cpu())
            label = solver if window is None else (f"picard W={window}" if window else "picard plain")
            rows.append({"steps": n, "solver": label,
                         "K": res.iterations, "rows": round(sum(t.rows for t in res.timings) / images, 1),
                         "K_mean": sum(res.iterations_per_image) / images, "seconds": round(secs, 4),
                         "psnr_vs_serial": round(float(vs.min()), 2),
                         "psnr_gt": round(float(psnr(res.image.clamp(-1, 1).cpu(), gt_dev).mean()), 3),
                         "stop": res.stop, "stop_tol": res.stop_tol})
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    extra = {}
    if emulated is not None:     # every call of the run, the warm-up included
        extra = {"emulate_cost": str(emulate_cost), "emulated_calls": emulated.stats()}
    return {**extra, "model": model, "task": task, "operator": op.describe()["params"], "image_shape": list(shape),
            "images": images, "stop": stop, "seed": seed, "warm_start": warm_start, "windows": list(windows),
            # the sampler settings every run used: the planner reads K at this etw
            "etw": ref.settings["etw"], "nw": ref.settings["nw"], "settings_source": ref.settings_source.get("etw"),
            "device": str(device or "cpu"),
            "torch": torch.__version__, "machine": platform.machine(), "threads": torch.get_num_threads(),
            "rows": rows}


def run_calibrate(files, task: str | None, flags: dict, model: str = "builtin", checkpoint=None,
                  from_clean: bool = False, steps: int | None = None, procs=(1,), seed: int = 0, device=None,
                  progress: bool = True) -> dict:
    """``deqir bench --calibrate``: the K each parallel plan of ``solver="auto"`` needs on the user's
    own images, stored for the planner (``api.k_observed``, source "calibrated").

    For every image: the serial reference, then each candidate auto weighs (picard over windows of
    N, N/2 and N/4 rows; parareal's benchmarked (B, m)) with the noise ``deqir restore`` would draw
    (seed, file stem), the planner's stop rule; each run's K (and its distance to serial) is recorded.
    Then auto's choice for this model, task, size and settings at each of ``procs`` devices."""
    from deqir_dist.api import k_observed
    from deqir_dist.api.planner import parareal_candidates
    from deqir_dist.api.restore import plan_auto
    from deqir_dist.dataset.items import check_model_fits, generator_for, load_items
    from deqir_dist.dataset.tasks import operator_params
    from deqir_dist.dataset.described import described_task
    from deqir_dist.models.settings import resolve_settings
    paths = [Path(f) for f in files]
    task = task or described_task(paths, from_clean)
    den = load_denoiser(model, checkpoint=checkpoint, device=device)
    items = load_items(paths, task, operator_params(task, flags), from_clean, seed=seed)
    check_model_fits(den, items)
    rows, choices = [], []
    bar = None
    for item in items:
        settings = resolve_settings(den, task, {"steps": steps})[0]
        n = settings["steps"]
        plans = [("picard", {"window": w}) for w in sorted({n, round(n / 2), round(n / 4)} - {0}, reverse=True)]
        plans += [("parareal", {"blocks": b, "coarse_steps": m}) for b, m, _ in parareal_candidates(n, settings["etw"])]
        if progress and bar is None:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(items) * (1 + len(plans)), desc="calibrate", unit="run", dynamic_ncols=True)
        kw = dict(steps=steps, sigma_y=item.sigma_y, device=device)
        with k_observed.paused():
            ref = restore(den, item.y, item.op, solver="serial", generator=generator_for(seed, item.name), **kw)
        if bar is not None:
            bar.update(1)
        for solver, opts in plans:
            t0 = time.perf_counter()
            with k_observed.paused():
                res = restore(den, item.y, item.op, solver=solver, generator=generator_for(seed, item.name),
                              **kw, **opts)
            pid = k_observed.plan_id({"solver": solver, **opts})
            stored = k_observed.record(den, item.op, res.settings, pid, int(res.iterations), source="calibrated")
            rows.append({"image": item.name, "plan": pid, "K": res.iterations, "steps": n,
                         "seconds": round(time.perf_counter() - t0, 3),
                         "psnr_vs_serial": round(float(psnr(res.image.cpu(), ref.image.cpu()).min()), 2),
                         "stored": stored})
            if bar is not None:
                bar.update(1)
        for p in procs:
            choice, plan = plan_auto(den, item.op, procs=p, steps=n, etw=settings["etw"], settings=ref.settings)
            choices.append({"image": item.name, "procs": p, "auto": choice, "K": plan.get("K"),
                            "K_source": plan.get("K_source"), "modelled_speedup": round(plan["speedup"], 3),
                            "reason": plan["reason"]})
    if bar is not None:
        bar.close()
    return {"mode": "calibrate", "model": model, "checkpoint": checkpoint and str(checkpoint), "task": task,
            "images": [str(p) for p in paths], "from_clean": from_clean, "seed": seed,
            "store": str(k_observed.store_dir()), "store_enabled": k_observed.enabled(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows, "auto": choices}


def format_calibrate(result: dict) -> str:
    where = (f"stored in {result['store']}" if result["store_enabled"] else
             "NOT stored: DEQIR_PROFILE_CACHE or DEQIR_LEARN_K is off")
    return (f"model={result['model']} task={result['task']} images={len(result['images'])}: K per plan, {where}\n"
            + format_table(result["rows"], ["image", "plan", "K", "steps", "seconds", "psnr_vs_serial"])
            + "\nsolver=auto now plans with these K:\n"
            + format_table(result["auto"], ["image", "procs", "auto", "K", "modelled_speedup", "K_source"]))


def format_bench(result: dict) -> str:
    head = (f"model={result['model']} task={result['task']} {result['operator']} "
            f"image={tuple(result['image_shape'])} images={result['images']} stop={result['stop']}")
    cols = ["steps", "solver", "K", "K_mean", "rows", "seconds", "psnr_vs_serial", "psnr_gt"]
    return head + "\n" + format_table(result["rows"], cols) + \
        ("\n(K: joint-map evaluations, max over images; rows: denoiser rows evaluated per image, mean; "
         "psnr_vs_serial: worst image, dB)")


def run_profile(model: str = "analytic", checkpoint=None, size: int = 32, device=None, steps=(25, 50, 100),
                graph: bool = False, procs=(1, 2, 4, 8, 16), cost_file=None) -> dict:
    """c(b) for this model, size and device, and the modelled serial vs parallel latency.

    ``cost_file``: model a c(b) table from a profile JSON instead of measuring (``{"c_ms": {b: ms}}``,
    as ``deqir bench --profile --json`` writes; its "model", "image_shape", "device", "graph" and
    "source" fields, if any, are reported as given)."""
    shape = (3, size, size)
    meta = {}
    if cost_file is not None:
        import json

        from deqir_dist.io.limits import read_file_bytes
        c_ms = load_profile(cost_file)           # checked (a small regular file, valid JSON) before this read
        meta = json.loads(read_file_bytes(cost_file, "cost profile", cap=1 << 20))
        model, graph = meta.get("model", str(cost_file)), bool(meta.get("graph", False))
        shape, device = meta.get("image_shape", ["?"]), meta.get("device", "?")
    else:
        # timing needs no trained weights: a preset without a checkpoint is built untrained
        den = load_denoiser(model, checkpoint=checkpoint, device=device,
                            random_weights=model in PRESETS and checkpoint is None)
        c_ms = measure_cost(den, shape, batches=sorted(set(DEFAULT_BATCHES) | set(steps)), graph=graph)
    model_rows = []
    for n in steps:
        for p in procs:
            if p <= n:
                choice, best = choose_solver(c_ms, n, p)
                model_rows.append({**best, "auto": choice})
    return {"model": model, "image_shape": list(shape), "device": str(device or "cpu"), "graph": graph,
            "source": meta.get("source", "measured by this command"), "cost_file": cost_file and str(cost_file),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "c_ms": {str(k): round(v, 4) for k, v in c_ms.items()},
            "model_rows": [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
                           for r in model_rows]}


def format_profile(result: dict) -> str:
    c = result["c_ms"]
    head = (f"model={result['model']} image={tuple(result['image_shape'])} device={result['device']} "
            f"graph={result['graph']} (c(b): {result['source']})\nc(b), ms: "
            + "  ".join(f"b={b}: {v:.3g}" for b, v in c.items()))
    cols = ["steps", "procs", "window", "K", "serial_ms", "parallel_ms", "speedup", "auto"]
    return (head + "\n" + format_table(result["model_rows"], cols)
            + "\n(parallel = warm start + K c(ceil(W/P)) for the best window W of N, N/2, N/4; K measured on the "
              "built-in prior per window (profile.EXPECTED_K); "
              "no communication cost)")

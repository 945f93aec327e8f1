"""Throughput of ``ray-restore`` with 1 and 2 CPU workers, and Ray's overhead against a plain loop.

    python bench/ray_throughput.py --model analytic --images 40 --size 64 --steps 25 \
        --json bench/results/ray_throughput.json

Workload: ``--images`` synthetic smooth colour images (``--size`` square), restored from clean
(``--from-clean``: degraded here, so PSNR is reported) with ``--task`` / ``--scale`` and the
default sampler (anderson, stop on the final image's change). The model is a flag, so
``--model builtin`` (or a checkpoint) works once it exists.

Measured, each on the same images and one torch thread per worker:
* plain loop: ``jobs.load_items`` + ``jobs.restore_items`` in this process (what ``deqir restore``
  runs), model loading included;
* Ray, W workers: ``RayRestoreJob.run()`` on an already started local Ray instance (start-up of
  Ray itself is reported apart: on a cluster it is already running). ``wall`` includes starting
  the worker processes and loading the model in each; ``steady`` excludes that start-up.

Overhead = Ray with 1 worker against the plain loop: (wall_ray / wall_loop - 1), both end to end,
and the same after start-up. Each run is repeated (``--repeats``, interleaved) and the fastest
kept, since the machine may be shared. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

for k, v in (("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_AUTH_MODE", "disabled"),
             ("RAY_USAGE_STATS_ENABLED", "0")):
    os.environ.setdefault(k, v)


def make_images(folder: Path, n: int, size: int) -> None:
    import numpy as np
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        f = rng.uniform(1, 6, (3, 2))
        ph = rng.uniform(0, 6.3, 3)
        img = np.stack([np.sin(2 * np.pi * (f[c, 0] * yy + f[c, 1] * xx) + ph[c]) for c in range(3)], -1)
        img = ((img * 0.8 + 1) * 127.5 + rng.normal(0, 3, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"im{i:04d}.png")


def plain_loop(data: Path, out: Path, a) -> dict:
    import torch

    from deqir_dist.dataset.items import expand_inputs, load_items, restore_items
    from deqir_dist.models import load_denoiser
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = load_denoiser(a.model, checkpoint=a.checkpoint)
    items = load_items(expand_inputs([str(data)]), a.task, {"scale": a.scale}, True, seed=0)
    t1 = time.perf_counter()
    recs = restore_items(model, items, str(out), restore_kw(a), seed=0, progress=False)
    t2 = time.perf_counter()
    return {"images": len(recs), "wall": round(t2 - t0, 3), "steady": round(t2 - t1, 3),
            "images_per_second": round(len(recs) / (t2 - t0), 4),
            "mean_psnr": round(sum(r["psnr"] for r in recs) / len(recs), 3)}


def restore_kw(a) -> dict:
    return dict(steps=a.steps, start=1000, solver=a.solver, stop="rows", stop_tol=None, max_iter=None,
                etw=0.0, nw=0.0, sigma_y=0.0)


def ray_job(data: Path, out: Path, a, workers: int) -> dict:
    from deqir_dist.ray.job import RayRestoreJob
    job = RayRestoreJob(input=str(data), out=str(out), task=a.task, op_params={"scale": a.scale},
                        restore_kw=restore_kw(a), model=a.model, checkpoint=a.checkpoint, from_clean=True,
                        device="cpu", workers=workers, cpus_per_worker=1, images_per_batch=a.images_per_batch,
                        progress=False)
    s = job.run()
    assert s["ok"] == a.images and s["failed"] == 0, s
    steady = s["seconds"] - s["startup_seconds"]
    return {"workers": workers, "images": s["ok"], "wall": s["seconds"], "startup": s["startup_seconds"],
            "steady": round(steady, 3), "images_per_second": round(s["ok"] / s["seconds"], 4),
            "steady_images_per_second": round(s["ok"] / steady, 4), "mean_psnr": s.get("mean_psnr")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="analytic")
    p.add_argument("--checkpoint")
    p.add_argument("--images", type=int, default=40, help="images (default 40: 20+ per worker at 2 workers)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--task", default="sr_avgpool")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--solver", default="anderson")
    p.add_argument("--images-per-batch", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the best of each is kept")
    p.add_argument("--json", default=str(ROOT / "bench" / "results" / "ray_throughput.json"))
    a = p.parse_args(argv)

    import ray
    import torch
    tmp = Path(tempfile.mkdtemp(prefix="deqir-ray-bench-"))
    try:
        data = tmp / "data"
        make_images(data, a.images, a.size)
        t0 = time.perf_counter()
        ray.init(num_cpus=max(a.workers), include_dashboard=False, log_to_driver=False,
                 object_store_memory=256 * 1024**2)
        ray_init = time.perf_counter() - t0
        loops, runs = [], {w: [] for w in a.workers}
        for rep in range(a.repeats):             # interleaved, best of: the machine may be shared
            loops.append(plain_loop(data, tmp / f"loop{rep}", a))
            for w in a.workers:
                runs[w].append(ray_job(data, tmp / f"ray{w}-{rep}", a, w))
        ray.shutdown()
        same = all((tmp / "loop0" / f.name).read_bytes() == f.read_bytes() for f in (tmp / "ray1-0").glob("*.png")) \
            if 1 in a.workers else None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    loop = min(loops, key=lambda r: r["wall"])
    loop["all_walls"] = [r["wall"] for r in loops]
    best = []
    for w in a.workers:
        r = dict(min(runs[w], key=lambda r: r["wall"]))
        r["all_walls"] = [x["wall"] for x in runs[w]]
        best.append(r)
    runs = best
    one = next((r for r in runs if r["workers"] == 1), None)
    result = {
        "setting": {k: getattr(a, k) for k in ("model", "images", "size", "task", "scale", "steps", "solver",
                                               "images_per_batch", "repeats")},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "ray": ray.__version__},
        "plain_loop": loop, "ray_init_seconds": round(ray_init, 3), "ray": runs,
        "ray_outputs_identical_to_loop": same,
    }
    if one:
        result["overhead_end_to_end"] = round(one["wall"] / loop["wall"] - 1, 4)
        result["overhead_after_startup"] = round(one["steady"] / loop["steady"] - 1, 4)
    print(f"{a.images} images {a.size}x{a.size}, {a.task} x{a.scale}, {a.steps} steps, {a.solver}, model {a.model}")
    print(f"{'run':<16}{'wall s':>9}{'start s':>9}{'img/s':>9}{'steady img/s':>14}")
    print(f"{'plain loop':<16}{loop['wall']:>9.2f}{'':>9}{loop['images_per_second']:>9.3f}"
          f"{loop['images'] / loop['steady']:>14.3f}")
    for r in runs:
        print(f"{'ray ' + str(r['workers']) + ' worker(s)':<16}{r['wall']:>9.2f}{r['startup']:>9.2f}"
              f"{r['images_per_second']:>9.3f}{r['steady_images_per_second']:>14.3f}")
    if one:
        print(f"Ray overhead (1 worker, {a.images} images): {100 * result['overhead_end_to_end']:.1f}% end to end, "
              f"{100 * result['overhead_after_startup']:.1f}% after worker start-up; ray.init {ray_init:.1f} s; "
              f"outputs identical to the loop: {same}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

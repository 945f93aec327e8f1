"""``deqir restore --solver auto`` on a folder: seconds per image with the cost profile measured
(an empty cache folder), read from the cache (the same command again), and ``--solver serial``.

    python bench/auto_cache.py --images 3 --size 64 --json bench/results/auto-cache-builtin-cpu.json

The built-in prior on held-out crops, sr_bicubic x4, N = 25, one torch thread; each run's
summary.json (per-image seconds, the plan and where its profile came from) is kept in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from deqir_dist.apps.cli import main as deqir
from deqir_dist.io.images import write_image
from deqir_dist.io.jsonio import write_json
from deqir_dist.models.builtin import builtin_bench_images


def run(images: int, size: int, steps: int) -> dict:
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="deqir-auto-cache-"))
    os.environ["DEQIR_CACHE_DIR"] = str(work / "cache")          # starts empty
    clean = work / "clean"
    clean.mkdir()
    for i, x in enumerate(builtin_bench_images(images, size)):
        write_image(clean / f"crop{i}.png", x)
    assert deqir(["degrade", str(clean), "--task", "sr_bicubic", "--scale", "4", "-o", str(work / "meas")]) == 0
    runs = {}
    for name, solver in (("auto_cold", "auto"), ("auto_cached", "auto"), ("serial", "serial")):
        argv = ["restore", str(work / "meas"), "-o", str(work / name), "--solver", solver, "--steps", str(steps),
                "--threads", "1", "--no-progress"]
        t0 = time.perf_counter()
        assert deqir(argv) == 0
        wall = time.perf_counter() - t0
        s = json.loads((work / name / "summary.json").read_text())
        runs[name] = {"argv": ["deqir", *argv[:1], "MEAS", *argv[2:3], "OUT", *argv[4:]], "wall_s": round(wall, 3),
                      "seconds_per_image": [r["seconds"] for r in s["images"]],
                      "solvers": s["summary"].get("solvers"), "plans": s["summary"].get("plans"),
                      "profile_sources": s["summary"].get("profile_sources")}
    return {"command": f"python bench/auto_cache.py --images {images} --size {size} --steps {steps}",
            "model": "builtin", "task": "sr_bicubic x4", "size": size, "steps": steps, "threads": 1,
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--json")
    a = ap.parse_args()
    result = run(a.images, a.size, a.steps)
    print(json.dumps({k: {"wall_s": v["wall_s"], "seconds_per_image": v["seconds_per_image"],
                          "profile_sources": v["profile_sources"]} for k, v in result["runs"].items()}, indent=1))
    if a.json:
        write_json(a.json, result)


if __name__ == "__main__":
    main()

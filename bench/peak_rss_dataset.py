"""Peak resident memory of `deqir restore` and `deqir ray-restore` against the number of images.

    python bench/peak_rss_dataset.py --images 100 1000 --json bench/results/peak-rss-dataset-cpu.json

Each run is a fresh `python -m deqir_dist` process on N small clean images (16x16, --from-clean,
sr_avgpool x2, the analytic model, 2 steps: the restore is cheap, so what grows with N is what
the job keeps per image). The command's peak RSS is its ``ru_maxrss`` (os.wait4); for
ray-restore the Ray processes it starts (workers, raylet with its object store, GCS) are read
from ``/proc/PID/status`` (VmHWM, the peak RSS of each process) every 0.2 s while the job runs.
Flat means: the peak with 1,000 images is within a few MB of the peak with 100.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
       "OMP_NUM_THREADS": "1"}


def make_images(folder: Path, n: int, size: int = 16) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:04d}.png")


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    return kids


def _role(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    exe = os.path.basename(cmd.split(" ", 1)[0])
    if exe in ("raylet", "gcs_server"):            # the raylet's own command line names default_worker.py
        return exe
    if "RestoreWorker" in cmd or "default_worker.py" in cmd:
        return "worker"
    return "other"


def _hwm_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Sampler(threading.Thread):
    """Peak RSS (VmHWM) of every descendant of ``root``, by role, sampled while it runs."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root, self.peaks, self.stop = root, {}, threading.Event()

    def run(self):
        while not self.stop.is_set():
            kids, todo, seen = _children(), [self.root], set()
            while todo:
                p = todo.pop()
                for c in kids.get(p, []):
                    if c not in seen:
                        seen.add(c)
                        todo.append(c)
            for pid in seen:
                role, hwm = _role(pid), _hwm_mb(pid)
                if role and hwm is not None:
                    self.peaks[pid] = (role, max(hwm, self.peaks.get(pid, (role, 0.0))[1]))
            self.stop.wait(0.2)


def run_one(command: str, data: Path, out: Path) -> dict:
    argv = [sys.executable, "-m", "deqir_dist", command, str(data), "--from-clean", "--task", "sr_avgpool",
            "--scale", "2", "--model", "analytic", "--steps", "2", "--no-progress", "-o", str(out)]
    if command == "ray-restore":
        argv += ["--workers", "2", "--images-per-batch", "4"]
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sampler = Sampler(p.pid)
    sampler.start()
    err = p.stderr.read()
    _, status, usage = os.wait4(p.pid, 0)
    sampler.stop.set()
    sampler.join()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{command} failed ({code}): {err.decode()[-500:]}")
    files = list(data.glob("*.png"))
    row = {"command": command, "images": len(files), "inputs_mb": round(sum(f.stat().st_size for f in files) / 2**20, 2),
           "seconds": round(time.perf_counter() - t0, 1),
           "driver_peak_mb": round(usage.ru_maxrss / 1024, 1),
           "outputs": len(list(out.glob("*.png")))}
    by_role: dict[str, list[float]] = {}
    for role, hwm in sampler.peaks.values():
        by_role.setdefault(role, []).append(hwm)
    for role in ("worker", "raylet", "gcs_server"):
        if role in by_role:
            row[f"{role}_peak_mb"] = round(max(by_role[role]), 1)
            row[f"{role}_processes"] = len(by_role[role])
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, nargs="+", default=[100, 1000])
    ap.add_argument("--size", type=int, default=16, help="image side (default 16)")
    ap.add_argument("--commands", nargs="+", default=["restore", "ray-restore"], choices=("restore", "ray-restore"))
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="deqir-rss-") as tmp:
        for n in args.images:
            data = Path(tmp) / f"data{n}"
            make_images(data, n, args.size)
            for command in args.commands:
                rows.append(run_one(command, data, Path(tmp) / f"out-{command}-{n}"))
                print(json.dumps(rows[-1]), flush=True)
    result = {"command": "python bench/peak_rss_dataset.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "note": f"{args.size}x{args.size} clean images (uniform noise), --from-clean sr_avgpool x2, analytic "
                      "model, 2 steps, CPU; peak RSS in MB",
              "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

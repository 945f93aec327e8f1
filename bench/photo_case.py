"""A user's photograph x4 from the command line with no flags but the task (issue 25), measured.

Builds a 640 x 424 JPEG from scikit-image's ``rocket`` (427 x 640, cropped to a height divisible by
4 so that ``--from-clean`` can degrade it x4), then runs, in a child, under ``/usr/bin/time -v``:

    deqir restore rocket424.jpg --task sr_bicubic --scale 4 --from-clean --threads 1 -o OUT

and records the estimate line the CLI prints before any work, the peak RSS, the wall, user and
system time, the load average, and PSNR / SSIM from ``summary.json``. The estimate models CPU time;
on a machine shared with other jobs the wall time is longer by the share of a core the run got
(``cpu_percent``), so the comparison is with user + system time. ``--steps`` (for a quick look)
overrides the model card's N = 100.

``--measurement`` instead restores the 640 x 427 JPEG itself as the low-resolution measurement
(a 2560 x 1708 output: tiled by default on a machine with less than ~26 GB available).

    python bench/photo_case.py --json bench/results/photo-case-cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _time_field(text: str, name: str) -> str | None:
    m = re.search(rf"^\s*{re.escape(name)}: (.+)$", text, re.M)
    return m.group(1).strip() if m else None


def _wall(s: str) -> float:
    parts = [float(p) for p in s.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int)
    ap.add_argument("--measurement", action="store_true")
    ap.add_argument("--work", help="folder for the photo and the output (default: a temporary one)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from PIL import Image
    from skimage import data
    work = Path(args.work or tempfile.mkdtemp(prefix="deqir-photo-"))
    work.mkdir(parents=True, exist_ok=True)
    img = data.rocket()
    if not args.measurement:
        img = img[:424]
    photo = work / ("rocket.jpg" if args.measurement else "rocket424.jpg")
    Image.fromarray(img).save(photo, quality=92)
    out = work / "out"
    cmd = ["deqir", "restore", photo.name, "--task", "sr_bicubic", "--scale", "4", "--threads", "1",
           "-o", str(out)]
    if not args.measurement:
        cmd.insert(7, "--from-clean")
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DEQIR_CACHE_DIR": str(work / "cache")}
    load0 = os.getloadavg()
    t0 = time.time()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], cwd=work, env=env, capture_output=True, text=True)
    err = p.stderr
    estimate = [ln for ln in err.splitlines() if ln.startswith(f"deqir: {photo.name}:")]
    rec = {"command": " ".join(cmd), "exit": p.returncode, "photo": f"skimage.data.rocket() {img.shape[1]}x{img.shape[0]}",
           "estimate_line": estimate[0] if estimate else None,
           "peak_rss_mb": round(int(_time_field(err, "Maximum resident set size (kbytes)") or 0) / 1024, 1),
           "user_s": float(_time_field(err, "User time (seconds)") or "nan"),
           "system_s": float(_time_field(err, "System time (seconds)") or "nan"),
           "wall_s": _wall(_time_field(err, "Elapsed (wall clock) time (h:mm:ss or m:ss)") or "0"),
           "cpu_percent": _time_field(err, "Percent of CPU this job got"),
           "loadavg_start": [round(v, 2) for v in load0], "loadavg_end": [round(v, 2) for v in os.getloadavg()],
           "started_unix": round(t0)}
    m = re.search(r"about ([\d.]+) (s|min|h) \((\d+) calls x ([\d.]+) s", rec["estimate_line"] or "")
    if m:
        rec["estimate_s"] = float(m.group(3)) * float(m.group(4))
    summary = out / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        rec.update(psnr=s["summary"].get("mean_psnr"), ssim=s["summary"].get("mean_ssim"),
                   restore_seconds=s["summary"].get("seconds"), tiles=s["images"][0].get("tiles"),
                   solver=s["images"][0].get("solver"))
    if p.returncode != 0:
        rec["stderr_tail"] = err[-2000:]
    print(json.dumps(rec, indent=1))
    if args.json:
        sys.path.insert(0, str(ROOT))
        from deqir_dist.io.jsonio import write_json
        write_json(args.json, rec)
    return 0 if p.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""The red team's small files that claim a huge picture (issue 25), refused: peak RSS and time.

    python bench/refusal_rss.py --json bench/results/refusal-rss-cpu.json

Builds the 229-byte 16-bit PNG whose deqir-measurement description claims a 4096x4096 picture
(sr_avgpool x256), and a 49 KB 8-bit PNG of 4096x4096 zeros, then runs each case of ``deqir
restore`` in a fresh process (the peak RSS of a process only grows) at the defaults, with no
address-space limit: the built-in prior's 256 px tiles fit in memory there, so what refuses it is
the work cap (``--max-time``, default 3 h). Records the exit status, the one line, the modelled
hours the line gives, the seconds and the process's own peak RSS (VmHWM).

One more case is not hostile: a 640x427 picture (zeros: the time model does not look at the
pixels) as an x4 measurement, the issue's photograph case (a 2560x1708 output), with
``--max-time 1`` so that the line gives its modelled time at the defaults (N = 100, tiles) against
the default 3 h cap, without running it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import contextlib, io, json, sys, time
from deqir_dist.apps.cli import main
err = io.StringIO()
t0 = time.perf_counter()
with contextlib.redirect_stderr(err):
    code = main(json.loads(sys.argv[1]))
with open("/proc/self/status") as fh:
    hwm = next(int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM:")) / 1024
print(json.dumps({"code": code, "err": err.getvalue(), "seconds": round(time.perf_counter() - t0, 3),
                  "peak_rss_mb": round(hwm, 1)}))
"""


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def zeros_png(path: Path, w: int, h: int) -> Path:
    z = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * w)
    data = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">II", w, h) + bytes([8, 2, 0, 0, 0]))
                     + _chunk(b"IDAT", data) + _chunk(b"IEND", b""))
    return path


def build(d: Path) -> tuple[Path, Path]:
    import numpy as np

    from deqir_dist.io.images import _png16_encode
    png = _png16_encode(np.zeros((16, 16, 3), np.uint16))
    desc = {"format": 1, "sigma_y": 0.0, "bits": 16, "task": "sr_avgpool", "image_shape": [3, 4096, 4096],
            "params": {"scale": 256}}
    tiny = d / "cap_op_sr.png"          # the red team's repro, byte for byte (reliability.md, finding 1)
    tiny.write_bytes(png[:33] + _chunk(b"tEXt", b"deqir-measurement\0" + json.dumps(desc).encode()) + png[33:])
    return tiny, zeros_png(d / "zeros4096.png", 4096, 4096)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        tiny, real = build(d)
        o = str(d / "out")
        cases = {
            "229-byte PNG claiming 4096x4096, builtin (default)": ["restore", str(tiny), "--no-progress", "-o", o],
            "229-byte PNG claiming 4096x4096, analytic": ["restore", str(tiny), "--model", "analytic", "--solver",
                                                          "serial", "--steps", "5", "--no-progress", "-o", o],
            "4096x4096 PNG of zeros, --from-clean x4, builtin": ["restore", str(real), "--task", "sr_bicubic",
                                                                 "--scale", "4", "--from-clean", "--no-progress",
                                                                 "-o", o],
            "640x427 picture as an x4 measurement (2560x1708 output), --max-time 1: its modelled time": [
                "restore", str(zeros_png(d / "photo427.png", 640, 427)), "--task", "sr_bicubic", "--scale", "4",
                "--max-time", "1", "--no-progress", "-o", o],
        }
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DEQIR_CACHE_DIR": str(d / "cache")}
        rows = []
        for name, argv in cases.items():
            p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv)], capture_output=True, text=True,
                               env=env, timeout=600, cwd=ROOT)
            r = json.loads(p.stdout.splitlines()[-1])
            r["err"] = r["err"].strip().replace(str(d) + "/", "")
            m = re.search(r"would take about ([0-9.]+) (h|min|s)", r["err"])
            hours = None if m is None else float(m.group(1)) / {"h": 1, "min": 60, "s": 3600}[m.group(2)]
            rows.append({"case": name, "bytes": Path(argv[1]).stat().st_size, **r, "modelled_hours": hours,
                         "wrote_output": Path(o).exists()})
            print(f"{name}: exit {r['code']}, {r['seconds']} s, peak RSS {r['peak_rss_mb']} MB\n  {r['err']}")
    result = {"command": "python bench/refusal_rss.py", "threads": 1, "load_average": list(os.getloadavg()),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cases": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Closed-loop load on ``deqir serve``: C clients, each sending its next request when the last one
returned, for C in --clients; per C the p50 / p95 / p99 of the total (client-side), queue and
solve times (the server's X-Deqir-* headers), throughput, batch sizes, plans and failures.

    python bench/serve_load.py --clients 1 2 4 8 --requests 6 --json bench/results/serve-builtin-P1-cpu.json

The server is started here (``deqir serve --port 0``, its flags after ``--``: defaults below), on
measurement PNGs of the built-in prior's held-out crops (sr_bicubic x2, 32 px), N = --steps.
The machine's load average is recorded at the start and the end: on a shared machine these are
comparative numbers only.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import http.client
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deqir_dist.io.images import write_image  # noqa: E402
from deqir_dist.io.jsonio import write_json  # noqa: E402
from deqir_dist.models.builtin import builtin_bench_images  # noqa: E402


def measurements(folder: Path, count: int, size: int) -> list[Path]:
    from deqir_dist.apps.cli import main as deqir
    clean = folder / "clean"
    clean.mkdir(parents=True)
    imgs = builtin_bench_images(count, size)
    for i in range(count):
        write_image(clean / f"img{i}.png", imgs[i])
    assert deqir(["degrade", str(clean), "--task", "sr_bicubic", "--scale", "2", "-o", str(folder / "meas")]) == 0
    return sorted((folder / "meas").glob("*.png"))


def start(flags: list[str], env: dict) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "deqir_dist", "serve", "--port", "0", *flags],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    line = proc.stdout.readline().strip()
    if not line.startswith("serving on http://"):
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def post(port: int, path: Path, name: str) -> dict:
    b = uuid.uuid4().hex
    body = (f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n\r\n'.encode()
            + path.read_bytes() + f"\r\n--{b}--\r\n".encode())
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    c.request("POST", "/v1/restore", body=body, headers={"Content-Type": f"multipart/form-data; boundary={b}"})
    r = c.getresponse()
    r.read()
    total = time.perf_counter() - t0
    h = {k.lower(): v for k, v in r.getheaders()}
    out = {"status": r.status, "total_ms": total * 1e3}
    if r.status == 200:
        out.update(queue_ms=float(h["x-deqir-queue-ms"]), solve_ms=float(h["x-deqir-solve-ms"]),
                   batch=int(h["x-deqir-batch-size"]), plan=h["x-deqir-plan"], solver=h["x-deqir-solver"])
    return out


def pct(values: list[float]) -> dict:
    if not values:
        return {}
    a = np.asarray(values)
    return {"p50": round(float(np.percentile(a, 50)), 1), "p95": round(float(np.percentile(a, 95)), 1),
            "p99": round(float(np.percentile(a, 99)), 1), "mean": round(float(a.mean()), 1)}


def closed_loop(port: int, files: list[Path], clients: int, per_client: int) -> dict:
    rows, lock = [], threading.Lock()

    def client(c: int):
        for k in range(per_client):
            f = files[(c * per_client + k) % len(files)]
            r = post(port, f, f"c{c}r{k}.png")          # every request its own id (its own noise)
            with lock:
                rows.append(r)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    ok = [r for r in rows if r["status"] == 200]
    batches = [r["batch"] for r in ok]
    plans = [r["plan"] for r in ok]
    return {"clients": clients, "requests": len(rows), "ok": len(ok), "failed": len(rows) - len(ok),
            "statuses": sorted({r["status"] for r in rows}), "seconds": round(wall, 3),
            "throughput_rps": round(len(ok) / wall, 3),
            "total_ms": pct([r["total_ms"] for r in ok]), "queue_ms": pct([r["queue_ms"] for r in ok]),
            "solve_ms": pct([r["solve_ms"] for r in ok]),
            "batch_sizes": {str(b): batches.count(b) for b in sorted(set(batches))},
            "plans": {p: plans.count(p) for p in sorted(set(plans))},
            "solvers": sorted({r["solver"] for r in ok})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--requests", type=int, default=6, help="requests per client per run (default 6)")
    ap.add_argument("--images", type=int, default=8, help="distinct measurement files (default 8)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=4)
    ap.add_argument("--plan", default="auto")
    ap.add_argument("--emulate-cost", metavar="TABLE.json",
                    help="serve the analytic oracle held to this c(b) table (models.emulated), e.g. "
                         "bench/results/adm256-h200-design-cb.json")
    ap.add_argument("--json", required=True)
    ap.add_argument("server_flags", nargs="*", help="more deqir serve flags (after --)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deqir-serve-load-"))
    files = measurements(work, args.images, args.size)
    flags = ["--steps", str(args.steps), "--threads", "1", "--ranks", str(args.ranks), "--max-batch",
             str(args.max_batch), "--plan", args.plan, "--max-queue", str(4 * max(args.clients)),
             *(["--emulate-cost", args.emulate_cost] if args.emulate_cost else []), *args.server_flags]
    env = dict(os.environ, PYTHONPATH=str(ROOT), DEQIR_CACHE_DIR=str(work / "cache"), OMP_NUM_THREADS="1")
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc, port = start(flags, env)
    startup = time.perf_counter() - t0
    try:
        for f in files[:2]:
            post(port, f, f"warm-{f.name}")
        runs = [closed_loop(port, files, c, args.requests) for c in args.clients]
    finally:
        proc.terminate()
        code = proc.wait(120)
    out = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "server_flags": flags,
           "model": f"analytic held to {args.emulate_cost}" if args.emulate_cost else "builtin",
           "task": "sr_bicubic x2", "size": args.size, "steps": args.steps,
           "ranks": args.ranks, "startup_s": round(startup, 2), "server_exit": code,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": load0,
                       "load_after": os.getloadavg()},
           "runs": runs}
    write_json(args.json, out)
    for r in runs:
        print(f"C={r['clients']}: {r['throughput_rps']} req/s, total p50/p95/p99 {r['total_ms'].get('p50')}/"
              f"{r['total_ms'].get('p95')}/{r['total_ms'].get('p99')} ms, batches {r['batch_sizes']}, "
              f"failed {r['failed']}")


if __name__ == "__main__":
    main()

"""Closed-loop load on ``deqir serve``: C clients, each sending its next request when the last one
returned, for C in --clients; per C the p50 / p95 / p99 of the total (client-side), queue and
solve times (the server's X-Deqir-* headers), throughput, batch sizes, plans and failures.

    python bench/serve_load.py --clients 1 2 4 8 --requests 6 --json bench/results/serve-builtin-P1-cpu.json

Open loop (``--rates``): requests arrive as a Poisson process (exponential gaps, seeded) at each
rate, whether or not earlier ones returned; a rate ``0.5x`` is that fraction of the capacity, the
highest closed-loop throughput of the same run. A request's total time counts from its scheduled
arrival (a late send is not hidden). Reported per rate as for the closed loop, plus the check
"at half capacity p99 <= 2 x p50" and, with ``--plot``, a PNG of the latency percentiles against
the offered load.

    python bench/serve_load.py --clients 1 4 --requests 4 --rates 0.25x,0.5x,0.75x,0.9x --open-requests 40 \
        --json bench/results/serve-open-loop-builtin-P1-cpu.json --plot docs/serve_open_loop.png

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


def post(port: int, path: Path, name: str, due: float | None = None) -> dict:
    """One request; its total time from ``due`` (the scheduled arrival, open loop) or from now."""
    b = uuid.uuid4().hex
    body = (f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n\r\n'.encode()
            + path.read_bytes() + f"\r\n--{b}--\r\n".encode())
    t0 = time.perf_counter() if due is None else due
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
    return {"clients": clients, **summarize(rows, wall)}


def summarize(rows: list[dict], wall: float) -> dict:
    ok = [r for r in rows if r["status"] == 200]
    batches = [r["batch"] for r in ok]
    plans = [r["plan"] for r in ok]
    return {"requests": len(rows), "ok": len(ok), "failed": len(rows) - len(ok),
            "statuses": sorted({r["status"] for r in rows}), "seconds": round(wall, 3),
            "throughput_rps": round(len(ok) / wall, 3),
            "total_ms": pct([r["total_ms"] for r in ok]), "queue_ms": pct([r["queue_ms"] for r in ok]),
            "solve_ms": pct([r["solve_ms"] for r in ok]),
            "batch_sizes": {str(b): batches.count(b) for b in sorted(set(batches))},
            "plans": {p: plans.count(p) for p in sorted(set(plans))},
            "solvers": sorted({r["solver"] for r in ok})}


def open_loop(port: int, files: list[Path], rate: float, n: int, seed: int, tag: str) -> dict:
    """n requests arriving as a Poisson process of ``rate`` per second (the first at once)."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, n)
    arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    rows, lock = [], threading.Lock()
    late = []
    t0 = time.perf_counter()

    def one(k: int):
        f = files[k % len(files)]
        r = post(port, f, f"{tag}r{k}.png", due=t0 + arrivals[k])
        with lock:
            rows.append(r)
    with concurrent.futures.ThreadPoolExecutor(256) as pool:
        futs = []
        for k in range(n):
            wait = t0 + arrivals[k] - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            late.append(max(0.0, -wait) * 1e3)
            futs.append(pool.submit(one, k))
        for fu in futs:
            fu.result()
    wall = time.perf_counter() - t0
    out = {"offered_rps": round(rate, 4), "scheduled_seconds": round(float(arrivals[-1]), 3), **summarize(rows, wall)}
    out["send_late_ms_max"] = round(max(late), 1)
    return out


def md1_reference(rate: float, service_ms: float, n: int = 200_000, seed: int = 0) -> dict:
    """Total-time p50 / p99 of an ideal single FIFO server with Poisson arrivals at ``rate`` and
    a fixed service time (M/D/1, Lindley's recursion): what one process answering one request at
    a time would give with no noise at all; the yardstick for the open-loop tails."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1e3 / rate, n)
    wait = np.empty(n)
    w = 0.0
    for k in range(n):
        wait[k] = w
        w = max(0.0, w + service_ms - gaps[(k + 1) % n])
    total = wait[n // 10:] + service_ms              # the first tenth: warm-up
    return {"utilisation": round(rate * service_ms / 1e3, 3), "service_ms": round(service_ms, 1),
            "p50": round(float(np.percentile(total, 50)), 1), "p99": round(float(np.percentile(total, 99)), 1)}


def half_capacity_check(capacity: float, runs: list[dict]) -> dict | None:
    """At half capacity p99 <= 2 x p50 (the issue's criterion), from the open-loop run at 0.5x."""
    half = [r for r in runs if abs(r["fraction"] - 0.5) < 1e-9]
    if not half or not half[0]["total_ms"]:
        return None
    t = half[0]["total_ms"]
    return {"offered_rps": half[0]["offered_rps"], "capacity_rps": capacity, "p50_ms": t["p50"], "p99_ms": t["p99"],
            "p99_over_p50": round(t["p99"] / t["p50"], 3), "holds": bool(t["p99"] <= 2 * t["p50"]),
            "failed": half[0]["failed"]}


def parse_rates(text: str) -> list[tuple[str, float]]:
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        kind = "fraction" if tok.endswith("x") else "rps"
        v = float(tok[:-1] if kind == "fraction" else tok)
        if not (v > 0 and np.isfinite(v)):
            raise SystemExit(f"--rates: {tok!r} is not a positive rate")
        out.append((kind, v))
    return out


def plot(path: str, doc: dict) -> None:
    """Total-time p50 / p95 / p99 against the offered load (fraction of capacity), with 2 x p50."""
    from PIL import Image, ImageDraw

    from deqir_dist.apps.figures import _COLOURS, _font
    from deqir_dist.io.files import atomic_write
    runs = sorted((r for r in doc["open_loop"]["runs"] if r["total_ms"]), key=lambda r: r["fraction"])
    W, H, ml, mr, mt, mb = 640, 420, 64, 150, 40, 46
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = _font(12)
    xs = [r["fraction"] for r in runs]
    ys = [r["total_ms"][q] for r in runs for q in ("p50", "p95", "p99")] + \
         [2 * r["total_ms"]["p50"] for r in runs] + [r["md1_reference_ms"]["p99"] for r in runs
                                                     if "md1_reference_ms" in r]
    xmax, ymax = max(1.0, max(xs) * 1.05), max(ys) * 1.08
    px0, py0, px1, py1 = ml, mt, W - mr, H - mb

    def X(v):
        return px0 + v / xmax * (px1 - px0)

    def Y(v):
        return py1 - v / ymax * (py1 - py0)
    d.rectangle((px0, py0, px1, py1), outline="black")
    d.text((ml, 8), f"open loop (Poisson arrivals), {doc['model']}, N = {doc['steps']}, P = {doc['ranks']}; "
                    f"capacity {doc['open_loop']['capacity_rps']:g} req/s", fill="black", font=font)
    step = 10 ** np.floor(np.log10(ymax / 5))
    step = next(m * step for m in (1, 2, 5, 10) if m * step >= ymax / 6)
    v = 0.0
    while v <= ymax:
        d.line((px0 - 3, Y(v), px0, Y(v)), fill="black")
        d.text((4, Y(v) - 6), f"{v:g}", fill="black", font=font)
        v += step
    for f in np.arange(0, xmax + 1e-9, 0.25):
        d.line((X(f), py1, X(f), py1 + 3), fill="black")
        d.text((X(f) - 10, py1 + 5), f"{f:g}", fill="black", font=font)
    d.text((px0 + 60, H - 18), "offered load / capacity (closed-loop throughput)", fill="black", font=font)
    d.text((4, mt - 16), "total ms", fill=(90, 90, 90), font=font)
    series = [(q, [(r["fraction"], r["total_ms"][q]) for r in runs]) for q in ("p50", "p95", "p99")]
    series.append(("2 x p50", [(r["fraction"], 2 * r["total_ms"]["p50"]) for r in runs]))
    md1 = [(r["fraction"], r["md1_reference_ms"]["p99"]) for r in runs if "md1_reference_ms" in r]
    if md1:
        series.append(("M/D/1 p99", md1))
    for c, (label, pts) in enumerate(series):
        col = (150, 150, 150) if label == "2 x p50" else _COLOURS[c]
        xy = [(X(a), Y(b)) for a, b in pts]
        if label in ("2 x p50", "M/D/1 p99"):
            for (xa, ya), (xb, yb) in zip(xy, xy[1:]):
                for t in np.arange(0, 1, 0.1):
                    d.line((xa + (xb - xa) * t, ya + (yb - ya) * t, xa + (xb - xa) * (t + 0.05),
                            ya + (yb - ya) * (t + 0.05)), fill=col, width=2)
        elif len(xy) > 1:
            d.line(xy, fill=col, width=2)
        for p in xy:
            d.ellipse((p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3), fill=col)
        d.line((px1 + 12, py0 + 14 + 18 * c, px1 + 32, py0 + 14 + 18 * c), fill=col, width=2)
        d.text((px1 + 38, py0 + 8 + 18 * c), label, fill="black", font=font)
    check = doc["open_loop"].get("half_capacity_check")
    if check:
        d.text((px1 + 12, py0 + 110), f"at 0.5x: p99/p50 = {check['p99_over_p50']:g}", fill="black", font=font)
        d.text((px1 + 12, py0 + 126), "(<= 2: " + ("holds)" if check["holds"] else "does not hold)"), fill="black",
               font=font)
    atomic_write(Path(path), lambda fh: img.save(fh, format="PNG"))


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
    ap.add_argument("--rates", help="open loop: Poisson arrival rates, comma-separated, in req/s (0.5,1) or as "
                                    "fractions of the closed-loop capacity (0.25x,0.5x)")
    ap.add_argument("--open-requests", type=int, default=40, help="requests per open-loop rate (default 40)")
    ap.add_argument("--seed", type=int, default=0, help="the arrival processes' seed (default 0)")
    ap.add_argument("--plot", help="open loop: write a PNG of the latency percentiles against the offered load")
    ap.add_argument("--json", required=True)
    ap.add_argument("server_flags", nargs="*", help="more deqir serve flags (after --)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deqir-serve-load-"))
    files = measurements(work, args.images, args.size)
    flags = ["--steps", str(args.steps), "--threads", "1", "--ranks", str(args.ranks), "--max-batch",
             str(args.max_batch), "--plan", args.plan,
             "--max-queue", str(max(4 * max(args.clients), 64 if args.rates else 0)),
             *(["--emulate-cost", args.emulate_cost] if args.emulate_cost else []), *args.server_flags]
    env = dict(os.environ, PYTHONPATH=str(ROOT), DEQIR_CACHE_DIR=str(work / "cache"), OMP_NUM_THREADS="1")
    rates = parse_rates(args.rates) if args.rates else []
    open_doc = None
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc, port = start(flags, env)
    startup = time.perf_counter() - t0
    try:
        for f in files[:2]:
            post(port, f, f"warm-{f.name}")
        runs = [closed_loop(port, files, c, args.requests) for c in args.clients]
        if rates:
            capacity = max(r["throughput_rps"] for r in runs)
            one = [r for r in runs if r["total_ms"]]
            # HTTP, decoding and encoding around the solve, from the least loaded closed-loop run
            overhead_ms = max(0.0, min(r["total_ms"]["p50"] - r["queue_ms"]["p50"] - r["solve_ms"]["p50"] for r in one))
            sweep = []
            for i, (kind, v) in enumerate(rates):
                rate = v * capacity if kind == "fraction" else v
                r = open_loop(port, files, rate, args.open_requests, args.seed + i, f"o{i}")
                r["fraction"] = round(rate / capacity, 4)
                if r["solve_ms"]:               # the yardstick at this rate's own speed (a shared machine drifts)
                    service_ms = r["solve_ms"]["p50"] + overhead_ms
                    if rate * service_ms / 1e3 < 0.98:
                        r["md1_reference_ms"] = md1_reference(rate, service_ms)
                sweep.append(r)
                print(f"open loop {rate:.3f} req/s ({r['fraction']:g} x capacity): total p50/p95/p99 "
                      f"{r['total_ms'].get('p50')}/{r['total_ms'].get('p95')}/{r['total_ms'].get('p99')} ms, "
                      f"{r['throughput_rps']} req/s done, failed {r['failed']}", flush=True)
            open_doc = {"capacity_rps": capacity, "capacity_from": "the highest closed-loop throughput above "
                        f"(C in {args.clients})", "requests_per_rate": args.open_requests, "seed": args.seed,
                        "total_from": "the scheduled arrival", "overhead_ms": round(overhead_ms, 1),
                        "md1_note": "md1_reference_ms: an ideal one-at-a-time FIFO server (M/D/1) at the same "
                                    "rate whose service time is that rate's solve p50 + overhead_ms (none: "
                                    "utilisation >= 0.98)",
                        "runs": sweep,
                        "half_capacity_check": half_capacity_check(capacity, sweep)}
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
    if open_doc is not None:
        out["open_loop"] = open_doc
    write_json(args.json, out)
    if args.plot and open_doc is not None:
        plot(args.plot, out)
    for r in runs:
        print(f"C={r['clients']}: {r['throughput_rps']} req/s, total p50/p95/p99 {r['total_ms'].get('p50')}/"
              f"{r['total_ms'].get('p95')}/{r['total_ms'].get('p99')} ms, batches {r['batch_sizes']}, "
              f"failed {r['failed']}")


if __name__ == "__main__":
    main()

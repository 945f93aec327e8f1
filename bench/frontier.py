"""The quality / speed frontier of a prior's sampler settings (issue 22, item 4).

Joins a settings scan (``bench/settings_scan.py``: mean PSNR against the ground truth on the tuning
crops, 8-bit measurements, per task, N and etw) with parareal runs (``bench/parareal.py``: K on
every image and the modelled pipelined speed-up over serial, per task, N and etw) and, for each task,
reports every (N, etw) with both, the best quality overall, and the best quality among the settings
where parareal pays on the task's worst image (modelled speed-up >= ``--pays``).

    python bench/frontier.py --scan bench/results/settings-scan-round1-cpu.json \\
        --parareal bench/results/parareal-builtin-cpu.json bench/results/parareal-etw-round1-cpu.json \\
        --json bench/results/frontier-round1-cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deqir_dist.io.jsonio import write_json  # noqa: E402


def load(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def frontier(scan: dict, runs: list[dict], pays: float) -> dict:
    """{task: {"settings": [...], "best": ..., "best_paying": ...}} from a scan and parareal runs."""
    speed = {}
    for run in runs:
        for c in run["cases"]:
            key = (c["task"], int(c["steps"]), round(float(c["etw"]), 3))
            speed[key] = {"blocks": c["blocks"], "K_max": c["final"]["K_max"],
                          "min_speedup": round(c["final"]["min_speedup"], 3),
                          "worst_psnr_vs_serial": round(c["final"]["worst_psnr"], 1)}
    out = {}
    for task, row in scan["tasks"].items():
        settings = []
        for label, q in row["prior"].items():
            n, etw = (part.split("=")[1] for part in label.split())
            key = (task, int(n), round(float(etw), 3))
            settings.append({"steps": int(n), "etw": float(etw), "psnr": q["psnr"], "ssim": q["ssim"],
                             **({"parareal": speed[key]} if key in speed else {})})
        timed = [s for s in settings if "parareal" in s]
        paying = [s for s in timed if s["parareal"]["min_speedup"] >= pays]
        best = max(settings, key=lambda s: s["psnr"])
        out[task] = {"baseline": row["baseline"], "baseline_psnr": row["baseline_psnr"], "settings": settings,
                     "best": best, "best_paying": max(paying, key=lambda s: s["psnr"]) if paying else None,
                     "best_pays": "parareal" in best and best["parareal"]["min_speedup"] >= pays}
    return out


def table(result: dict) -> str:
    lines = ["| task | N | etw | PSNR (dB) | parareal B / K (worst) | modelled speed-up (worst image) |",
             "|---|---|---|---|---|---|"]
    for task, r in result.items():
        for s in sorted(r["settings"], key=lambda s: (s["steps"], s["etw"])):
            p = s.get("parareal")
            mark = " (best)" if s is r["best"] else (" (best paying)" if s is r["best_paying"] else "")
            lines.append(f"| {task} | {s['steps']} | {s['etw']:g} | {s['psnr']:.2f}{mark} | "
                         + (f"{p['blocks']} / {p['K_max']} | {p['min_speedup']:.2f}x |" if p else "- | - |"))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scan", required=True, help="bench/settings_scan.py's JSON")
    p.add_argument("--parareal", nargs="+", required=True, help="bench/parareal.py JSONs (same weights)")
    p.add_argument("--pays", type=float, default=1.25,
                   help="the worst image's modelled speed-up at which parallel sampling counts as paying")
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    scan, runs = load(a.scan), [load(f) for f in a.parareal]
    weights = {scan.get("weights")} | {r.get("weights") for r in runs}
    if len(weights) > 1:
        print(f"frontier.py: the scan and the parareal runs used different weights: {sorted(map(str, weights))}",
              file=sys.stderr)
        return 2
    result = frontier(scan, runs, a.pays)
    write_json(a.json, {"command": "python bench/frontier.py " + " ".join(sys.argv[1:] if argv is None else argv),
                        "weights": scan.get("weights"), "pays": a.pays, "scan": a.scan, "parareal": a.parareal,
                        "tasks": result})
    print(table(result))
    for task, r in result.items():
        b, bp = r["best"], r["best_paying"]
        print(f"{task}: best {b['psnr']:.2f} dB at N={b['steps']} etw={b['etw']:g}"
              + (" (parareal pays there)" if r["best_pays"] else "")
              + (f"; best where parareal pays {bp['psnr']:.2f} dB at N={bp['steps']} etw={bp['etw']:g} "
                 f"({bp['parareal']['min_speedup']:.2f}x)" if bp else "; parareal pays at no scanned setting"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

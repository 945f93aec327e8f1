"""Parareal stopping rules replayed on recorded traces: how safe and how tight each would be (issue 15).

``bench/parareal.py`` records, per image, the final state's PSNR against serial after every
iteration k (k = 0 is the coarse pass) and the stopping quantity q_k = PSNR(U_B^k, U_B^{k-1}).
A rule that sees only q_1..q_k is replayed on those traces without running the sampler again:

* ``change >= t``: stop at the first k with q_k >= t (the shipped rule, t = 40 dB);
* ``change >= t or extrapolated``: also stop when q_k rose since q_{k-1} by d > 0 and
  q_k + g d >= t_e (q_k estimates the error of U^{k-1}; the rise says how fast it shrinks).

For each rule: images below 40 dB from serial at the stop (safety), the worst image, and how
many stop more than one iteration past the oracle bound, counted two ways: K40 = the first k at
which the image is >= 40 dB, and K40 stable = the first k from which it stays >= 40 dB (PSNR vs
serial is not monotone in k at etw = 0.8, so an image can dip below 40 after the first crossing:
no rule that cannot see serial can stop at such a crossing). Any rule stops at k >= 1.

    python bench/parareal_stop_rules.py --json bench/results/parareal-stop-rules-cpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deqir_dist.io.jsonio import write_json

RESULTS = Path(__file__).resolve().parent / "results"
TRACES = ("parareal-builtin-cpu.json", "parareal-builtin-B6-7-10-cpu.json", "parareal-analytic-cpu.json")


def rule(t: float, g: float = 0.0, te: float = 40.0):
    """The stopping decision after iteration k from q_1..q_k (None: the state did not change)."""
    def stop(qs: list) -> bool:
        qk = qs[-1]
        if qk is None or qk >= t:
            return True
        if g > 0 and len(qs) >= 2 and qs[-2] is not None:
            d = qk - qs[-2]
            return d > 0 and qk + g * d >= te
        return False
    return stop


def replay(stop, image: dict, blocks: int) -> int:
    """K at which ``stop`` ends this recorded run (K = B is exact: parareal's last iteration)."""
    p, q = image["psnr_vs_serial"], image["q_final"]
    for k in range(1, len(p)):
        if k >= blocks or stop(q[1:k + 1]):
            return k
    return len(p) - 1


def oracle_bounds(p: list) -> tuple[int, int]:
    """(first k at >= 40 dB, first k from which every later k stays >= 40 dB)."""
    first = next((k for k, v in enumerate(p) if v >= 40), len(p) - 1)
    stable = next((k for k in range(len(p)) if all(v >= 40 for v in p[k:])), len(p) - 1)
    return first, stable


def evaluate(stop, runs) -> dict:
    unsafe = late_first = late_stable = 0
    worst, ks = float("inf"), 0
    for case, image in runs:
        p = image["psnr_vs_serial"]
        k = replay(stop, image, case["blocks"])
        ks += k
        worst = min(worst, p[k])
        unsafe += p[k] < 40
        first, stable = oracle_bounds(p)
        late_first += k - first > 1
        late_stable += k - stable > 1
    return {"images": len(runs), "below_40dB": unsafe, "worst_psnr_vs_serial": round(worst, 2),
            "late_vs_K40": late_first, "late_vs_K40_stable": late_stable, "mean_K": round(ks / len(runs), 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--traces", default=",".join(TRACES), help="bench/results files written by bench/parareal.py")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    runs, by_file = [], {}
    for name in args.traces.split(","):
        data = json.loads((RESULTS / name).read_text())
        mine = [(c, im) for c in data["cases"] for im in c["images"]]
        by_file[name] = mine
        runs += mine
    rules = {"change >= 40 (shipped)": rule(40.0)}
    for t in (36.0, 37.0, 38.0, 39.0):
        rules[f"change >= {t:g}"] = rule(t)
    for g in (0.25, 0.5, 0.75, 1.0):
        rules[f"change >= 40 or q + {g:g} d >= 40"] = rule(40.0, g, 40.0)
    out = {"command": "python bench/parareal_stop_rules.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "traces": args.traces.split(","), "rules": {}}
    for name, stop in rules.items():
        out["rules"][name] = {"all": evaluate(stop, runs),
                              **{f: evaluate(stop, r) for f, r in by_file.items()}}
        a = out["rules"][name]["all"]
        print(f"{name:36s} below 40 dB {a['below_40dB']:3d}/{a['images']}  worst {a['worst_psnr_vs_serial']:6.2f}  "
              f"late vs K40 {a['late_vs_K40']:3d}  vs stable K40 {a['late_vs_K40_stable']:3d}  mean K {a['mean_K']}")
    write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

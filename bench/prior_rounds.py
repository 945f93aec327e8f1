"""The built-in prior's training curve over rounds (issue 22, item 3): held-out eps-MSE and quality.

Each round is a weights card written by ``deqir train-prior`` (its ``validation.eps_mse`` on the
held-out crops, its wall minutes) and a ``bench/defaults_quality.py`` JSON of the same weights on
the 11 held-out photographs (8-bit, whole, 64 px, the card's settings). The x axis is the
training lineage's cumulative wall minutes on one core. Writes a JSON table and a PNG.

    python bench/prior_rounds.py --json bench/results/prior-rounds-cpu.json --plot docs/prior_rounds.png
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
R = ROOT / "bench" / "results"
# (label, card or None, quality JSON, cumulative lineage minutes: the cards' lineage / wall_seconds)
ROUNDS = [
    ("previous prior", None, "defaults-quality-11photos-shipped-cpu.json", 31.7),
    ("round 1 (shipped)", "prior-round1/builtin.json", "defaults-quality-11photos-round1-cpu.json", 126.7),
    ("round 2", "prior-round2/builtin.json", "defaults-quality-11photos-round2-cpu.json", None),
    ("round 3", "prior-round3/builtin.json", "defaults-quality-11photos-round3-cpu.json", None),
    ("round 4a (2 blocks)", "prior-round4a/builtin.json", "defaults-quality-11photos-round4a-cpu.json", None),
]
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def table() -> list[dict]:
    rows, minutes = [], 0.0
    for label, card, quality, cum in ROUNDS:
        q = json.loads((R / quality).read_text())
        row = {"round": label, "quality_json": quality,
               "prior_minus_best_db": {k.split("/")[0]: v["prior_minus_best_db"] for k, v in q["results"].items()},
               "prior_psnr": {k.split("/")[0]: v["methods"]["prior (defaults)"]["psnr"] for k, v in q["results"].items()}}
        if card:
            c = json.loads((R / card).read_text())
            row["card"] = card
            row["eps_mse_t25"] = c["validation"]["eps_mse"]["25"]
            row["wall_minutes"] = round(c["training"]["wall_seconds"] / 60, 1)
            row["weights_sha256"] = c["weights"]["sha256"]
        minutes = cum if cum is not None else minutes + row["wall_minutes"]
        row["lineage_minutes"] = round(minutes, 1)
        rows.append(row)
    return rows


def plot(path: str, rows: list[dict]) -> None:
    W, H = 980, 420
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 6), "built-in prior over training rounds (11 held-out photographs, 8-bit, card settings)",
           fill="black")
    tasks = list(rows[0]["prior_minus_best_db"])
    panels = [("held-out eps-MSE at t = 25", [("eps-MSE", [(r["lineage_minutes"], r["eps_mse_t25"])
                                                          for r in rows if "eps_mse_t25" in r])], None),
              ("prior minus best baseline (dB)", [(t, [(r["lineage_minutes"], r["prior_minus_best_db"][t])
                                                       for r in rows]) for t in tasks], 0.0)]
    xmax = max(r["lineage_minutes"] for r in rows) * 1.05
    for p, (title, series, hline) in enumerate(panels):
        x0, y0, x1, y1 = 20 + p * 480, 30, 20 + p * 480 + 440, H - 40
        px0, py0, px1, py1 = x0 + 50, y0 + 20, x1 - 10, y1 - 20
        d.rectangle((px0, py0, px1, py1), outline="black")
        d.text((px0, y0 + 2), title, fill="black")
        ys = [v for _, s in series for _, v in s] + ([hline] if hline is not None else [])
        lo, hi = min(ys), max(ys)
        lo, hi = lo - 0.08 * (hi - lo), hi + 0.08 * (hi - lo)

        def X(v):
            return px0 + v / xmax * (px1 - px0)

        def Y(v):
            return py1 - (v - lo) / (hi - lo) * (py1 - py0)
        for k in range(5):
            v = lo + (hi - lo) * (k + 0.5) / 5
            d.text((x0, Y(v) - 6), f"{v:.4g}", fill="black")
        for v in range(0, int(xmax) + 1, 50):
            d.line((X(v), py1, X(v), py1 + 3), fill="black")
            d.text((X(v) - 8, py1 + 5), str(v), fill="black")
        d.text(((px0 + px1) // 2 - 90, y1 + 4), "training minutes (one core, cumulative)", fill="black")
        if hline is not None:
            for xs in range(int(px0), int(px1), 8):
                d.line((xs, Y(hline), min(xs + 4, px1), Y(hline)), fill=(120, 120, 120))
        for c, (label, s) in enumerate(series):
            col = COLOURS[c % len(COLOURS)]
            pts = [(X(a), Y(b)) for a, b in s]
            if len(pts) > 1:
                d.line(pts, fill=col, width=2)
            for q in pts:
                d.ellipse((q[0] - 3, q[1] - 3, q[0] + 3, q[1] + 3), fill=col)
            if len(series) > 1:
                d.text((px0 + 60, py0 + (py1 - py0) * 0.24 + 14 * c), label, fill=col)
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True)
    p.add_argument("--plot")
    args = p.parse_args(argv)
    rows = table()
    doc = {"command": "python bench/prior_rounds.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "rounds": rows}
    Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
    if args.plot:
        plot(args.plot, rows)
    for r in rows:
        print(f"{r['round']:22s} {r['lineage_minutes']:6.1f} min  eps-MSE {r.get('eps_mse_t25', float('nan')):.4f}  "
              + "  ".join(f"{t} {v:+.2f}" for t, v in r["prior_minus_best_db"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tiles vs the whole canvas: quality and seams (issue 25; models/tiled.py argues the method).

On held-out photographs small enough to restore whole, each is restored four ways with the same
noise: whole; one chain with the tiles' eps blended every step (``TiledDenoiser``, the default)
at two tile sizes; and the simple alternative, every tile its own chain on its crop of the
measurement, the outputs feathered with the same ramps ("independent"). Reported: PSNR against
the ground truth, and the seam ratio: the mean |horizontal / vertical difference| of the error
(restored - truth) across the lines where tiles start or end, over the same mean elsewhere (1: the
lines look like anywhere else; a visible seam is > 1). The whole restore is scored on the same
lines as the tiled one it is compared with.

    python bench/tiles.py --json bench/results/tiles-builtin-cpu.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from deqir_dist.api.restore import restore
from deqir_dist.data.photos import read_heldout_png, to_tensor
from deqir_dist.models import load_denoiser
from deqir_dist.models.builtin import BUILTIN_WEIGHTS
from deqir_dist.models.tiled import TiledDenoiser, _ramp
from deqir_dist.physics.registry import make_operator
from deqir_dist.quality.metrics import psnr


def seam_ratio(err: torch.Tensor, lines_y: list[int], lines_x: list[int]) -> float:
    """Mean |difference of the error| across the given lines over the mean elsewhere (rows and columns)."""
    e = err[0].mean(0)
    dx = (e[:, 1:] - e[:, :-1]).abs()            # dx[:, c-1]: across the line between columns c-1 and c
    dy = (e[1:, :] - e[:-1, :]).abs()
    cols = sorted({c - 1 for c in lines_x if 0 < c < e.shape[1]})
    rows = sorted({r - 1 for r in lines_y if 0 < r < e.shape[0]})
    on = torch.cat([dx[:, cols].reshape(-1), dy[rows, :].reshape(-1)])
    mx = torch.ones(dx.shape[1], dtype=torch.bool)
    mx[cols] = False
    my = torch.ones(dy.shape[0], dtype=torch.bool)
    my[rows] = False
    off = torch.cat([dx[:, mx].reshape(-1), dy[my, :].reshape(-1)])
    return float(on.mean() / off.mean())


def tile_lines(td: TiledDenoiser) -> tuple[list[int], list[int]]:
    H, W = td.canvas
    ys = {i for i, _ in td.boxes} | {i + td.th for i, _ in td.boxes}
    xs = {j for _, j in td.boxes} | {j + td.tw for _, j in td.boxes}
    return sorted(v for v in ys if 0 < v < H), sorted(v for v in xs if 0 < v < W)


def independent(model, y, x_shape, task, scale, tile, overlap, steps, seed):
    """Each tile its own chain on its crop of the measurement, outputs feathered with the ramps."""
    td = TiledDenoiser(model, x_shape[-2:], tile, overlap)
    _, C, H, W = x_shape
    acc, tot = torch.zeros(1, C, H, W), torch.zeros(H, W)
    for k, (i, j) in enumerate(td.boxes):
        op = make_operator(task, image_shape=(C, td.th, td.tw), scale=scale)
        yk = y[..., i // scale:(i + td.th) // scale, j // scale:(j + td.tw) // scale]
        r = restore(model, yk, op, steps=steps, solver="serial", tile=0,
                    generator=torch.Generator().manual_seed(seed * 1000 + k))
        w = _ramp(td.th, i, H, overlap, torch.float32)[:, None] * _ramp(td.tw, j, W, overlap, torch.float32)[None]
        acc[..., i:i + td.th, j:j + td.tw] += w * r.images
        tot[i:i + td.th, j:j + td.tw] += w
    return acc / tot


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=192, help="side of the central crop restored (default 192)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--tiles", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--task", default="sr_bicubic")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_denoiser("builtin")
    from safetensors import safe_open
    with safe_open(str(BUILTIN_WEIGHTS), framework="pt") as f:
        photos = read_heldout_png(f.metadata()["deqir_heldout_png"])
    rows = []
    for seed, (name, img) in enumerate(sorted(photos.items())):
        x = to_tensor(img)
        h0, w0 = (x.shape[1] - args.size) // 2, (x.shape[2] - args.size) // 2
        x = x[:, h0:h0 + args.size, w0:w0 + args.size][None].contiguous()
        op = make_operator(args.task, image_shape=tuple(x.shape[1:]), scale=args.scale)
        y = op.A(x)
        t0 = time.perf_counter()
        whole = restore(model, y, op, steps=args.steps, solver="serial", tile=0,
                        generator=torch.Generator().manual_seed(seed)).images
        t_whole = time.perf_counter() - t0
        for tile in args.tiles:
            overlap = tile // 4
            lines = tile_lines(TiledDenoiser(model, x.shape[-2:], tile, overlap))
            t0 = time.perf_counter()
            blended = restore(model, y, op, steps=args.steps, solver="serial", tile=tile,
                              generator=torch.Generator().manual_seed(seed)).images
            t_blend = time.perf_counter() - t0
            t0 = time.perf_counter()
            indep = independent(model, y, x.shape, args.task, args.scale, tile, overlap, args.steps, seed)
            t_indep = time.perf_counter() - t0
            for method, out, secs in (("whole", whole, t_whole), ("blended every step", blended, t_blend),
                                      ("independent, feathered", indep, t_indep)):
                rows.append({"image": name, "tile": tile, "overlap": overlap, "method": method,
                             "psnr": round(float(psnr(out, x)[0]), 3),
                             "seam_ratio": round(seam_ratio(out - x, *lines), 3),
                             "psnr_vs_whole": None if method == "whole" else round(float(psnr(out, whole)[0]), 3),
                             "seconds": round(secs, 2)})
                print(json.dumps(rows[-1]), flush=True)
    summary = {}
    for r in rows:
        s = summary.setdefault(f"{r['method']} @ {r['tile']}", {"psnr": [], "seam_ratio": []})
        s["psnr"].append(r["psnr"])
        s["seam_ratio"].append(r["seam_ratio"])
    summary = {k: {m: round(float(np.mean(v)), 3) for m, v in d.items()} for k, d in summary.items()}
    out = {"command": "python bench/tiles.py " + " ".join(argv or __import__("sys").argv[1:]),
           "model": "builtin", "task": args.task, "scale": args.scale, "size": args.size, "steps": args.steps,
           "measurement": "float A(x), no noise (a comparison of tilings, not a quality claim)",
           "threads": args.threads, "loadavg_end": [round(v, 2) for v in __import__("os").getloadavg()], "torch": torch.__version__, "rows": rows, "mean": summary}
    print(json.dumps(summary, indent=1))
    if args.json:
        from deqir_dist.io.jsonio import write_json
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

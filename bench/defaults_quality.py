"""Quality at the library's defaults on the built-in prior's held-out photographs (issue 16).

What a user gets with no sampler flag: the model card's settings (``models.settings``), sigma_y
from the measurement's bit depth (0 for a float measurement, 2 / (255 sqrt(12)) for 8-bit), any
size padded to the model's multiple. Measured on the held-out photographs (never trained on):
whole photos downscaled to a short side of ``--whole`` px (their own aspect ratio, so sizes that
are not multiples of 4 occur) and ``--crops`` 64x64 crops (``builtin_bench_images(4 + n, 64)[4:]``:
the first 4 crops chose NOISE_KEEP, so they are left out here). Every classical baseline of
``quality.baselines`` is reported beside the prior, per task, from float and from 8-bit
measurements (y rounded to 8 bits as an 8-bit PNG stores it).

The sampler is the serial reference (``solver="serial"``): the parallel solvers' fixed point is
the same trajectory, to within their stopping tolerance, and cost about N times more on a CPU.

    python bench/defaults_quality.py --json bench/results/defaults-quality-cpu.json
"""
from __future__ import annotations

import argparse
import hashlib
import io
import re
import sys
import time

import numpy as np
import torch
from PIL import Image

from deqir_dist.api.restore import restore
from deqir_dist.data.photos import (
    heldout_crops,
    resize_short,
    stored_photo_folder,
    to_tensor,
)
from deqir_dist.dataset.tasks import DEMO_TASKS, measurable
from deqir_dist.io.jsonio import write_json
from deqir_dist.io.quantization import JPEG_SIGMA, default_sigma_y
from deqir_dist.models.builtin import builtin_bench_images, heldout_images, load_builtin
from deqir_dist.physics.registry import make_operator
from deqir_dist.quality.baselines import baselines_for
from deqir_dist.quality.metrics import psnr, ssim


def _sha256(path) -> str | None:
    return hashlib.sha256(open(path, "rb").read()).hexdigest() if path else None


def quantize8(y: torch.Tensor) -> torch.Tensor:
    """y as an 8-bit PNG stores it (clamped to [-1, 1], 255 levels)."""
    return (((y + 1) / 2).clamp(0, 1) * 255).round() / 255 * 2 - 1


def jpeg(y: torch.Tensor, quality: int) -> torch.Tensor:
    """y written as an RGB JPEG by Pillow at ``quality`` and decoded again."""
    out = []
    for im in y:
        a = (((im + 1) / 2).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as j:
            out.append(torch.from_numpy(np.array(j.convert("RGB"))).permute(2, 0, 1).double() / 255 * 2 - 1)
    return torch.stack(out).float()


def evaluate(model, images: list[torch.Tensor], task: str, bits, seed: int, names=None, keep=None) -> dict:
    """Mean PSNR / SSIM of the prior (library defaults) and of every baseline over ``images``."""
    op_name, params = DEMO_TASKS[task]
    scores: dict[str, list] = {}
    settings = None
    for k, x in enumerate(images):
        x = measurable(x, task)         # SR x4: the whole photo cropped to a multiple of 4 (a few px)
        op = make_operator(op_name, tuple(x.shape), **params)
        y = op.A(x[None])
        if bits == 8:
            y = quantize8(y)
        if isinstance(bits, str) and bits.startswith("jpeg"):
            y, sigma_y = jpeg(y, int(bits[4:])), JPEG_SIGMA     # what default_sigma_y gives a JPEG file
        else:
            sigma_y = default_sigma_y(y)[0]
        res = restore(model, y, op, solver="serial", sigma_y=sigma_y, value_range=(-1, 1),
                      generator=torch.Generator().manual_seed(seed + k))
        settings = {**res.settings, "source": res.settings_source}
        cands = {"prior (defaults)": res.images, **{n: e.clamp(-1, 1) for n, e in baselines_for(op, y).items()}}
        for name, est in cands.items():
            scores.setdefault(name, []).append((float(psnr(est, x[None])[0]), float(ssim(est, x[None])[0])))
        if keep is not None:
            keep.append((x, {n: e[0].clamp(-1, 1) for n, e in cands.items()}))
    out = {name: {"psnr": round(sum(p for p, _ in v) / len(v), 3), "ssim": round(sum(s for _, s in v) / len(v), 4)}
           for name, v in scores.items()}
    base = {n: v for n, v in out.items() if n != "prior (defaults)"}
    best = max(base, key=lambda n: base[n]["psnr"])
    prior = out["prior (defaults)"]
    per_image = [{"image": names[k] if names else k, "prior_psnr": round(scores["prior (defaults)"][k][0], 3),
                  "best_baseline_psnr": round(scores[best][k][0], 3),
                  "prior_minus_best_db": round(scores["prior (defaults)"][k][0] - scores[best][k][0], 3)}
                 for k in range(len(images))]
    return {"methods": out, "best_baseline": best, "prior_minus_best_db": round(prior["psnr"] - base[best]["psnr"], 3),
            "prior_beats_best": prior["psnr"] > base[best]["psnr"],
            "images_won": sum(r["prior_minus_best_db"] > 0 for r in per_image), "per_image": per_image,
            "settings": settings}


def gallery(path: str, kept: dict, result: dict) -> str:
    """The failure gallery: for each task, its worst whole photograph (prior minus best baseline, dB)."""
    from deqir_dist.apps.figures import draw_grid
    rows, names, caps = [], [], []
    for key, cases in kept.items():
        if not cases or key.split("/")[1] != next(iter(kept)).split("/")[1]:
            continue
        r = result["results"][key]
        k = min(range(len(cases)), key=lambda i: r["per_image"][i]["prior_minus_best_db"])
        x, est = cases[k]
        pi = r["per_image"][k]
        rows.append([x, est[r["best_baseline"]], est["prior (defaults)"]])
        short = re.sub(r"^(lomiri_wallpapers_16_04_|mate_backgrounds_mate_(nature_)?|plasma_workspace_wallpapers_|"
                       r"ukui_wallpapers_)", "", str(pi["image"]))
        names.append(f"{key.split('/')[0]}: {short[:22]}")
        caps.append(["", f"{r['best_baseline']} {pi['best_baseline_psnr']:.1f}", f"prior {pi['prior_psnr']:.1f} "
                     f"({pi['prior_minus_best_db']:+.1f})"])
    draw_grid(path, "worst held-out photo per task (PSNR dB vs the truth)", ["truth", "best baseline",
              "prior (defaults)"], rows, names, caps, zoom=2)
    return "per task, the whole held-out photograph with the lowest prior minus best-baseline PSNR"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--crops", type=int, default=6, help="64x64 held-out crops (default 6; 0: none)")
    p.add_argument("--whole", type=int, default=64, help="short side of the whole photos (default 64)")
    p.add_argument("--tasks", default=",".join(DEMO_TASKS))
    p.add_argument("--measurements", default="float,8bit",
                   help="comma list of float, 8bit, jpegQ (a JPEG of quality Q; default float,8bit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", help="a prior written by deqir train-prior (default: the shipped one)")
    p.add_argument("--heldout-from", help="take the held-out photographs from this weights file (default: "
                                          "--weights), so two priors can be compared on the same photographs")
    p.add_argument("--heldout-dir", help="take the held-out photographs from this folder of PNGs instead (e.g. "
                                         "bench/prior_data.py's heldout/: scikit-image's pair plus held-out "
                                         "wallpaper photos), stored as the weights file stores them")
    p.add_argument("--json", required=True)
    p.add_argument("--gallery", help="PNG: per task, the whole photograph where the prior does worst against the "
                                     "best baseline (first --measurements kind): truth, baseline, prior")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_builtin(path=args.weights)
    photos = args.heldout_from or args.weights
    if args.heldout_dir:
        held = stored_photo_folder(args.heldout_dir)
        crops = heldout_crops(held, 64, 4 + args.crops)[4:]
    else:
        held = heldout_images(photos)
        crops = builtin_bench_images(4 + args.crops, 64, photos)[4:]
    sets = {"whole": [to_tensor(resize_short(img, args.whole)) for img in held.values()], "crops": list(crops)}
    sets = {k: v for k, v in sets.items() if v}         # --crops 0: whole photographs only
    result = {"command": "python bench/defaults_quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "model": "builtin", "weights": getattr(model, "weights_path", None),
              "weights_sha256": _sha256(getattr(model, "weights_path", None)), "heldout": list(held),
              "whole_sizes": [list(x.shape[1:]) for x in sets["whole"]], "crops": args.crops,
              "sampler": "restore() at the model card's settings, solver serial, sigma_y from the bit depth",
              "torch_threads": args.threads, "results": {}}
    kept: dict = {}
    for task in args.tasks.split(","):
        for meas in args.measurements.split(","):
            bits = {"float": None, "8bit": 8}.get(meas, meas)
            for kind, images in sets.items():
                key = f"{task}/{meas}/{kind}"
                keep = kept.setdefault(key, []) if args.gallery and kind == "whole" else None
                r = evaluate(model, images, task, bits, args.seed, list(held) if kind == "whole" else None, keep)
                result["results"][key] = r
                pr = r["methods"]["prior (defaults)"]
                print(f"{key:34s} prior {pr['psnr']:6.2f} dB {pr['ssim']:.3f}  best {r['best_baseline']:12s} "
                      f"{r['methods'][r['best_baseline']]['psnr']:6.2f} dB  diff {r['prior_minus_best_db']:+.2f}",
                      flush=True)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if args.gallery:
        result["gallery"] = {"file": args.gallery, "rule": gallery(args.gallery, kept, result)}
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

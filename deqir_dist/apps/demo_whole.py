"""The demo's whole-photograph stage: each held-out photograph, downscaled as a whole, restored
at the library's defaults.

Crops show detail; a whole small photo shows what a user sees on their own picture: its own
aspect ratio (a size that need not be a multiple of the model's: ``restore`` pads and crops back),
every task, the best classical baseline beside the prior. Each photograph is resized (Pillow
bicubic, antialiased) to a short side of ``short`` px, degraded noiselessly for each task and
restored as ``restore()`` does with no sampler argument: the model card's settings (steps, etw,
nw, x0 clipping per task), the solver ``auto`` picks. Written: ``grid_whole_<photo>.png``
(one row per task: degraded | best baseline | restored | ground truth, PSNR / SSIM under each)
and the ``whole`` block of ``metrics.json`` (per task and photograph, every baseline's PSNR).
"""
from __future__ import annotations

from pathlib import Path

import torch

from deqir_dist.api.restore import restore
from deqir_dist.apps.figures import display_measurement, draw_grid
from deqir_dist.apps.tables import format_table
from deqir_dist.data.photos import resize_short, to_tensor
from deqir_dist.dataset.tasks import DEMO_TASKS, measurable
from deqir_dist.io.images import write_image
from deqir_dist.physics.registry import make_operator
from deqir_dist.quality.baselines import baselines_for
from deqir_dist.quality.metrics import psnr, ssim

WHOLE_COLUMNS = ("degraded", "baseline", "restored", "truth")


def run_whole(model, held: dict, short: int, tasks, seed: int, out: Path | None, progress: bool = False) -> dict:
    """Restore every photograph in ``held`` (name -> (H, W, 3) uint8) at short side ``short`` for
    every task; returns the ``whole`` block (per-photo rows, per-task means, a table)."""
    photos = {n: to_tensor(resize_short(img, short)) for n, img in held.items()}
    per_task: dict[str, list[dict]] = {}
    grids: dict[str, list] = {n: [] for n in photos}
    for ti, task in enumerate(tasks):
        opname, params = DEMO_TASKS[task]
        for pi, (name, x) in enumerate(photos.items()):
            x = measurable(x, task)[None]       # SR x4: cropped to a multiple of 4 (a few pixels)
            op = make_operator(opname, tuple(x.shape[1:]), **params)
            y = op.A(x)
            cands = {k: v.clamp(-1, 1) for k, v in baselines_for(op, y).items()}
            base_psnr = {k: float(psnr(v, x)[0]) for k, v in cands.items()}
            gen = torch.Generator().manual_seed(seed * 1000 + 100 * ti + pi)
            res = restore(model, y, op, generator=gen, progress=progress)      # the defaults, as a user gets them
            img = res.image.float().cpu().clamp(-1, 1)
            per_task.setdefault(task, []).append({
                "image": name, "shape": list(x.shape[1:]), "solver": res.solver,
                "settings": {k: res.settings[k] for k in ("steps", "etw", "nw", "clip_x0")},
                "psnr_restored": round(float(psnr(img, x)[0]), 3), "ssim_restored": round(float(ssim(img, x)[0]), 4),
                "baselines_psnr": {k: round(v, 3) for k, v in base_psnr.items()},
                "_cands": cands, "_y": y, "_op": op, "_img": img, "_x": x})
    rows, block = [], {"short_side": short, "photographs": list(photos),
                       "sampler": "restore() with no sampler argument: the model card's settings, solver auto",
                       "measurements": "noiseless (float32 y = A x)", "tasks": {}}
    for task, entries in per_task.items():
        # the best baseline per task by mean PSNR over the photographs (an oracle choice, as for the crops)
        names = entries[0]["baselines_psnr"].keys()
        best = max(names, key=lambda k: sum(e["baselines_psnr"][k] for e in entries))
        for e in entries:
            b = e["_cands"][best]
            e["baseline"], e["psnr_baseline"] = best, round(float(psnr(b, e["_x"])[0]), 3)
            e["ssim_baseline"] = round(float(ssim(b, e["_x"])[0]), 4)
            grids[e["image"]].append((task, display_measurement(e["_op"], e["_y"], tuple(e["_x"].shape[-2:]))[0],
                                      b[0], e["_img"][0], e["_x"][0], e))
        mean = {k: round(sum(e[k] for e in entries) / len(entries), 4)
                for k in ("psnr_baseline", "ssim_baseline", "psnr_restored", "ssim_restored")}
        block["tasks"][task] = {"baseline": best, "mean": mean, "settings": entries[0]["settings"],
                                "solver": entries[0]["solver"],
                                "per_image": [{k: v for k, v in e.items() if not k.startswith("_")} for e in entries]}
        st = entries[0]["settings"]
        rows.append({"task": task, "settings": f"N={st['steps']} etw={st['etw']:g}" + (" clip" if st["clip_x0"] else ""),
                     "baseline": best, "psnr_base": mean["psnr_baseline"],
                     "ssim_base": mean["ssim_baseline"], "psnr_prior": mean["psnr_restored"],
                     "ssim_prior": mean["ssim_restored"],
                     "gain_db": round(mean["psnr_restored"] - mean["psnr_baseline"], 2)})
    block["table"] = rows
    if out is not None:
        _write(out, grids)
    return block


def _write(out: Path, grids: dict) -> None:
    """Per photograph: its images under images/whole/ and its captioned grid."""
    d = out / "images" / "whole"
    d.mkdir(parents=True, exist_ok=True)
    for name, cells in grids.items():
        if not cells:
            continue
        rows, caps, labels = [], [], []
        for task, disp, base, img, x, e in cells:
            for col, t in zip(WHOLE_COLUMNS, (disp, base, img, x)):
                write_image(d / f"{name}_{task}_{col}.png", t)
            rows.append([disp, base, img, x])
            caps.append(["", f"{e['baseline']} {e['psnr_baseline']:.2f} / {e['ssim_baseline']:.3f}",
                         f"{e['psnr_restored']:.2f} dB / {e['ssim_restored']:.3f}", ""])
            labels.append(task)
            caps[-1][2] = f"{caps[-1][2]} (N={e['settings']['steps']})"
        h, w = max((c[4].shape[-2:] for c in cells), key=lambda hw: hw[0] * hw[1])
        draw_grid(out / f"grid_whole_{name}.png", f"{name}, whole photograph at {h}x{w}, restored at the "
                  "library's defaults (the model card's settings); PSNR / SSIM under each image; held out",
                  ["degraded", "best baseline", "restored (prior)", "ground truth"], rows, labels, caps,
                  max(1, 192 // min(h, w)))


def format_whole(block: dict) -> str:
    """The whole-photograph table for the terminal."""
    cols = ["task", "settings", "baseline", "psnr_base", "ssim_base", "psnr_prior", "ssim_prior", "gain_db"]
    return (f"whole photographs at the library's defaults ({', '.join(block['photographs'])}; short side "
            f"{block['short_side']} px; the model card's settings):\n" + format_table(block["table"], cols))

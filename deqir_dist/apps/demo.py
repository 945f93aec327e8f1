"""``deqir demo``: what the method does, in pictures, with the built-in prior and no download.

Held-out photographs (never trained on; stored inside the prior's weights file) are resized to a
short side of twice ``--size`` and centre-cropped to ``--size`` x ``--size``. Each crop is degraded
for five tasks (``sr_bicubic`` x4, ``deblur_gauss``, ``inpaint`` with a centred box and with a
random mask, ``colorize``; noiseless measurements, as in DDNM/DeqIR) and restored with the serial
sampler and the parallel sampler (Picard by default) from the same initial noise (defaults: T = 25,
etw = 0.8, nw = 0, tuned on other held-out crops, see ``DEMO_ETW``). Written to ``-o DIR``:

* ``images/<task>/<image>_{degraded,baseline,serial,parallel,truth}.png``: the pictures;
* ``grid_<task>.png``: degraded | best classical baseline | serial | parallel | ground truth,
  one row per image, labelled, with PSNR/SSIM under each cell;
* ``grid_whole_<photo>.png``: each photograph whole, downscaled to a short side of ``--whole``
  (default ``--size``), every task, best baseline | prior | truth, restored at the library's
  defaults (the model card's settings, not the demo's T and etw; ``demo_whole``);
* ``convergence.png``: per parallel iteration, the final image's PSNR against the serial result
  and the stopping quantity (the largest row change in units of its noise level), one line per task;
* ``metrics.json``: every number, including all classical baselines;
* a table on the terminal: PSNR/SSIM per task for the baseline, serial, parallel, and K;
* unless ``--no-inversion``: noise optimisation before / after for one task (random inpainting,
  noisy measurements), with the blind consistency loss and, labelled "oracle", the ground-truth
  loss (an upper bound): ``grid_inversion_<task>_consistency_vs_oracle.png``, the images, the
  ``inversion`` block of ``metrics.json`` and a few terminal lines (``demo_inversion``).

The classical baseline shown is, per task, the best of :mod:`deqir_dist.baselines` by mean PSNR
against the ground truth (an oracle choice that favours the baselines). ``--samples N`` (N > 1)
adds the average of N restorations with independent noise, a Monte-Carlo estimate of the
posterior mean (MMSE), reported separately and labelled as such.
"""
from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deqir_dist.api.restore import check_settings, restore
from deqir_dist.apps.demo_inversion import (
    INVERSION_ITERS,
    format_inversion,
    grid_name,
    run_inversion,
)
from deqir_dist.apps.demo_whole import format_whole, run_whole
from deqir_dist.apps.figures import display_measurement, draw_convergence, draw_grid
from deqir_dist.apps.tables import format_table
from deqir_dist.data.photos import heldout_crops
from deqir_dist.dataset.tasks import DEMO_TASKS
from deqir_dist.errors import DeqirError, check_int
from deqir_dist.io.files import check_dir_creatable, ensure_writable_dir
from deqir_dist.io.images import write_image
from deqir_dist.io.jsonio import write_json
from deqir_dist.models.builtin import (
    BUILTIN_SIZE_MULTIPLE,
    builtin_sampler_card,
    heldout_images,
    load_builtin,
    read_builtin_file,
)
from deqir_dist.physics.registry import make_operator
from deqir_dist.quality.baselines import baselines_for
from deqir_dist.quality.metrics import psnr, ssim
from deqir_dist.sampling.denoiser import resolve_device

# label -> (operator name, operator params)
COLUMNS = ("degraded", "baseline", "serial", "parallel", "truth")
# Sampler knobs of the demo, chosen on 8 held-out crops that are NOT the demo's centre crops
# (builtin_bench_images(10, 64)[2:]), T = 25: etw in {0, 0.5, 0.7, 0.8, 0.9, 0.95} with nw = 0.
# etw = 0 (plain DDIM) leaves visible noise with this small prior (SR x4: 19.0 dB vs 25.8 dB at
# 0.8); 0.9 scored slightly higher but 0.95 collapses (SR 24.5, deblur 35.8 dB), so 0.8 keeps a margin.
# The values live in the model card (weights/builtin.json "sampler"), the one source of truth that
# restore(), the CLI and Ray use too (models.settings); the demo reads them from there.
_CARD = builtin_sampler_card() or {}
DEMO_ETW, DEMO_NW = float(_CARD.get("etw", 0.0)), float(_CARD.get("nw", 0.0))
DEMO_IMAGES = ("chelsea", "coffee")     # the photographs the demo shows (held out from every prior)
DEMO_STOP = "rows"          # the library's default stopping rule
# Tasks restored with x0 clipped to [-1, 1] (``restore(clip_x0=True)``; DDNM/DeqIR do not clip).
# ``deqir demo --clip all`` against the default: colorize 7.65 -> 16.03 dB (unclipped, the chroma
# of the null space runs away with this prior), box inpainting 22.30 -> 20.66, random 30.90 ->
# 30.71, SR SSIM 0.722 -> 0.704, deblurring +0.4 dB, and K = N everywhere: so colorize only.
_CLIP = _CARD.get("clip_x0", False)
DEMO_CLIP = frozenset(t for t, (name, _) in DEMO_TASKS.items()
                      if (_CLIP.get(name, _CLIP.get("default", False)) if isinstance(_CLIP, dict) else _CLIP))


# ----------------------------------------------------------------------------- the demo

def _mean(v):
    v = [x for x in v if x is not None]
    return sum(v) / len(v) if v else None


@dataclass(frozen=True)
class _Sampler:
    """The demo's sampler settings, shared by every task."""
    steps: int
    solver: str
    stop_tol: float | None
    etw: float
    nw: float
    samples: int
    seed: int
    warm_start: int
    progress: bool


def run_demo(out_dir="demo-out", size: int = 64, images=None, crops: int = 1, tasks=None, steps: int = 25,
             solver: str = "picard", stop_tol: float | None = None, etw: float = DEMO_ETW, nw: float = DEMO_NW,
             samples: int = 1, seed: int = 0, model=None, weights=None, device=None, progress: bool = True,
             write: bool = True, warm_start: int = 1, inversion: bool = True,
             inversion_iters: int | None = None, clip: str = "auto", json_path=None,
             whole: int | None = None) -> dict:
    """Run the demo; returns the metrics dict (also written to ``out_dir/metrics.json``).

    ``model``: a denoiser (default: the built-in prior, or the prior in ``weights``);
    ``images``: held-out photograph names (default ``DEMO_IMAGES`` where the prior stores them, else
    all stored ones); ``crops`` per photograph;
    ``inversion``: add the noise-optimisation stage (``inversion_iters`` gradient evaluations per
    loss, default ``demo_inversion.INVERSION_ITERS``); ``clip``: which tasks clip x0 ("auto":
    ``DEMO_CLIP``, "all", "none"); ``json_path``: also write the metrics there (missing parent
    folders are created, as ``deqir restore --json`` does). ``device``: checked before any work
    (a name torch knows, and present here). ``whole``: also restore each photograph whole at this
    short side (default: ``size``; 0: skip; ``demo_whole``).

    Every setting, the model and the output locations are checked before the first image is
    restored; nothing is written when one of them is wrong.
    """

    t_all = time.perf_counter()
    device = None if device is None else resolve_device(device)
    tasks, clipped_tasks, inversion_iters = _check_settings(tasks, clip, size, crops, samples, inversion_iters)
    whole = size if whole is None else check_int("whole", whole, 0)
    if 0 < whole < 8:
        raise DeqirError(f"whole (the short side of the whole photographs) must be 0 (off) or >= 8, got {whole}")
    check_settings(steps, solver, 1000, etw, nw, 0.0, DEMO_STOP, stop_tol, None, warm_start=warm_start)
    s = _Sampler(steps, solver, stop_tol, etw, nw, samples, seed, warm_start, progress)
    held = heldout_images(weights)
    if not images and all(n in held for n in DEMO_IMAGES):
        images = list(DEMO_IMAGES)      # a prior may store more held-out photographs than the demo shows
    if images:
        missing = [n for n in images if n not in held]
        if missing:
            raise DeqirError(f"no held-out image {', '.join(missing)}; available: {', '.join(held)}")
        held = {n: held[n] for n in images}
    names = [f"{n}" if crops == 1 else f"{n}-{j}" for j in range(crops) for n in held]
    x = heldout_crops(held, size, len(held) * crops)
    model, model_name, card_info = _demo_model(model, device, weights)
    out = Path(out_dir)
    json_file = _check_outputs(out, json_path, write)
    result = {"command": "demo", "model": model_name, **card_info, "size": size, "images": names,
              "photographs": list(held), "crop_rule": "short side resized to 2 x size, centre crop (then a ring "
              "of offsets for more crops)", "steps": steps, "solver": solver, "stop": DEMO_STOP,
              "stop_tol": None, "warm_start": warm_start, "etw": etw, "nw": nw, "samples": samples, "seed": seed,
              "clip_x0_tasks": sorted(clipped_tasks),
              "measurements": "noiseless (float32 y = A x)",
              "baseline_rule": "best classical method per task by mean PSNR against the ground truth (oracle "
                               "choice, favours the baselines)",
              "device": str(device or "cpu"), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "python": platform.python_version(), "tasks": {}}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(tasks, desc="demo", unit="task", dynamic_ncols=True)
    conv_all = {}
    rows = []
    for ti, task in enumerate(tasks):
        if bar is not None:
            bar.set_postfix_str(task)
        r = _restore_task(model, x, task, ti, s, task in clipped_tasks)
        result["stop_tol"] = r["par"].stop_tol
        metric, per_image, mean, row = _task_metrics(x, names, task, r)
        conv_all[task] = conv = _convergence(r["trace"])
        result["tasks"][task] = {
            "operator": r["op"].describe(), "clip_x0": r["clipped"], "baseline": r["base_name"],
            "all_baselines_psnr": {k: round(v, 3) for k, v in r["scores"].items()},
            "per_image": per_image, "mean": mean, "convergence": conv,
            "seconds": {"serial": round(r["t_ser"], 2), "parallel": round(r["t_par"], 2)},
        }
        rows.append(row)
        if write:
            _write_task(out, task, names, size, x, r, metric, row, s)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    result["table"] = rows
    if whole:
        result["whole"] = run_whole(model, held, whole, tasks, seed, out if write else None)
    if inversion:
        result["inversion"] = run_inversion(model, x, names, out if write else None, steps, etw, nw, seed,
                                            iters=inversion_iters, progress=progress)
    if write:
        draw_convergence(out / "convergence.png", conv_all, result["stop_tol"],
                         f"{solver} vs serial, T={steps}, {len(names)} image(s) of {size}x{size}: mean over "
                         f"images (stopped images keep their last value)")
    result["runtime_seconds"] = round(time.perf_counter() - t_all, 1)
    if write:
        write_json(out / "metrics.json", result)
    if json_file is not None:
        write_json(json_file, result)
    return result


def _check_settings(tasks, clip: str, size, crops, samples, inversion_iters):
    """The demo's own settings, checked: (tasks, the tasks that clip x0, inversion_iters)."""
    clipped_tasks = {"auto": DEMO_CLIP, "all": frozenset(DEMO_TASKS), "none": frozenset()}.get(clip)
    if clipped_tasks is None:
        raise DeqirError(f"clip must be auto, all or none, got {clip!r}")
    tasks = list(DEMO_TASKS) if tasks is None else list(tasks)
    bad = [t for t in tasks if t not in DEMO_TASKS]
    if bad or not tasks:
        raise DeqirError(f"unknown demo task(s) {', '.join(bad) or '(none)'}; choose from {', '.join(DEMO_TASKS)}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 16 or size % BUILTIN_SIZE_MULTIPLE:
        raise DeqirError(f"--size must be a multiple of {BUILTIN_SIZE_MULTIPLE} and at least 16 (SSIM needs an "
                         f"11x11 window, x4 super-resolution a 4x4 measurement), got {size!r}")
    inversion_iters = INVERSION_ITERS if inversion_iters is None else inversion_iters
    for key, v in (("crops", crops), ("samples", samples), ("inversion_iters", inversion_iters)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DeqirError(f"{key} must be a positive integer, got {v!r}")
    return tasks, clipped_tasks, inversion_iters


def _demo_model(model, device, weights):
    """(the denoiser, its name, its card's config and parameter count when it has one)."""
    if model is None:
        model = load_builtin(device=device, path=weights)
        model_name = "builtin" if weights is None else str(weights)
    else:
        model_name = type(model).__name__
    card_info = {}
    try:
        _, cfg, _ = read_builtin_file(weights)
        card_info = {"config": cfg, "parameters": sum(p.numel() for p in model.parameters())}
    except DeqirError:
        pass
    return model, model_name, card_info


def _check_outputs(out: Path, json_path, write: bool) -> Path | None:
    """Check (and create) the output folder and the --json file's folder; the --json file to write
    besides out/metrics.json (None: none, or the same file)."""
    json_file = None if json_path is None else Path(json_path)
    if json_file is not None:
        if json_file.is_dir():
            raise DeqirError(f"--json {json_file} is a folder; give a file name")
        check_dir_creatable(json_file.parent)         # before the output folder is made
        if write and json_file.resolve() == (out / "metrics.json").resolve():
            json_file = None                          # the same file: written once
    if write:
        ensure_writable_dir(out)
    if json_file is not None:
        ensure_writable_dir(json_file.parent)         # created if missing, like deqir restore --json
    return json_file


def _restore_task(model, x: torch.Tensor, task: str, ti: int, s: _Sampler, clipped: bool) -> dict:
    """One task on every image: the best baseline, serial, parallel (with its convergence trace
    against serial) and, with ``samples`` > 1, the serial posterior mean."""
    shape = tuple(x.shape[1:])
    steps, etw, nw, progress = s.steps, s.etw, s.nw, s.progress
    opname, params = DEMO_TASKS[task]
    op = make_operator(opname, shape, **params)
    y = op.A(x)
    cands = baselines_for(op, y)
    scores = {k: float(psnr(v.clamp(-1, 1), x).mean()) for k, v in cands.items()}
    base_name = max(scores, key=scores.get)
    gen = torch.Generator().manual_seed(s.seed * 1000 + ti)
    xi = torch.randn((x.shape[0], *shape), generator=gen)
    z = torch.randn((x.shape[0], steps, *shape), generator=gen) if nw > 0 else None
    t0 = time.perf_counter()
    ser = restore(model, y, op, steps=steps, solver="serial", noise=xi, step_noise=z, etw=etw, nw=nw,
                  clip_x0=clipped, progress=progress)
    t_ser = time.perf_counter() - t0
    serial_img = ser.image.float().cpu()
    trace = [[] for _ in range(x.shape[0])]

    def callback(k, ids, final_rows, q):
        f = final_rows.float().cpu()
        vs = psnr(f, serial_img[ids])
        for j, i in enumerate(ids):
            trace[i].append((k + 1, float(vs[j]), float(q[j])))

    t0 = time.perf_counter()
    par = restore(model, y, op, steps=steps, solver=s.solver, noise=xi, step_noise=z, etw=etw, nw=nw,
                  clip_x0=clipped, stop=DEMO_STOP, stop_tol=s.stop_tol, warm_start=s.warm_start, progress=progress,
                  callback=callback)
    t_par = time.perf_counter() - t0
    mmse = None
    if s.samples > 1:
        acc = serial_img.double().clone()
        for k in range(1, s.samples):
            g2 = torch.Generator().manual_seed(s.seed * 1000 + ti + 7919 * k)
            xi2 = torch.randn((x.shape[0], *shape), generator=g2)
            z2 = torch.randn((x.shape[0], steps, *shape), generator=g2) if nw > 0 else None
            acc += restore(model, y, op, steps=steps, solver="serial", noise=xi2, step_noise=z2, etw=etw,
                           nw=nw, clip_x0=clipped).image.double().cpu()
        mmse = (acc / s.samples).float()
    return {"op": op, "y": y, "scores": scores, "base_name": base_name, "base": cands[base_name].clamp(-1, 1),
            "serial": serial_img, "par": par, "parallel": par.image.float().cpu(), "mmse": mmse, "trace": trace,
            "t_ser": t_ser, "t_par": t_par, "clipped": clipped}


def _task_metrics(x: torch.Tensor, names, task: str, r: dict):
    """(PSNR / SSIM per method, the per-image rows, their means, the task's table row)."""
    sc, pc, bc, mmse = r["serial"].clamp(-1, 1), r["parallel"].clamp(-1, 1), r["base"], r["mmse"]
    metric = {k: (psnr(v, x), ssim(v, x)) for k, v in (("baseline", bc), ("serial", sc), ("parallel", pc))}
    if mmse is not None:
        metric["serial_mmse"] = (psnr(mmse.clamp(-1, 1), x), ssim(mmse.clamp(-1, 1), x))
    vs_serial = psnr(r["parallel"], r["serial"])
    per_image = []
    for i, name in enumerate(names):
        row = {"image": name, "K": r["par"].iterations_per_image[i],
               "psnr_parallel_vs_serial": round(float(vs_serial[i]), 2)}
        for k, (p_, s_) in metric.items():
            row[f"psnr_{k}"] = round(float(p_[i]), 3)
            row[f"ssim_{k}"] = round(float(s_[i]), 4)
        per_image.append(row)
    mean = {key: round(_mean([row[key] for row in per_image]), 4)
            for key in per_image[0] if key != "image"}
    row = {"task": task, "baseline": r["base_name"], "psnr_base": mean["psnr_baseline"],
           "ssim_base": mean["ssim_baseline"], "psnr_serial": mean["psnr_serial"],
           "ssim_serial": mean["ssim_serial"], "psnr_par": mean["psnr_parallel"],
           "ssim_par": mean["ssim_parallel"], "K": max(p["K"] for p in per_image),
           "K_mean": mean["K"], "par_vs_serial": round(min(p["psnr_parallel_vs_serial"] for p in per_image), 2)}
    if mmse is not None:
        row["psnr_mmse"] = mean["psnr_serial_mmse"]
        row["ssim_mmse"] = mean["ssim_serial_mmse"]
    return metric, per_image, mean, row


def _convergence(trace) -> list[dict]:
    """Mean PSNR vs serial and stopping quantity per evaluation, each stopped image's last value
    carried forward."""
    kmax = max(len(tr) for tr in trace)
    conv = []
    for k in range(kmax):
        ps, qs = [], []
        for tr in trace:
            e = tr[min(k, len(tr) - 1)]
            ps.append(min(e[1], 200.0))
            qs.append(min(e[2], 200.0))
        conv.append({"k": k + 1, "psnr_vs_serial": round(sum(ps) / len(ps), 3),
                     "q": round(sum(qs) / len(qs), 3)})
    return conv


def _write_task(out: Path, task: str, names, size: int, x: torch.Tensor, r: dict, metric: dict, row: dict,
                s: _Sampler) -> None:
    """The task's images (one PNG per column and image) and its captioned grid."""
    op, mmse, samples = r["op"], r["mmse"], s.samples
    sc, pc, bc = r["serial"].clamp(-1, 1), r["parallel"].clamp(-1, 1), r["base"]
    d = out / "images" / task
    d.mkdir(parents=True, exist_ok=True)
    disp = display_measurement(op, r["y"], size)
    for i, name in enumerate(names):
        for col, t in zip(COLUMNS, (disp[i], bc[i], sc[i], pc[i], x[i])):
            write_image(d / f"{name}_{col}.png", t)
        if mmse is not None:
            write_image(d / f"{name}_serial_mmse{samples}.png", mmse[i])
    note = ", x0 clipped" if r["clipped"] else ""
    headers = ["degraded", f"baseline: {r['base_name']}", f"serial (T={s.steps}{note})",
               f"parallel {s.solver} (K={row['K']})", "ground truth"]
    grid_rows, caps = [], []
    for i in range(len(names)):
        cells = [disp[i], bc[i], sc[i], pc[i], x[i]]
        cap = [""] + [f"{float(metric[k][0][i]):.2f} dB / {float(metric[k][1][i]):.3f}"
                      for k in ("baseline", "serial", "parallel")] + [""]
        if mmse is not None:
            cells.insert(4, mmse[i].clamp(-1, 1))
            cap.insert(4, f"{float(metric['serial_mmse'][0][i]):.2f} dB / "
                          f"{float(metric['serial_mmse'][1][i]):.3f}")
        grid_rows.append(cells)
        caps.append(cap)
    if mmse is not None:
        headers.insert(4, f"MMSE: mean of {samples} draws")
    zoom = max(1, 192 // size)
    draw_grid(out / f"grid_{task}.png", f"{task}  ({op.describe()['params']})  PSNR / SSIM under "
              f"each image; builtin prior, held-out photographs", headers, grid_rows, names, caps, zoom)


def format_demo(result: dict) -> str:
    cols = ["task", "baseline", "psnr_base", "ssim_base", "psnr_serial", "ssim_serial", "psnr_par", "ssim_par",
            "K", "par_vs_serial"]
    if result["table"] and "psnr_mmse" in result["table"][0]:
        cols[8:8] = ["psnr_mmse", "ssim_mmse"]
    head = (f"model={result['model']} images={len(result['images'])} ({', '.join(result['images'])}) "
            f"size={result['size']} steps={result['steps']} solver={result['solver']} stop={result['stop']} "
            f"tol={result['stop_tol']} etw={result['etw']} nw={result['nw']}")
    foot = ("(PSNR dB / SSIM, mean over images; baseline: best classical method per task; K: parallel iterations, "
            "max over images; par_vs_serial: worst image, dB)")
    if "psnr_mmse" in cols:
        foot += f"\n(mmse: mean of {result['samples']} serial restorations with independent noise)"
    text = head + "\n" + format_table(result["table"], cols) + "\n" + foot
    if "whole" in result:
        text += "\n\n" + format_whole(result["whole"])
    if "inversion" in result:
        text += "\n\n" + format_inversion(result["inversion"])
    return text + f"\nruntime {result['runtime_seconds']} s"


# ----------------------------------------------------------------------------- CLI

def add_parser(subparsers):
    """Register ``demo`` on an argparse subparsers object; returns the parser."""
    p = subparsers.add_parser("demo", help="restore held-out photographs with the built-in prior: pictures + table",
                              description="Degrade held-out photographs (SR x4, blur, box / random inpainting, "
                                          "colourisation), restore them with the serial and the parallel sampler "
                                          "and write comparison grids, a convergence plot and metrics.")
    p.add_argument("-o", "--out", default="demo-out", help="output folder (default demo-out)")
    p.add_argument("--size", type=int, default=64, help="crop side, a multiple of 4 (default 64)")
    p.add_argument("--images", help="held-out photographs, comma list (default: chelsea,coffee; any stored with "
                                    "the prior)")
    p.add_argument("--crops", type=int, default=1, help="crops per photograph (default 1: the centre)")
    p.add_argument("--tasks", help=f"comma list from {','.join(DEMO_TASKS)} (default all)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps T (default 25)")
    p.add_argument("--solver", default="picard", choices=("picard", "anderson"), help="parallel solver")
    p.add_argument("--stop-tol", type=float, help="stop when every row changes by less than this fraction of its "
                                                   "noise level (default 0.03)")
    p.add_argument("--warm-start", type=int, default=1,
                   help="parallel solver warm start: serial calls of a coarse pass, not counted in K (default 1)")
    p.add_argument("--etw", type=float, default=DEMO_ETW,
                   help=f"w: shrinks the eps term (default {DEMO_ETW}, tuned for the built-in prior)")
    p.add_argument("--nw", type=float, default=DEMO_NW, help=f"v: injected noise weight (default {DEMO_NW})")
    p.add_argument("--samples", type=int, default=1,
                   help="also average this many serial restorations (MMSE estimate; default 1: off)")
    p.add_argument("--clip", default="auto", choices=("auto", "all", "none"),
                   help="tasks that clip x0 to [-1, 1]: auto (colorize only, default), all, none")
    p.add_argument("--whole", type=int, help="also restore each photograph whole, downscaled to this short side "
                                             "(default: --size; 0: skip)")
    p.add_argument("--no-inversion", action="store_true",
                   help="skip the noise-optimisation stage (consistency loss and the ground-truth oracle)")
    p.add_argument("--inversion-iters", type=int,
                   help=f"gradient evaluations per loss in that stage (default {INVERSION_ITERS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo's random draws (default 0)")
    p.add_argument("--weights", help="a prior written by deqir train-prior (default: the built-in one)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--threads", type=int, help="torch CPU threads, >= 1 (default: one per core left free by "
                                               "other work, 1 on machines of 2 cores or fewer)")
    p.add_argument("--json", help="also write the metrics here (missing parent folders are created, as with "
                                  "deqir restore --json)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)
    return p


def keep_freed_memory() -> bool:
    """glibc only: keep freed heap memory instead of handing it back to the OS after every call.

    The parallel sampler allocates tensors of tens of MB per iteration; glibc's default returns
    them with munmap/trim and the next iteration page-faults them back in, which doubled the
    demo's CPU time here (measured: 36 s -> 21 s for one SR task, system time 15 s -> 1 s).
    Returns whether the settings were applied (a no-op elsewhere).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20) and libc.mallopt(m_trim_threshold, 1 << 30)
                    and libc.mallopt(m_top_pad, 256 << 20))
    except (OSError, AttributeError):
        return False


def safe_threads(cpus: int | None = None, load: float | None = None, default: int | None = None) -> int:
    """CPU threads for the demo without --threads: torch's default (one per core), but no more than
    the cores other work leaves free (1-minute load average), and 1 on a machine of 2 cores or fewer.
    torch's default on a busy small machine oversubscribes it: small convolutions then run up to
    tens of times slower."""
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    default = default or torch.get_num_threads()
    if cpus <= 2:
        return 1
    return max(1, min(default, cpus, cpus - round(load)))


def cmd_demo(args) -> int:
    if args.threads is not None:
        check_int("--threads", args.threads)
    if args.device:
        resolve_device(args.device)
    keep_freed_memory()
    torch.set_num_threads(args.threads or safe_threads())
    split = (lambda s: [v.strip() for v in s.split(",") if v.strip()] if s else None)
    result = run_demo(out_dir=args.out, size=args.size, images=split(args.images), crops=args.crops,
                      tasks=split(args.tasks), steps=args.steps, solver=args.solver, stop_tol=args.stop_tol,
                      warm_start=args.warm_start,
                      etw=args.etw, nw=args.nw, samples=args.samples, seed=args.seed, weights=args.weights,
                      device=args.device, progress=not args.no_progress, inversion=not args.no_inversion,
                      inversion_iters=args.inversion_iters, clip=args.clip, json_path=args.json, whole=args.whole)
    print(format_demo(result))
    extra = f", {grid_name(result['inversion']['task'])}" if "inversion" in result else ""
    whole = ", grid_whole_<photo>.png" if "whole" in result else ""
    print(f"wrote {args.out}/: grid_<task>.png{whole}{extra}, convergence.png, metrics.json, images/")
    return 0

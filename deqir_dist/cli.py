"""The ``deqir`` command line: a thin layer over the library.

Every command validates all of its inputs before writing anything; bad input ends with one line
on stderr ("deqir: error: ...") and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import DeqirError, check_int

TASKS = ("sr_avgpool", "sr_bicubic", "deblur_gauss", "deblur_uniform", "deblur_aniso",
         "inpaint", "colorize", "cs_wht", "denoise")

# CLI flag -> operator keyword (only flags the user sets are passed on)
_OP_FLAGS = {"scale": "scale", "kernel_size": "size", "blur_sigma": "sigma", "sigma_h": "sigma_h",
             "sigma_w": "sigma_w", "mask": "mask", "mask_fraction": "fraction", "mask_seed": "seed",
             "ratio": "ratio", "cs_seed": "seed"}


def _add_task_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task (the forward model)")
    g.add_argument("--task", required=True, choices=TASKS, help="degradation to invert")
    g.add_argument("--scale", type=int, help="sr_*: downsampling factor (default 4)")
    g.add_argument("--kernel-size", type=int, help="deblur_*: kernel size, odd (default 5 gauss, 9 uniform/aniso)")
    g.add_argument("--blur-sigma", type=float, help="deblur_gauss: Gaussian sigma (default 10)")
    g.add_argument("--sigma-h", type=float, help="deblur_aniso: sigma along H (default 1)")
    g.add_argument("--sigma-w", type=float, help="deblur_aniso: sigma along W (default 20)")
    g.add_argument("--mask", help="inpaint: box | random | stripes | text, or a mask image (white = keep)")
    g.add_argument("--mask-fraction", type=float, help="inpaint box/random: fraction missing (default 0.25 box, "
                                                         "0.5 random)")
    g.add_argument("--mask-seed", type=int, help="inpaint random: seed (default 0)")
    g.add_argument("--ratio", type=int, help="cs_wht: compression ratio (default 2)")
    g.add_argument("--cs-seed", type=int, help="cs_wht: permutation seed (default 0)")
    g.add_argument("--sigma-y", type=float, default=0.0,
                   help="std of the measurement noise in the [-1, 1] scale (default 0)")


# flags that belong to one task only (their keys are shared: both seeds are "seed")
_FLAG_TASK = {"mask": "inpaint", "mask_fraction": "inpaint", "mask_seed": "inpaint", "ratio": "cs_wht",
              "cs_seed": "cs_wht"}


def _task_flags(task: str) -> list[str]:
    """The task flags (attribute names) that apply to ``task``."""
    import inspect
    from .operators import _REGISTRY
    sig = inspect.signature(_REGISTRY[task].__init__).parameters
    keys = set(sig) | ({"fraction", "seed"} if task == "inpaint" else set())    # inpaint: the mask's parameters
    return [f for f, k in _OP_FLAGS.items() if k in keys and _FLAG_TASK.get(f, task) == task]


def _operator_params(args) -> dict:
    params = {}
    valid = _task_flags(args.task)
    for flag, key in _OP_FLAGS.items():
        v = getattr(args, flag, None)
        if v is None:
            continue
        if flag not in valid:
            names = ", ".join("--" + f.replace("_", "-") for f in valid) or "none"
            raise DeqirError(f"--{flag.replace('_', '-')} does not apply to --task {args.task} (its flags: {names})")
        params[key] = v
    mask = params.get("mask")
    if mask is not None and Path(mask).suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"):
        from .imageio import read_image
        params["mask"] = (read_image(mask, channels=1)[0] > 0).float()
    return params


def _add_output_flags(p: argparse.ArgumentParser, out_help: str) -> None:
    """Flags shared by restore and ray-restore: where and how results are written."""
    p.add_argument("-o", "--out", required=True, help=out_help)
    p.add_argument("--from-clean", action="store_true",
                   help="inputs are ground-truth images: degrade them here, then report PSNR/SSIM")
    p.add_argument("--json", help="summary JSON file (default: OUT/summary.json)")
    p.add_argument("--bits", type=int, default=8, choices=(8, 16), help="PNG bit depth")
    p.add_argument("--no-progress", action="store_true")


def _add_sampler_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampler")
    g.add_argument("--model",
                   help="builtin (the default without --checkpoint: the shipped prior), analytic (exact "
                        "oracle), adm-256-uncond, sdedit-celeba-hq, or a checkpoint file")
    g.add_argument("--checkpoint", help="weights file for the model")
    g.add_argument("--solver", default="picard", choices=("serial", "picard", "anderson", "auto"),
                   help="serial: the reference sampler, one step after another; picard (default) or anderson: the "
                        "chain-parallel solvers; auto: serial or picard, whichever the measured cost model predicts "
                        "is faster")
    g.add_argument("--profile", help="solver auto: cost profile JSON from 'deqir bench --profile'")
    g.add_argument("--steps", type=int, default=25, help="sampling steps N (default 25)")
    g.add_argument("--start", type=int, default=1000, help="start timestep S (default 1000)")
    g.add_argument("--stop", default="rows", choices=("final", "rows", "residual", "none"))
    g.add_argument("--stop-tol", type=float, help="rows: largest row change in units of its noise level "
                                                   "(default 0.03); final: dB (43); residual: relative (1e-3)")
    g.add_argument("--max-iter", type=int, help="most joint-map evaluations (default N)")
    g.add_argument("--warm-start", type=int, default=1, metavar="S",
                   help="start the parallel solver from a serial pass over S of the N steps (default 1; 0: from xi)")
    g.add_argument("--window", type=int, metavar="W",
                   help="picard + rows only: evaluate a sliding window of W rows and freeze the settled prefix "
                        "(default: W = steps, the frozen prefix only; 0: every row in every sweep)")
    g.add_argument("--clip-x0", action="store_true",
                   help="clamp every x0 prediction to [-1, 1] inside the denoiser (not in DDNM/DeqIR; helps "
                        "weak priors on colorize)")
    g.add_argument("--etw", type=float, default=0.0, help="w: shrinks the eps term (default 0)")
    g.add_argument("--nw", type=float, default=0.0, help="v: injected noise weight (default 0)")
    g.add_argument("--seed", type=int, default=0, help="noise seed; each image draws from (seed, id)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def _check_sampler_flags(args) -> None:
    """Flag combinations argparse cannot see."""
    from .models.loading import PRESETS
    if args.profile and args.solver != "auto":
        raise DeqirError("--profile is the cost model of --solver auto; add --solver auto or drop --profile")
    if args.window is not None and args.solver not in ("picard", "auto"):
        raise DeqirError(f"--window is a picard option; it does nothing with --solver {args.solver}")
    if args.model in PRESETS and not args.checkpoint:
        raise DeqirError(f"--model {args.model} needs --checkpoint FILE (its weights); without it the network "
                         "is untrained")
    _set_threads(getattr(args, "threads", None))


def _set_threads(n) -> None:
    if n is not None:
        import torch
        torch.set_num_threads(check_int("--threads", n))


def _restore_kwargs(args) -> dict:
    return dict(steps=args.steps, start=args.start, solver=args.solver, stop=args.stop,
                stop_tol=args.stop_tol, max_iter=args.max_iter, etw=args.etw, nw=args.nw,
                sigma_y=args.sigma_y, warm_start=args.warm_start, profile=args.profile,
                **({"window": args.window} if args.window is not None else {}),
                **({"clip_x0": True} if args.clip_x0 else {}))


def _device(args):
    from .denoiser import resolve_device
    return resolve_device(args.device)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deqir", description=(
        "Diffusion image restoration with parallel (fixed-point) sampling."))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("degrade", help="write the measurements A(x) (+ noise) of clean images")
    p.add_argument("inputs", nargs="+", help="clean image files or folders")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--bits", type=int, default=8, choices=(8, 16), help="PNG bit depth")
    p.add_argument("--seed", type=int, default=0, help="measurement-noise seed")
    _add_task_flags(p)

    p = sub.add_parser("restore", help="restore measurements (or degrade-then-restore clean images)")
    p.add_argument("inputs", nargs="+", help="measurement files (from deqir degrade) or folders")
    _add_output_flags(p, "output folder (restored <id>.png)")
    g = p.add_argument_group("noise optimisation (DEQ inversion, exact implicit gradients)")
    g.add_argument("--optimize-noise", metavar="LOSS",
                   help="consistency (needs --sigma-y > 0) | reference:PATH | oracle:PATH (ground truth: "
                        "an upper bound, labelled ORACLE in every output); PATH: image or folder by id")
    g.add_argument("--opt-iters", type=int, default=20, help="gradient evaluations (default 20)")
    g.add_argument("--opt-lr", type=float, default=0.1, help="Adam learning rate (default 0.1)")
    g = p.add_argument_group("distributed (set by launch/restore.py under torchrun)")
    g.add_argument("--distributed", action="store_true",
                   help="join the torchrun process group and shard each image's chain over its ranks")
    g.add_argument("--backend", choices=("gloo", "nccl"), help="default: nccl on CUDA, gloo on CPU")
    g.add_argument("--dist-timeout", type=float, default=300.0,
                   help="seconds any collective may wait before the ranks give up (default 300)")
    _add_task_flags(p)
    _add_sampler_flags(p)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")

    p = sub.add_parser("eval", help="PSNR/SSIM of restored images against ground truth")
    p.add_argument("restored", help="folder of restored images")
    p.add_argument("truth", help="folder of ground-truth images (matched by file stem)")
    p.add_argument("--json", help="write the per-image metrics here (missing folders are created)")

    p = sub.add_parser("bench", help="serial vs picard vs anderson on the same input: K, time, PSNR")
    p.add_argument("--model", default="analytic", help="analytic (default; its own samples as images) or builtin "
                   "(held-out photograph crops); with --profile also any model name or checkpoint")
    p.add_argument("--checkpoint", help="--profile: weights file for the model")
    p.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100], help="chain lengths N (default 25 50 100)")
    p.add_argument("--task", default="sr_avgpool", choices=TASKS, help="degradation (default sr_avgpool)")
    p.add_argument("--scale", type=int, default=2, help="sr_*: downsampling factor (default 2)")
    p.add_argument("--size", type=int, default=32, help="image side (default 32)")
    p.add_argument("--images", type=int, default=3, help="images to average over (default 3)")
    p.add_argument("--stop", default="rows", choices=("final", "rows", "residual", "none"),
                   help="stopping rule of the parallel solvers (default rows)")
    p.add_argument("--stop-tol", type=float, help="its tolerance (default: the rule's default)")
    p.add_argument("--warm-start", type=int, default=1, metavar="S",
                   help="serial pass over S of the N steps that starts the parallel solvers (default 1)")
    p.add_argument("--windows", type=float, nargs="+", default=[], metavar="FRAC",
                   help="also run picard with a sliding window of round(FRAC x N) rows and a frozen prefix "
                        "(1: frozen prefix only, picard's default; 0: plain sweeps of every row)")
    p.add_argument("--profile", action="store_true",
                   help="instead: measure c(b), one denoiser call on b rows, and the modelled speed-ups")
    p.add_argument("--graph", action="store_true", help="--profile with CUDA graphs (GPU only)")
    p.add_argument("--cost-from", metavar="JSON", help="--profile: model this c(b) table instead of measuring")
    p.add_argument("--seed", type=int, default=0, help="image and noise seed (default 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--no-progress", action="store_true")

    from .demo import add_parser as add_demo_parser
    from .prior import add_parser as add_prior_parser
    from .ray_pipeline import add_parser as add_ray_parser
    add_demo_parser(sub)
    add_prior_parser(sub)
    add_ray_parser(sub)
    return parser


def cmd_degrade(args) -> int:
    from .jobs import degrade_files, expand_inputs
    written = degrade_files(expand_inputs(args.inputs), args.task, _operator_params(args), args.out,
                            sigma_y=args.sigma_y, seed=args.seed, bits=args.bits)
    print(f"wrote {len(written)} measurement(s) to {args.out}")
    return 0


def cmd_restore(args) -> int:
    from .jobs import (check_model_fits, check_outputs_apart, ensure_writable_dir, expand_inputs, format_table,
                       load_items, restore_items, summarize, write_json)
    from .models import load_denoiser
    _check_sampler_flags(args)
    rank, world, device = 0, 1, None
    if not args.distributed:
        device = _device(args)
    else:
        from .distributed import init_distributed
        device = init_distributed(args.backend, args.dist_timeout, args.device)
        import torch.distributed as dist
        rank, world = dist.get_rank(), dist.get_world_size()
    lead = rank == 0
    optimize = None
    if args.optimize_noise:
        from .jobs import NoiseOptimizationSpec
        optimize = NoiseOptimizationSpec.parse(args.optimize_noise, args.opt_iters, args.opt_lr)
        if args.distributed:
            raise DeqirError("--optimize-noise runs in one process; it cannot be combined with --distributed")
        if args.clip_x0:
            raise DeqirError("--optimize-noise differentiates the unclipped chain; it cannot be combined with "
                             "--clip-x0")
        if optimize.loss == "consistency" and args.sigma_y <= 0:
            raise DeqirError("--optimize-noise consistency needs --sigma-y > 0: without measurement noise every "
                             "step projects onto A x = y, so the consistency does not depend on the noise")

    def prepare():
        from .restore import check_settings
        check_settings(**_restore_kwargs(args))
        if args.profile:
            from .profile import load_profile
            load_profile(args.profile)
        items = load_items(expand_inputs(args.inputs), args.task, _operator_params(args), args.from_clean,
                           sigma_y=args.sigma_y, seed=args.seed)
        if optimize is not None:
            for it in items:
                optimize.target(it)       # every target exists and fits, before any work
        json_path = Path(args.json) if args.json else Path(args.out) / "summary.json"
        check_outputs_apart([Path(args.out) / f"{it.name}.png" for it in items] + [json_path],
                            [it.source for it in items] + (optimize.files() if optimize else []))
        model = load_denoiser(args.model, checkpoint=args.checkpoint, device=device)
        check_model_fits(model, items)
        if lead:                      # only rank 0 writes
            _check_json_path(json_path)
            ensure_writable_dir(args.out)
        return items, json_path, model
    if args.distributed:
        from .distributed import all_ranks_ok
        items, json_path, model = all_ranks_ok(prepare, device)
    else:
        items, json_path, model = prepare()
    kw = _restore_kwargs(args)
    show = lead and not args.no_progress
    records = restore_items(model, items, args.out, dict(kw, progress=show, distributed=args.distributed),
                            seed=args.seed, bits=args.bits, progress=show, write=lead, optimize=optimize)
    if args.distributed:
        import torch.distributed as dist
        dist.destroy_process_group()
    if not lead:
        return 0
    label = f"{args.checkpoint} ({type(model).__name__})" if args.checkpoint else (args.model or "builtin")
    summary = {"command": "restore", "model": label, "task": args.task,
               "operator": items[0].op.describe()["params"], **kw, "seed": args.seed,
               "world_size": world, "summary": summarize(records), "images": records}
    cols = ["id", "iterations", "seconds"] + [c for c in ("psnr", "ssim") if c in records[0]]
    if optimize is not None:
        summary["optimize_noise"] = optimize.loss
        summary["oracle"] = optimize.loss == "oracle"
        cols += ["consistency_before", "consistency_after"]
    write_json(json_path, summary)
    print(format_table(records, cols))
    if optimize is not None and optimize.loss == "oracle":
        print("ORACLE: the noise was optimised against the ground truth; these numbers are an upper bound, "
              "not a restoration result")
    print(json.dumps(summary["summary"]))
    return 0


def cmd_eval(args) -> int:
    from .imageio import list_images, read_image
    from .jobs import format_table, write_json
    from .metrics import psnr, ssim
    restored = {p.stem: p for p in list_images(args.restored)}
    truth = {p.stem: p for p in list_images(args.truth)}
    if args.json:
        _check_json_path(args.json)
    common = sorted(set(restored) & set(truth))
    if not common:
        raise DeqirError(f"no image in {args.restored} has a same-named ground truth in {args.truth}")
    rows = []
    for name in common:
        a, b = read_image(restored[name])[None], read_image(truth[name])[None]
        if a.shape != b.shape:
            raise DeqirError(f"{name}: restored {tuple(a.shape[1:])} and ground truth {tuple(b.shape[1:])} differ in size")
        rows.append({"id": name, "psnr": round(float(psnr(a, b)[0]), 3), "ssim": round(float(ssim(a, b)[0]), 4)})
    mean = {"id": "mean", "psnr": sum(r["psnr"] for r in rows) / len(rows),
            "ssim": sum(r["ssim"] for r in rows) / len(rows)}
    print(format_table(rows + [mean], ["id", "psnr", "ssim"]))
    missing = sorted(set(restored) - set(truth))
    if missing:
        print(f"note: {len(missing)} restored image(s) have no ground truth, e.g. {missing[0]}", file=sys.stderr)
    if args.json:
        write_json(args.json, {"images": rows, "mean_psnr": mean["psnr"], "mean_ssim": mean["ssim"]})
    return 0


def _check_json_path(path) -> Path:
    """A JSON output path: its folder is created (and must be writable); it must not be a folder."""
    from .imageio import ensure_writable_dir
    p = Path(path)
    if p.is_dir():
        raise DeqirError(f"--json {p} is a folder; give a file name")
    ensure_writable_dir(p.parent)
    return p


def cmd_bench(args) -> int:
    from .bench import format_bench, run_bench
    from .jobs import write_json
    if not args.profile and (args.graph or args.cost_from):
        raise DeqirError(f"{'--graph' if args.graph else '--cost-from'} belongs to --profile; add --profile")
    if args.size < 1 or args.images < 1 or min(args.steps) < 1:
        raise DeqirError("--size, --images and --steps must be positive")
    _set_threads(args.threads)
    device = _device(args)
    if args.json:
        _check_json_path(args.json)
    if args.profile:
        from .bench import format_profile, run_profile
        result = run_profile(args.model, args.checkpoint, args.size, device, args.steps, args.graph,
                             cost_file=args.cost_from)
        print(format_profile(result))
        if args.json:
            write_json(args.json, result)
        return 0
    result = run_bench(model=args.model, checkpoint=args.checkpoint, steps=args.steps, task=args.task,
                       scale=args.scale, size=args.size, images=args.images, stop=args.stop,
                       stop_tol=args.stop_tol, seed=args.seed, device=device, warm_start=args.warm_start,
                       windows=args.windows, progress=not args.no_progress)
    print(format_bench(result))
    if args.json:
        write_json(args.json, result)
    return 0


def cmd_ray_restore(args) -> int:
    from .ray_pipeline import cmd_ray_restore as run
    return run(args)


def cmd_demo(args) -> int:
    from .demo import cmd_demo as run
    return run(args)


def cmd_train_prior(args) -> int:
    from .prior import cmd_train_prior as run
    return run(args)


COMMANDS = {"degrade": cmd_degrade, "restore": cmd_restore, "eval": cmd_eval, "bench": cmd_bench,
            "ray-restore": cmd_ray_restore, "demo": cmd_demo, "train-prior": cmd_train_prior}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except DeqirError as e:
        print(f"deqir: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deqir: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Flags shared by the commands: task, output and sampler flags, and what they build."""
from __future__ import annotations

import argparse

from deqir_dist.dataset.tasks import OP_FLAGS, TASKS, operator_params
from deqir_dist.errors import DeqirError, check_int
from deqir_dist.models.loading import PRESETS
from deqir_dist.sampling.denoiser import resolve_device
from deqir_dist.solvers import registry
from deqir_dist.solvers.options import DEFAULT_SOLVER


def add_task_flags(p: argparse.ArgumentParser, task_required: bool = True) -> None:
    g = p.add_argument_group("task (the forward model)")
    g.add_argument("--task", required=task_required, choices=TASKS, help="degradation to invert" + (
        "" if task_required else " (default: the one the measurement PNGs describe, as deqir degrade writes them)"))
    g.add_argument("--scale", type=int, help="sr_*: downsampling factor (default 4)")
    g.add_argument("--kernel-size", type=int, help="deblur_*: kernel size, odd (default 5 gauss, 9 uniform/aniso)")
    g.add_argument("--blur-sigma", type=float, help="deblur_gauss: Gaussian sigma (default 10)")
    g.add_argument("--sigma-h", type=float, help="deblur_aniso: sigma along H (default 1)")
    g.add_argument("--sigma-w", type=float, help="deblur_aniso: sigma along W (default 20)")
    g.add_argument("--mask", help="inpaint: box | random | stripes | text, or a mask image (white = keep)")
    g.add_argument("--mask-invert", action="store_true", default=None,
                   help="inpaint: the mask image is white = missing (diffusers', OpenCV's convention): invert it")
    g.add_argument("--mask-fraction", type=float, help="inpaint box/random: fraction missing (default 0.25 box, "
                                                         "0.5 random)")
    g.add_argument("--mask-seed", type=int, help="inpaint random: seed (default 0)")
    g.add_argument("--ratio", type=int, help="cs_wht: compression ratio (default 2)")
    g.add_argument("--cs-seed", type=int, help="cs_wht: permutation seed (default 0)")
    g.add_argument("--sigma-y", type=float,
                   help="std of the measurement noise in the [-1, 1] scale (degrade: noise added, default 0; "
                        "restore: default from the measurement's bit depth, 2 / (255 sqrt(12)) for 8-bit files, "
                        "0 for .pt files and --from-clean)")
    g.add_argument("--max-pixels", type=int, metavar="N",
                   help="refuse images (and measurements' images) over N pixels, checked from the file header "
                        "before decoding; input files over 16 N + 1 MiB bytes are refused too "
                        "(default 4096 x 4096 = 16777216; io.limits)")


def task_params(args) -> dict:
    """The operator keyword arguments of the task flags in ``args``."""
    return operator_params(args.task, {f: getattr(args, f, None) for f in (*OP_FLAGS, "mask_invert")})


def add_output_flags(p: argparse.ArgumentParser, out_help: str) -> None:
    """Flags shared by restore and ray-restore: where and how results are written."""
    p.add_argument("-o", "--out", required=True, help=out_help)
    p.add_argument("--from-clean", action="store_true",
                   help="inputs are ground-truth images: degrade them here, then report PSNR/SSIM")
    p.add_argument("--json", help="summary JSON file (default: OUT/summary.json)")
    p.add_argument("--bits", type=int, default=8, choices=(8, 16), help="PNG bit depth of the outputs (default 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_sampler_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampler")
    g.add_argument("--model",
                   help="builtin (the default without --checkpoint: the shipped prior), analytic (exact "
                        "oracle), adm-256-uncond, sdedit-celeba-hq, a checkpoint file, or a diffusers folder "
                        "(diffusers:FOLDER or FOLDER: a UNet2DModel with its scheduler)")
    g.add_argument("--checkpoint", help="weights file for the model")
    g.add_argument("--solver", default=DEFAULT_SOLVER, choices=registry.names("restore"),
                   help=registry.help_text("restore"))
    g.add_argument("--profile", help="solver auto: cost profile JSON from 'deqir bench --profile' (default: the "
                                     "model timed once on this device and image size, and cached)")
    g.add_argument("--steps", type=int, help="sampling steps N (default: the model card's, else 25)")
    g.add_argument("--start", type=int, help="start timestep S (default: the model's num_train_timesteps, else 1000)")
    g.add_argument("--stop", default="rows", choices=("final", "rows", "residual", "none"),
                   help="stopping rule of the parallel solvers (default rows: every row settled; final: the "
                        "last row's change in dB; residual: the joint map's relative residual; none: max-iter)")
    g.add_argument("--stop-tol", type=float, help="rows: largest row change in units of its noise level "
                                                   "(default 0.03); final: dB (43; parareal 40); residual: relative (1e-3)")
    g.add_argument("--max-iter", type=int, help="most joint-map evaluations (default N)")
    g.add_argument("--warm-start", type=int, default=1, metavar="S",
                   help="start the parallel solver from a serial pass over S of the N steps (default 1; 0: from xi)")
    g.add_argument("--window", type=int, metavar="W",
                   help="picard + rows only: evaluate a sliding window of W rows and freeze the settled prefix "
                        "(default: W = steps, the frozen prefix only; 0: every row in every sweep)")
    g.add_argument("--blocks", type=int, metavar="B",
                   help="parareal only: blocks of rows, one per rank (default: steps / 5)")
    g.add_argument("--coarse-steps", type=int, metavar="M",
                   help="parareal only: coarse DDNM jumps per block (default 1)")
    g.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                   help="clamp every x0 prediction to [-1, 1] inside the denoiser (not in DDNM/DeqIR; helps "
                        "weak priors on colorize; default: the model card's choice for the task, else off)")
    g.add_argument("--etw", type=float, help="w: shrinks the eps term (default: the model card's, else 0)")
    g.add_argument("--nw", type=float, help="v: injected noise weight (default: the model card's, else 0)")
    g.add_argument("--seed", type=int, default=0, help="noise seed; each image draws from (seed, id)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")


def check_sampler_flags(args) -> None:
    """Flag combinations argparse cannot see."""
    if args.profile and args.solver != "auto":
        raise DeqirError(f"--profile is the cost model of --solver auto (the default); it does nothing with "
                         f"--solver {args.solver}: drop one of them")
    if args.window is not None and args.solver not in ("picard", "auto"):
        raise DeqirError(f"--window is a picard option; it does nothing with --solver {args.solver}")
    for flag in ("blocks", "coarse_steps"):
        if getattr(args, flag, None) is not None and args.solver != "parareal":
            raise DeqirError(f"--{flag.replace('_', '-')} is a parareal option; it does nothing with --solver "
                             f"{args.solver}: add --solver parareal")
    if args.model in PRESETS and not args.checkpoint:
        raise DeqirError(f"--model {args.model} needs --checkpoint FILE (its weights); without it the network "
                         "is untrained")
    set_threads(getattr(args, "threads", None))


def set_threads(n) -> None:
    if n is not None:
        import torch
        torch.set_num_threads(check_int("--threads", n))


def restore_kwargs(args) -> dict:
    """restore()'s keyword arguments from the flags; sampler settings the user left out are absent
    (restore takes them from the model card, sigma_y from each measurement's bit depth)."""
    given = {k: getattr(args, k) for k in ("steps", "etw", "nw", "sigma_y", "clip_x0")}
    return dict(start=args.start, solver=args.solver, stop=args.stop,
                stop_tol=args.stop_tol, max_iter=args.max_iter, **{k: v for k, v in given.items() if v is not None},
                warm_start=args.warm_start, profile=args.profile,
                **({"window": args.window} if args.window is not None else {}),
                **{k: getattr(args, k) for k in ("blocks", "coarse_steps") if getattr(args, k, None) is not None})


def _device(args):
    return resolve_device(args.device)

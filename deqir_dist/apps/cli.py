"""The ``deqir`` command line: a thin layer over the library.

Every command validates all of its inputs before writing anything; bad input ends with one line
on stderr ("deqir: error: ...") and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deqir_dist.api.planner import load_profile
from deqir_dist.api.restore import check_settings
from deqir_dist.apps.bench import format_bench, format_calibrate, format_profile, run_bench, run_calibrate, run_profile
from deqir_dist.apps.demo import add_parser as add_demo_parser
from deqir_dist.apps.demo import cmd_demo
from deqir_dist.apps.flags import (
    TASKS,
    _device,
    add_output_flags,
    add_sampler_flags,
    add_task_flags,
    check_sampler_flags,
    restore_kwargs,
    set_threads,
    task_params,
)
from deqir_dist.apps.guard import (
    OneLineParser,
    Terminated,
    job_guard,
    one_line_warnings,
    serial_ranks_note,
    sigterm_unwinds,
    versions,
)
from deqir_dist.apps.ray_restore import add_parser as add_ray_parser
from deqir_dist.apps.ray_restore import cmd_ray_restore
from deqir_dist.apps.serve import add_parser as add_serve_parser
from deqir_dist.apps.serve import cmd_serve
from deqir_dist.apps.tables import format_table
from deqir_dist.apps.train_prior import add_parser as add_prior_parser
from deqir_dist.apps.train_prior import cmd_train_prior
from deqir_dist.dataset.described import described_task
from deqir_dist.dataset.items import (
    ItemSource,
    NoiseOptimizationSpec,
    check_model_fits,
    check_outputs_apart,
    degrade_files,
    expand_inputs,
    restore_items,
    sampler_record,
    summarize,
)
from deqir_dist.errors import DeqirError, one_line
from deqir_dist.io.files import ensure_writable_dir
from deqir_dist.io.images import list_images, read_image
from deqir_dist.io.jsonio import write_json
from deqir_dist.models import load_denoiser
from deqir_dist.models.emulated import CostEmulatingDenoiser
from deqir_dist.parallel.dist import all_ranks_ok, init_distributed
from deqir_dist.quality.metrics import psnr, ssim


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="deqir", description=(
        "Diffusion image restoration with parallel (fixed-point) sampling."))
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("degrade", help="write the measurements A(x) (+ noise) of clean images")
    p.add_argument("inputs", nargs="+", help="clean image files or folders")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--bits", type=int, default=16, choices=(8, 16),
                   help="PNG bit depth (default 16: 8-bit rounding is noise that deblurring amplifies)")
    p.add_argument("--seed", type=int, default=0, help="measurement-noise seed")
    add_task_flags(p)

    p = sub.add_parser("restore", help="restore measurements (or degrade-then-restore clean images)")
    p.add_argument("inputs", nargs="+", help="measurement files (from deqir degrade) or folders")
    add_output_flags(p, "output folder (restored <id>.png)")
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
    add_task_flags(p, task_required=False)     # measurement PNGs carry their task (dataset.described)
    add_sampler_flags(p)
    p.add_argument("--emulate-cost", metavar="TABLE.json",
                   help="hold every denoiser call of b rows to the table's c(b) (a 'deqir bench --profile' JSON), "
                        "sleeping after the real compute; the model defaults to analytic (models.emulated)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    g = p.add_argument_group("memory (api.budget: estimated before any input is decoded)")
    g.add_argument("--max-memory", metavar="SIZE",
                   help="peak memory the restore may reach, e.g. 6G or 800M (default: half the available "
                        "memory, less under a cgroup or ulimit -v); an image that does not fit is restored in "
                        "tiles, or refused naming the size that fits")
    g.add_argument("--tile", type=int, metavar="PX",
                   help="restore in overlapping PX x PX tiles (one chain, blended every step); 0: never tile "
                        "(default: tile only when the whole image does not fit)")
    g.add_argument("--max-time", metavar="MINUTES",
                   help="the work cap: an image whose restore is modelled (before any work) to take longer is "
                        "refused, naming the size and the --steps that fit; minutes, or 90m, 3h, 45s (default "
                        "180: 3 h; 0: no cap)")

    p = sub.add_parser("eval", help="PSNR/SSIM of restored images against ground truth")
    p.add_argument("restored", help="a restored image, or a folder of them")
    p.add_argument("truth", help="its ground truth, or a folder of ground-truth images (matched by file stem)")
    p.add_argument("--json", help="write the per-image metrics here (missing folders are created)")

    p = sub.add_parser("bench", help="serial vs picard vs anderson on the same input: K, time, PSNR")
    p.add_argument("--model", help="analytic (default; its own samples as images; --calibrate: builtin) or builtin "
                   "(held-out photograph crops); with --profile also any model name or checkpoint")
    p.add_argument("--checkpoint", help="--profile: weights file for the model")
    p.add_argument("--steps", type=int, nargs="+", help="chain lengths N (default 25 50 100; --calibrate: the model "
                                                        "card's N, or its first value)")
    p.add_argument("--task", choices=TASKS, help="degradation (default sr_avgpool; --calibrate: the one the "
                                                 "measurement PNGs describe)")
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
    p.add_argument("--etw", type=float, default=None,
                   help="the chain's eta (default: the model card's, as restore uses; the planner's "
                        "picard table is measured at 0)")
    p.add_argument("--profile", action="store_true",
                   help="instead: measure c(b), one denoiser call on b rows, and the modelled speed-ups")
    p.add_argument("--graph", action="store_true", help="--profile with CUDA graphs (GPU only)")
    p.add_argument("--calibrate", nargs="+", metavar="IMAGE",
                   help="instead: run every parallel plan solver=auto weighs on these images (measurements as "
                        "'deqir degrade' writes them, or clean pictures with --from-clean) and store the K each "
                        "needed, so auto plans with this model's K from now on (api.k_observed)")
    p.add_argument("--from-clean", action="store_true", help="--calibrate: the images are clean; degrade them first")
    p.add_argument("--procs", type=int, nargs="+", default=[1],
                   help="--calibrate: report auto's choice on these numbers of devices (default 1)")
    p.add_argument("--cost-from", metavar="JSON", help="--profile: model this c(b) table instead of measuring")
    p.add_argument("--emulate-cost", metavar="TABLE.json",
                   help="hold every denoiser call of b rows to the table's c(b): seconds as on the table's device")
    p.add_argument("--seed", type=int, default=0, help="image and noise seed (default 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    add_demo_parser(sub)
    add_prior_parser(sub)
    add_ray_parser(sub)
    add_serve_parser(sub)
    return parser


def cmd_degrade(args) -> int:
    written = degrade_files(expand_inputs(args.inputs), args.task, task_params(args), args.out,
                            sigma_y=args.sigma_y or 0.0, seed=args.seed, bits=args.bits)
    print(f"wrote {len(written)} measurement(s) to {args.out}")
    return 0


def cmd_restore(args) -> int:
    check_sampler_flags(args)
    rank, world, device = 0, 1, None
    if not args.distributed:
        device = _device(args)
    else:
        device = init_distributed(args.backend, args.dist_timeout, args.device)
        import torch.distributed as dist
        rank, world = dist.get_rank(), dist.get_world_size()
    lead = rank == 0
    optimize = None
    if args.optimize_noise:
        optimize = NoiseOptimizationSpec.parse(args.optimize_noise, args.opt_iters, args.opt_lr)
        if args.distributed:
            raise DeqirError("--optimize-noise runs in one process; it cannot be combined with --distributed")
        if optimize.loss == "consistency" and (args.sigma_y or 0.0) <= 0:
            raise DeqirError("--optimize-noise consistency needs --sigma-y > 0: without measurement noise every "
                             "step projects onto A x = y, so the consistency does not depend on the noise")

    def prepare():
        check_settings(**restore_kwargs(args))
        if args.profile:
            load_profile(args.profile)
        if args.task is None:         # the task the measurement PNGs describe
            args.task = described_task(expand_inputs(args.inputs), args.from_clean)
        # the model first: each image's memory and time are estimated before its pixels are decoded
        model = load_denoiser(args.model, checkpoint=args.checkpoint, device=device,
                              emulate_cost=args.emulate_cost)
        estimates = []
        items = ItemSource(expand_inputs(args.inputs), args.task, task_params(args), args.from_clean,
                           sigma_y=args.sigma_y, seed=args.seed,
                           check=_budget_check(model, args, estimates))   # all checked; decoded as restored
        if optimize is not None:
            for it in items:
                optimize.target(it)       # every target exists and fits, before any work
        json_path = Path(args.json) if args.json else Path(args.out) / "summary.json"
        check_outputs_apart([Path(args.out) / f"{it.name}.png" for it in items] + [json_path],
                            [it.source for it in items] + (optimize.files() if optimize else []))
        check_model_fits(model, items)
        if lead:                      # only rank 0 writes
            _check_json_path(json_path)
            ensure_writable_dir(args.out)
            for line, tiled in estimates:    # every input checked: what each size costs, one line each
                if tiled or not args.no_progress:  # (with --no-progress only a size restored in tiles)
                    print(line, file=sys.stderr)
        return items, json_path, model
    if args.distributed:
        items, json_path, model = all_ranks_ok(prepare, device)
    else:
        items, json_path, model = prepare()
    kw = dict(restore_kwargs(args), max_memory=args.max_memory, tile=args.tile, max_time=args.max_time)
    show = lead and not args.no_progress
    label = f"{args.checkpoint} ({type(model).__name__})" if args.checkpoint else \
        (args.model or ("analytic" if args.emulate_cost else "builtin"))
    built = {}

    def build_summary(records):
        summary = {"command": "restore", "model": label, "task": args.task,
                   "operator": items[0].op.describe()["params"], **kw, "seed": args.seed,
                   "sampler": sampler_record(model, args.task, kw, records),
                   "world_size": world, "summary": summarize(records), "images": records,
                   "argv": ["deqir", *getattr(args, "argv", [])], "versions": versions()}
        if isinstance(model, CostEmulatingDenoiser):
            summary["emulate_cost"] = args.emulate_cost
            summary["emulated_calls"] = model.stats()
        if optimize is not None:
            summary["optimize_noise"] = optimize.loss
            summary["oracle"] = optimize.loss == "oracle"
        built["summary"] = summary
        return summary
    # the default summary (OUT/summary.json) is staged with the pictures and committed last, the old
    # one removed first (io.outdir.Staging.commit): a killed or failed commit never leaves a lying summary
    in_out = json_path.parent.resolve() == Path(args.out).resolve()
    noted = []

    def note_serial(rec):             # said as soon as the first image ran serial, not after all of them
        note = None if noted or not lead else serial_ranks_note([rec], world)
        if note:
            noted.append(note)
            print(note, file=sys.stderr, flush=True)
    records = restore_items(model, items, args.out, dict(kw, progress=show, distributed=args.distributed),
                            seed=args.seed, bits=args.bits, progress=show, write=lead, optimize=optimize,
                            summary=(json_path.name, build_summary) if lead and in_out else None,
                            on_record=note_serial)
    if args.distributed:
        import torch.distributed as dist
        dist.destroy_process_group()
    if not lead:
        return 0
    summary = built.get("summary") or build_summary(records)
    cols = ["id", "iterations", "seconds"] + [c for c in ("psnr", "ssim") if c in records[0]]
    if optimize is not None:
        cols += ["consistency_before", "consistency_after"]
    if not in_out:
        write_json(json_path, summary)
    print(format_table(records, cols))
    if optimize is not None and optimize.loss == "oracle":
        print("ORACLE: the noise was optimised against the ground truth; these numbers are an upper bound, "
              "not a restoration result")
    print(json.dumps(summary["summary"]))
    return 0


def _budget_check(model, args, lines: list):
    """``api.budget.input_check`` with the flags: each input's restore estimated before it is
    decoded; ``lines`` gets (line, tiled) per distinct size, printed once every input passed."""
    from deqir_dist.api.budget import input_check
    said = set()

    def note(path, b):
        if b.canvas not in said:
            said.add(b.canvas)
            lines.append((f"deqir: {Path(path).name}: {b.line()}", bool(b.tile)))
    return input_check(model, args.task, args.steps, args.solver, {"window": args.window, "blocks": args.blocks},
                       args.max_memory, args.tile, note, max_time=args.max_time)


def _eval_inputs(path, what: str) -> dict:
    """{stem: file} of an image file or a folder of images (``deqir eval``)."""
    p = Path(path)
    if p.is_dir():
        return {f.stem: f for f in list_images(p)}
    if p.is_file():
        return {p.stem: p}
    raise DeqirError(f"{what} {p} not found; give an image file or a folder of images")


def cmd_eval(args) -> int:
    restored, truth = _eval_inputs(args.restored, "restored"), _eval_inputs(args.truth, "ground truth")
    if Path(args.restored).is_file() and Path(args.truth).is_file():
        truth = {next(iter(restored)): Path(args.truth)}      # two files: compared whatever their names
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
    p = Path(path)
    if p.is_dir():
        raise DeqirError(f"--json {p} is a folder; give a file name")
    ensure_writable_dir(p.parent)
    return p


def cmd_bench(args) -> int:
    if not args.profile and (args.graph or args.cost_from):
        raise DeqirError(f"{'--graph' if args.graph else '--cost-from'} belongs to --profile; add --profile")
    if args.profile and args.emulate_cost:
        raise DeqirError("--emulate-cost runs the solvers against a c(b) table; --profile models one: use "
                         "--profile --cost-from TABLE.json")
    if args.size < 1 or args.images < 1 or min(args.steps or [1]) < 1 or min(args.procs) < 1:
        raise DeqirError("--size, --images, --steps and --procs must be positive")
    set_threads(args.threads)
    device = _device(args)
    if args.json:
        _check_json_path(args.json)
    if args.calibrate:
        if args.profile or args.emulate_cost:
            raise DeqirError("--calibrate runs the user's model on real images; drop --profile / --emulate-cost")
        flags = {"scale": args.scale} if args.task and args.task.startswith("sr_") else {}
        result = run_calibrate(args.calibrate, args.task, flags, model=args.model or (None if args.checkpoint else
                                                                                        "builtin"),
                               checkpoint=args.checkpoint,
                               from_clean=args.from_clean, steps=(args.steps or [None])[0], procs=args.procs,
                               seed=args.seed, device=device, progress=not args.no_progress)
        print(format_calibrate(result))
        if args.json:
            write_json(args.json, result)
        return 0
    if args.from_clean or args.procs != [1]:
        raise DeqirError("--from-clean and --procs belong to --calibrate")
    args.steps = args.steps or [25, 50, 100]
    args.task = args.task or "sr_avgpool"
    args.model = args.model or "analytic"
    if args.profile:
        result = run_profile(args.model, args.checkpoint, args.size, device, args.steps, args.graph,
                             cost_file=args.cost_from)
        print(format_profile(result))
        if args.json:
            write_json(args.json, result)
        return 0
    result = run_bench(model=args.model, checkpoint=args.checkpoint, steps=args.steps, task=args.task,
                       scale=args.scale, size=args.size, images=args.images, stop=args.stop,
                       stop_tol=args.stop_tol, seed=args.seed, device=device, warm_start=args.warm_start,
                       windows=args.windows, progress=not args.no_progress, emulate_cost=args.emulate_cost,
                       etw=args.etw)
    print(format_bench(result))
    if args.json:
        write_json(args.json, result)
    return 0


COMMANDS = {"degrade": cmd_degrade, "restore": cmd_restore, "eval": cmd_eval, "bench": cmd_bench,
            "ray-restore": cmd_ray_restore, "demo": cmd_demo, "train-prior": cmd_train_prior,
            "serve": cmd_serve}


def _version() -> str:
    import platform

    import torch

    from deqir_dist import __version__
    return f"deqir-dist {__version__} (torch {torch.__version__}, Python {platform.python_version()})"


def main(argv: list[str] | None = None) -> int:
    with sigterm_unwinds(), one_line_warnings():      # first: SIGTERM is a clean stop from here on (apps.guard)
        try:
            args = build_parser().parse_args(argv)
            args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
            with job_guard(args):       # --max-pixels; the output folder's lock (apps.guard)
                return COMMANDS[args.command](args)
        except DeqirError as e:
            print(f"deqir: error: {e}", file=sys.stderr)
            return 2
        except (MemoryError, RuntimeError) as e:     # an allocator failure anywhere: one line, not a traceback
            if not isinstance(e, MemoryError) and "can't allocate memory" not in str(e) \
                    and "out of memory" not in str(e).lower():
                raise
            print(f"deqir: error: out of memory: {one_line(e)}; lower --max-memory (restore) or --max-pixels",
                  file=sys.stderr)
            return 2
        except Terminated as e:     # before the job began (parsing the flags)
            print(f"deqir: error: {e}", file=sys.stderr)
            return 143
        except KeyboardInterrupt:
            print("deqir: interrupted", file=sys.stderr)
            return 130


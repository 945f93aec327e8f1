"""`deqir ray-restore`: the command and its flags."""
from __future__ import annotations

import argparse
import json
import sys

from deqir_dist.apps.guard import versions
from deqir_dist.apps.flags import (
    add_output_flags,
    add_sampler_flags,
    add_task_flags,
    check_sampler_flags,
    restore_kwargs,
    task_params,
)
from deqir_dist.dataset.described import described_task
from deqir_dist.dataset.manifest import read_input
from deqir_dist.ray.job import RayRestoreJob

# ============================================================================ command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``ray-restore`` (the flags of ``deqir restore`` plus the Ray ones)."""
    p = subparsers.add_parser("ray-restore", help="restore a folder or manifest on a Ray cluster (resumable)",
                              description="Restore a dataset on Ray: one PNG per image, results.jsonl, "
                                          "summary.json; rerunning skips the images already done.")
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="a folder of measurements (or clean images with --from-clean), or a JSONL "
                                 "manifest: {\"id\", \"path\", \"gt\"?, \"params\"?} per line")
    add_output_flags(p, "output folder: <id>.png, results.jsonl, summary.json")
    g = p.add_argument_group("ray")
    g.add_argument("--address", default="local",
                   help="local (start a Ray instance here; default), auto (join the running cluster) or HOST:PORT")
    g.add_argument("--workers", type=int, help="workers (gangs); default: as many as the cluster holds")
    g.add_argument("--gpus-per-worker", type=int, default=1,
                   help="P: ranks per worker; P > 1 shards each image's chain over a gang of P "
                        "(one GPU each; on a CPU cluster, P CPU ranks on gloo) (default 1)")
    g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per rank (default 1)")
    g.add_argument("--images-per-batch", type=int, default=4, help="images per work unit (default 4; fewer when there are too few images "
                                                              "for every worker to get one)")
    g.add_argument("--batch-restore", default="auto", choices=("auto", "on", "off"),
                   help="restore the images of a unit that share an operator in one call "
                        "(auto: on CUDA only, where it pays)")
    g.add_argument("--max-retries", type=int, default=2, help="reruns of a batch whose worker died (default 2)")
    g.add_argument("--dist-timeout", type=float, default=300.0,
                   help="seconds a gang's collective may wait before the gang is replaced (default 300)")
    g.add_argument("--connect-timeout", type=float, default=30.0,
                   help="seconds to wait for the cluster at --address HOST:PORT / auto before giving up "
                        "(default 30)")
    add_task_flags(p, task_required=False)     # measurement PNGs carry their task (dataset.described)
    add_sampler_flags(p)
    p.add_argument("--max-time", metavar="MINUTES",
                   help="the work cap per image (api.budget): an image whose restore is modelled to take longer is "
                        "refused (a failed record naming the size and --steps that fit); minutes, or 90m, 3h "
                        "(default 180; 0: no cap)")


def job_from_args(args) -> RayRestoreJob:
    if args.task is None:             # the task the measurement PNGs describe (the workers check each file)
        args.task = described_task([e.path for e in read_input(args.input)[0]], args.from_clean)
    return RayRestoreJob(
        input=args.input, out=args.out, task=args.task, op_params=task_params(args),
        restore_kw={**restore_kwargs(args), **({"max_time": args.max_time} if args.max_time is not None else {})},
        model=args.model, checkpoint=args.checkpoint, seed=args.seed,
        from_clean=args.from_clean, bits=args.bits, device=args.device, address=args.address,
        workers=args.workers, gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
        images_per_batch=args.images_per_batch, batch_restore=args.batch_restore, max_retries=args.max_retries,
        dist_timeout=args.dist_timeout, summary_path=args.json, progress=not args.no_progress,
        connect_timeout=getattr(args, "connect_timeout", 30.0),
        provenance={"argv": ["deqir", *getattr(args, "argv", [])], "versions": versions()})


def cmd_ray_restore(args) -> int:
    """Run the job; print the summary. Exit status 0 (all ok), 1 (some images failed)."""
    check_sampler_flags(args)
    summary = job_from_args(args).run()
    for f in summary["failures"][:10]:
        print(f"failed: {f['id']}: {f['error']}", file=sys.stderr)
    brief = {k: summary[k] for k in ("ok", "failed", "skipped", "images_per_second", "seconds")}
    for k in ("mean_psnr", "mean_ssim", "mean_iterations"):
        if k in summary:
            brief[k] = summary[k]
    print(f"ray-restore, this run: {summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} skipped "
          f"({summary['skipped_done']} done before, {summary['skipped_not_image']} not images); "
          f"{summary['restored_total']} of {summary['images']} images restored in {args.out}; "
          f"{summary['steady_images_per_second']} images/s restored on {summary['workers']} worker(s) "
          f"after {summary['startup_seconds']} s of start-up ({summary['images_per_second']} with it)")
    print(json.dumps(brief))
    return 1 if summary["failed"] else 0

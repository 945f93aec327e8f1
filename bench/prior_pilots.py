"""Where the built-in prior's training compute pays, measured on this machine (issue 22, step 2).

    python bench/prior_pilots.py throughput --json bench/results/prior-pilots-throughput-cpu.json
    python bench/prior_pilots.py train --minutes 5 --json bench/results/prior-pilots-train-cpu.json

``throughput``: optimiser steps per second (and training pixels per second) of candidate
architectures, precisions (fp32 / bf16 autocast), memory formats and thread counts, on random
crops at the training batch (16 x 64 px, i.e. 64 x 32 px on alternate steps); a few warm-up steps
are not timed.

``train``: each candidate trained for the same wall time from scratch (``deqir train-prior``'s own
loop: same data, seed, learning-rate schedule over the steps the time allows), then the held-out
eps-MSE history against CPU-seconds and the final serial restoration PSNR on held-out crops
(25 steps, etw 0: the deterministic regime the issue asks about) beside the baselines.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from deqir_dist.apps.prior_training import TrainConfig, _amp_ctx, train_prior
from deqir_dist.models.ddpm import DDPMUNet

BASE = TrainConfig.DEFAULTS["model"]
ARCHS = {
    "ch32-122-rb1": dict(BASE),                                                     # the shipped prior
    "ch64-122-rb1": dict(BASE, ch=64),
    "ch32-1222-rb2-attn8": dict(BASE, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(8,)),
    "ch64-1222-rb1-attn8": dict(BASE, ch=64, ch_mult=(1, 2, 2, 2), attn_resolutions=(8,)),
}


def throughput(args) -> dict:
    rows = []
    for arch, mcfg in ARCHS.items():
        for amp in ("bf16", "none"):
            for cl in (False, True):
                for threads in (1, 2):
                    if (cl or threads == 2) and amp == "none":
                        continue
                    torch.set_num_threads(threads)
                    torch.manual_seed(0)
                    model = DDPMUNet(**mcfg)
                    if cl:
                        model = model.to(memory_format=torch.channels_last)
                    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
                    fmt = torch.channels_last if cl else torch.contiguous_format
                    batches = [torch.randn(16, 3, 64, 64).contiguous(memory_format=fmt),
                               torch.randn(64, 3, 32, 32).contiguous(memory_format=fmt)]
                    dev = torch.device("cpu")
                    n, t0 = 0, None
                    for i in range(args.warmup + args.steps):
                        if i == args.warmup:
                            t0 = time.perf_counter()
                        x = batches[i % 2]
                        t = torch.randint(0, 1000, (x.shape[0],))
                        with _amp_ctx(amp, dev):
                            out = model(x, t)
                        loss = (out.float() - x).pow(2).mean()
                        opt.zero_grad()
                        loss.backward()
                        opt.step()
                        n += 1 if i >= args.warmup else 0
                    sec = time.perf_counter() - t0
                    row = {"arch": arch, "params": sum(p.numel() for p in model.parameters()), "amp": amp,
                           "channels_last": cl, "threads": threads, "steps_per_s": round(n / sec, 3),
                           "mpx_per_s": round(n / sec * 16 * 64 * 64 / 1e6, 3)}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return {"mode": "throughput", "steps_timed": args.steps, "warmup": args.warmup, "rows": rows}


PILOTS = {
    "A ch32-122-rb1 uniform (today's)": dict(model=ARCHS["ch32-122-rb1"]),
    "B ch32-122-rb1 min_snr:5": dict(model=ARCHS["ch32-122-rb1"], loss_weight="min_snr:5"),
    "C ch64-122-rb1 uniform": dict(model=ARCHS["ch64-122-rb1"]),
    "D ch32-1222-rb2-attn8 uniform": dict(model=ARCHS["ch32-1222-rb2-attn8"]),
}


def train(args) -> dict:
    rows = []
    for name, kw in PILOTS.items():
        if args.only and not any(name.startswith(o) for o in args.only.split(",")):
            continue
        cfg = TrainConfig(**{**kw, "steps": args.steps, "threads": args.threads, "time_limit_min": args.minutes,
                             "val_every": args.val_every, "warmup": 100, "device": "cpu",
                             "data_dir": args.data})
        t0 = time.perf_counter()
        res = train_prior(cfg, progress=False)
        tr, val = res["training"], res["validation"]
        row = {"pilot": name, "model": {k: list(v) if isinstance(v, tuple) else v for k, v in kw["model"].items()},
               "loss_weight": cfg["loss_weight"], "params": sum(p.numel() for p in res["model"].parameters()),
               "steps_done": tr["steps_done"], "train_seconds": tr["wall_seconds"],
               "eps_mse_history": val["eps_mse_history"], "eps_mse_final": val["eps_mse"],
               "restoration_etw0_N25": val.get("restoration"), "total_seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps({k: row[k] for k in ("pilot", "steps_done", "eps_mse_final", "restoration_etw0_N25")}),
              flush=True)
        rows.append(row)
    return {"mode": "train", "minutes_each": args.minutes, "nominal_steps": args.steps,
            "lr_schedule_note": "the cosine schedule spans --steps; a pilot stops at its time limit",
            "threads": args.threads, "data": args.data or "scikit-image default photographs", "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("throughput")
    a.add_argument("--steps", type=int, default=8)
    a.add_argument("--warmup", type=int, default=2)
    b = sub.add_parser("train")
    b.add_argument("--minutes", type=float, default=5.0)
    b.add_argument("--steps", type=int, default=3600, help="nominal steps (the lr schedule's length)")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--val-every", type=int, default=150)
    b.add_argument("--data", help="bench/prior_data.py folder (default: scikit-image's photographs only)")
    b.add_argument("--only", help="comma list of pilot letters (A,B,...)")
    for q in (a, b):
        q.add_argument("--json", required=True)
    args = p.parse_args(argv)
    out = throughput(args) if args.mode == "throughput" else train(args)
    out["command"] = "python bench/prior_pilots.py " + " ".join(sys.argv[1:] if argv is None else argv)
    out["torch"] = torch.__version__
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=1)
        fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

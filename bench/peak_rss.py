"""Peak resident memory of one restore, plain Picard sweeps vs the frozen prefix (CPU).

    python bench/peak_rss.py --steps 50 100                      # glibc's default heap
    MALLOC_MMAP_THRESHOLD_=65536 python bench/peak_rss.py ...    # freed large blocks go back to the OS

Each configuration runs in a fresh process (the peak RSS of a process only grows), restoring
one held-out 3x32x32 crop (sr_avgpool x2) with the built-in prior; it prints the RSS before the
restore (torch and the model loaded) and the peak after.
"""
import argparse
import json
import os
import resource
import subprocess
import sys


def one(window: int, steps: int) -> dict:
    import torch

    from deqir_dist import load_denoiser, make_operator, restore
    from deqir_dist.models.builtin import builtin_bench_images
    torch.set_num_threads(1)
    model, shape = load_denoiser("builtin"), (3, 32, 32)
    op = make_operator("sr_avgpool", shape, scale=2)
    y = op.A(builtin_bench_images(1, 32))
    xi = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res = restore(model, y, op, steps=steps, noise=xi, window=window)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"steps": steps, "variant": "frozen prefix" if window else "plain", "K": res.iterations,
            "rss_before_mb": round(before), "peak_mb": round(after)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[50, 100])
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--one", nargs=2, type=int, metavar=("WINDOW", "STEPS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    rows = []
    for steps in args.steps:
        for window in (0, steps):
            out = subprocess.run([sys.executable, __file__, "--one", str(window), str(steps)],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""Time and memory per output size: the README's table (issue 25).

CPU (measured here): one call of the built-in prior on one row at each output size, whole, and
through ``TiledDenoiser`` in 256 px tiles (overlap 64, 4 tiles a call) at the sizes the default
cap tiles; the time of one call and the growth of the process's peak RSS during it (Linux:
``/proc/self/clear_refs`` resets the peak). A restore at N steps is modelled as N x c plus the
chain state (``api.budget``'s estimate, also recorded: what the CLI prints before a run).

GPU (modelled, not measured): ADM-256 in fp16 with CUDA graphs on one H200, from the c(b) table
of ``bench/results/adm256-h200-design-cb.json`` (DESIGN section 5): a canvas over 256 px is
n tiles of 256 px batched in one call, c(n) interpolated / extrapolated linearly from the table;
at 256 px and below one call of batch 1.

    python bench/sizes.py --json bench/results/sizes-builtin-cpu.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deqir_dist.api import budget as B
from deqir_dist.api.planner import cost_at
from deqir_dist.models import load_denoiser
from deqir_dist.models.tiled import TiledDenoiser, tile_count

ROOT = Path(__file__).resolve().parents[1]
H200_TABLE = ROOT / "bench" / "results" / "adm256-h200-design-cb.json"


def _hwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def one_call(fn, x, t, repeats: int) -> tuple[float, float]:
    """(seconds of the fastest call, MB the peak RSS grew by during the first)."""
    with torch.no_grad():
        _reset_hwm()
        base = _hwm_mb()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(x, t)
            times.append(time.perf_counter() - t0)
            grew = _hwm_mb() - base if not times[1:] else grew
    return min(times), grew


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    ap.add_argument("--whole-up-to", type=int, default=1024, help="largest side also timed whole (default 1024)")
    ap.add_argument("--tiled-from", type=int, default=1024, help="smallest side timed in tiles (default 1024)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_denoiser("builtin")
    t = torch.full((1,), 500)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64), t)               # warm-up
    h200 = {int(k): float(v) for k, v in json.loads(H200_TABLE.read_text())["c_ms"].items()}
    rows = []
    for s in args.sizes:
        x = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0))
        row = {"size": s}
        if s <= args.whole_up_to:
            sec, mb = one_call(model, x, t, 2 if s <= 512 else 1)
            row.update(whole_call_s=round(sec, 4), whole_call_rss_mb=round(mb, 1))
        if s >= args.tiled_from:
            td = TiledDenoiser(model, (s, s), 256, 64, 4)
            sec, mb = one_call(td, x, t, 1)
            row.update(tiles=td.tiles, tiled_call_s=round(sec, 3), tiled_call_rss_mb=round(mb, 1))
        b = B.plan_budget(model, (3, s, s), 1, args.steps, "serial", 1)     # what the CLI decides here
        call_s = row.get("whole_call_s") if not b.tile else row.get("tiled_call_s")
        row.update(cli_runs="tiles" if b.tile else "whole", estimate_extra_mb=round(b.extra_bytes / 2 ** 20),
                   estimate_s=round(b.seconds, 1), cap_mb=round(b.cap_bytes / 2 ** 20),
                   restore_s_modelled=None if call_s is None else round(args.steps * call_s, 1))
        n = 1 if s <= 256 else tile_count((s, s), 256, 64)
        row.update(h200_tiles=n, h200_call_ms_modelled=round(cost_at(h200, n), 1),
                   h200_restore_s_modelled=round(args.steps * cost_at(h200, n) / 1e3, 2))
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"command": "python bench/sizes.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
           "cpu_model": "builtin (DDPM UNet, 1.06 M parameters, float32)", "threads": args.threads, "loadavg_end": [round(v, 2) for v in __import__("os").getloadavg()],
           "steps": args.steps, "torch": torch.__version__,
           "gpu_model": "ADM-256 fp16 CUDA graphs on one H200: modelled from " + str(H200_TABLE.relative_to(ROOT)),
           "rows": rows}
    if args.json:
        from deqir_dist.io.jsonio import write_json
        write_json(args.json, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

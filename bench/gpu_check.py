"""One GPU check, under 5 minutes on one H100/H200: measured c(b), K, and modelled multi-GPU latency.

    python bench/gpu_check.py --out $OUT/gpu_check.json          (bench/gpu_check.sh runs this)
    python bench/gpu_check.py --smoke --out /tmp/g.json          (CPU, tiny sizes: checks the script)

1. c(b), one denoiser call on b rows, eager and CUDA graph, for ADM-256 (random weights, fp16,
   guided-diffusion's convert_to_fp16), the SDEdit CelebA-HQ DDPM (fp32) and the builtin prior
   when the package ships it; b in 1, 2, 3, 4, 6, 7, 8, 13, 25 (2-7: the batches of a window split
   over many GPUs, between the points the design table measured).
2. The builtin prior (or the analytic oracle): K and wall-clock of the graph-captured serial
   sampler vs the parallel solver at T = 25 and 100 (default frozen prefix, and plain sweeps),
   and of parareal (its default blocks and coarse steps; when ``solver="parareal"`` exists),
   PSNR of each against serial.
3. Modelled latency (docs/design.md section 5) for ADM-256 at T = 100 on P = 4, 8, 16 GPUs from the
   measured graph c(b) and the measured K: speed-up over the graph-captured serial sampler; for
   parareal, its critical path of batch-1 calls x c(1) against T c(1).
"""
import argparse
import json
import math
import platform
import sys
import time

import torch

from deqir_dist import make_operator, restore
from deqir_dist.api.planner import cost_at, measure_cost
from deqir_dist.models import CUDAGraphDenoiser, load_denoiser
from deqir_dist.quality.metrics import psnr
from deqir_dist.solvers import registry

HAS_PARAREAL = "parareal" in registry.names("restore")


def _model(name, device, smoke):
    if smoke:
        from deqir_dist.models import DDPMUNet
        return DDPMUNet(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                        in_channels=3, resolution=32).to(device).eval(), (3, 32, 32)
    dtype = torch.float16 if name == "adm-256-uncond" else None
    # timing only: the released weights are not needed (nor shipped)
    return load_denoiser(name, dtype=dtype, device=device, random_weights=True), (3, 256, 256)


def costs(device, smoke, batches):
    out = {}
    names = ["adm-256-uncond", "sdedit-celeba-hq"] if not smoke else ["tiny-ddpm"]
    for name in names:
        model, shape = _model(name, device, smoke)
        row = {"image_shape": list(shape), "eager_ms": measure_cost(model, shape, batches, device)}
        if device.type == "cuda":
            row["graph_ms"] = measure_cost(model, shape, batches, device, graph=True)
        out[name] = row
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def serial_vs_parallel(device, smoke, steps_list):
    try:
        model = load_denoiser("builtin", device=device)
        name, shape = "builtin", (3, 64, 64)
    except Exception:
        model = load_denoiser("analytic", device=device)
        name, shape = "analytic", (3, 32, 32)
    if smoke:
        shape = (3, 16, 16)
    op = make_operator("sr_bicubic", shape, scale=4)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand((1, *shape), generator=g) * 2 - 1)
    y = op.A(x)
    xi = torch.randn((1, *shape), generator=g)
    rows = []
    for steps in steps_list:
        serial_model = model
        if device.type == "cuda":
            serial_model = CUDAGraphDenoiser(model, (1, *shape))
        restore(serial_model, y, op, steps=steps, solver="serial", noise=xi)          # warm-up / capture
        t0 = time.perf_counter()
        s = restore(serial_model, y, op, steps=steps, solver="serial", noise=xi)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_serial = time.perf_counter() - t0
        restore(model, y, op, steps=steps, noise=xi)
        t0 = time.perf_counter()
        p = restore(model, y, op, steps=steps, noise=xi)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_par = time.perf_counter() - t0
        t0 = time.perf_counter()
        plain = restore(model, y, op, steps=steps, noise=xi, window=0)       # every row, every sweep
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_plain = time.perf_counter() - t0
        row = {}
        if HAS_PARAREAL:
            restore(model, y, op, steps=steps, solver="parareal", noise=xi)                 # warm-up
            t0 = time.perf_counter()
            pr = restore(model, y, op, steps=steps, solver="parareal", noise=xi)
            if device.type == "cuda":
                torch.cuda.synchronize()
            row = {"parareal_s": round(time.perf_counter() - t0, 4), "K_parareal": pr.iterations,
                   "parareal_blocks": getattr(pr, "blocks", None),
                   "parareal_coarse_steps": getattr(pr, "coarse_steps", None),
                   "parareal_critical_path_calls": getattr(pr, "critical_path_calls", None),
                   "parareal_psnr_vs_serial": round(float(psnr(pr.image.cpu(), s.image.cpu()).min()), 2)}
        rows.append({**row, "model": name, "steps": steps, "K": p.iterations, "serial_s": round(t_serial, 4),
                     "serial_graph": device.type == "cuda", "parallel_s": round(t_par, 4),
                     "denoiser_rows": sum(t.rows for t in p.timings),
                     "parallel_plain_s": round(t_plain, 4), "K_plain": plain.iterations,
                     "denoiser_rows_plain": sum(t.rows for t in plain.timings),
                     "psnr_vs_serial": round(float(psnr(p.image.cpu(), s.image.cpu()).min()), 2)})
    return rows


def modelled_parareal(c_graph, rows):
    """ADM-256 with parareal's measured schedule: T c(1) serial vs its critical path of batch-1 calls."""
    out = []
    for r in rows:
        calls = r.get("parareal_critical_path_calls")
        if calls:
            serial = r["steps"] * cost_at(c_graph, 1)
            out.append({"steps": r["steps"], "K": r["K_parareal"], "blocks": r["parareal_blocks"],
                        "critical_path_calls": calls, "serial_ms": round(serial, 2),
                        "parareal_ms": round(calls * cost_at(c_graph, 1), 2),
                        "speedup": round(serial / (calls * cost_at(c_graph, 1)), 3)})
    return out


def modelled(c_graph, k, steps=100, procs=(4, 8, 16)):
    out = []
    serial = steps * cost_at(c_graph, 1)
    for p in procs:
        par = cost_at(c_graph, 1) + k * cost_at(c_graph, math.ceil(steps / p))
        out.append({"steps": steps, "procs": p, "K": k, "serial_ms": round(serial, 2),
                    "parallel_ms": round(par, 2), "speedup": round(serial / par, 3)})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="GPU check: c(b), K, modelled latency")
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: exercise the script only")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    t0 = time.perf_counter()
    batches = (1, 2, 3, 4, 6, 7, 8, 13, 25) if not args.smoke else (1, 2, 3, 4)
    steps_list = (25, 100) if not args.smoke else (10,)
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "cuda": torch.version.cuda, "smoke": args.smoke}
    result["costs"] = costs(device, args.smoke, batches)
    result["serial_vs_parallel"] = serial_vs_parallel(device, args.smoke, steps_list)
    k100 = max(r["K"] for r in result["serial_vs_parallel"])
    adm = result["costs"].get("adm-256-uncond") or next(iter(result["costs"].values()))
    c = adm.get("graph_ms") or adm["eager_ms"]
    result["modelled_adm_t100"] = modelled(c, k100, steps=100 if not args.smoke else 10,
                                           procs=(4, 8, 16) if not args.smoke else (2, 5))
    result["parareal_available"] = HAS_PARAREAL
    result["modelled_adm_parareal"] = modelled_parareal(c, result["serial_vs_parallel"])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

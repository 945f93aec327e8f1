"""Measured denoiser cost c(b) and the latency model of DESIGN section 5.

Serial sampling costs T c(1); the chain-parallel solver on P devices costs
K (c(ceil(W / P)) + t_comm + t_solver) for an active window of W rows. ``choose_solver`` uses
measured c(b) to pick the faster one and never picks the parallel solver where the model says
it is slower.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from deqir_dist.errors import DeqirError
from deqir_dist.io.jsonio import write_json
from deqir_dist.models.cuda_graph import CUDAGraphDenoiser
from deqir_dist.sampling.denoiser import model_device, model_dtype

DEFAULT_BATCHES = (1, 2, 4, 8, 13, 16, 25, 50, 100)
# K to plan with, per N and window (fraction of N): the built-in prior's measured K at a rule
# that keeps the output >= 40 dB from serial ('rows', picard, max over images;
# ``deqir bench --model builtin --windows 0 0.5 0.25``, bench/results/builtin-sr_avgpool-cpu.json).
# A learned prior needs far more than the analytic oracle (4), and planning with the oracle's K
# would pick the parallel solver where it is slower.
EXPECTED_K = {25: {1.0: 14, 0.5: 15, 0.25: 21}, 50: {1.0: 19, 0.5: 27, 0.25: 40},
              100: {1.0: 27, 0.5: 52, 0.25: 67}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_cost(model, image_shape, batches=DEFAULT_BATCHES, device=None, dtype=None,
                 graph: bool = False, repeats: int = 7, warmup: int = 2) -> dict[int, float]:
    """Milliseconds of one denoiser call on b rows, for each b: the fastest of ``repeats`` timed calls
    (the least disturbed by other work on the machine); CUDA graphs if ``graph``."""
    device = torch.device(device) if device is not None else model_device(model)
    dtype = dtype or model_dtype(model) or torch.float32
    out = {}
    for b in batches:
        x = torch.randn((b, *image_shape), device=device, dtype=dtype)
        t = torch.full((b,), 500, dtype=torch.int64, device=device)
        fn = model
        if graph:
            fn = CUDAGraphDenoiser(model, (b, *image_shape))
        for _ in range(warmup):
            fn(x, t)
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            fn(x, t)
            _sync(device)
            times.append(1e3 * (time.perf_counter() - t0))
        out[b] = min(times)
    return out


def cost_at(c_ms: dict, b: int) -> float:
    """c(b) by linear interpolation between measured batch sizes (linear extrapolation above)."""
    pts = sorted((int(k), float(v)) for k, v in c_ms.items())
    if not pts:
        raise DeqirError("empty cost profile")
    if b <= pts[0][0]:
        return pts[0][1]
    for (b0, c0), (b1, c1) in zip(pts, pts[1:]):
        if b <= b1:
            return c0 + (c1 - c0) * (b - b0) / (b1 - b0)
    (b0, c0), (b1, c1) = pts[-2:] if len(pts) > 1 else (pts[0], pts[0])
    slope = (c1 - c0) / (b1 - b0) if b1 != b0 else c1 / b1
    return c1 + slope * (b - b1)


def expected_iterations(steps: int, window: int | None = None) -> int:
    """K to plan with: the measured K of the nearest benchmarked N and window fraction, at most N."""
    key = min(EXPECTED_K, key=lambda n: abs(math.log(n / steps)))
    frac = (window or steps) / steps
    f = min(EXPECTED_K[key], key=lambda v: abs(math.log(v / frac)))
    return min(EXPECTED_K[key][f], steps)


def predict_ms(c_ms: dict, steps: int, procs: int = 1, iterations: int | None = None,
               window: int | None = None, overhead_ms: float = 0.0, warm_start: int = 1) -> dict:
    """Modelled milliseconds per image: serial T c(1) vs parallel S c(1) + K (c(ceil(W/P)) + overhead).

    W rows per sweep is an upper bound: the frozen prefix only shrinks the batch."""
    w = min(window or steps, steps)
    k = iterations or expected_iterations(steps, w)
    serial = steps * cost_at(c_ms, 1)
    parallel = warm_start * cost_at(c_ms, 1) + k * (cost_at(c_ms, math.ceil(w / procs)) + overhead_ms)
    return {"steps": steps, "procs": procs, "window": w, "K": k, "serial_ms": serial, "parallel_ms": parallel,
            "speedup": serial / parallel}


def choose_solver(c_ms: dict, steps: int, procs: int = 1, iterations: int | None = None,
                  overhead_ms: float = 0.0, windows: bool = True) -> tuple[str, dict]:
    """'picard' only where the model predicts it beats serial; otherwise 'serial'.

    Picard's window is the candidate (N, N/2 or N/4 rows, at least one row per device) with the
    lowest predicted latency, the larger one on a tie; with ``iterations`` given or
    ``windows=False`` (a stop rule other than 'rows'), only the whole chain is modelled."""
    sizes = (steps, round(steps / 2), round(steps / 4)) if windows and not iterations else (steps,)
    candidates = sorted({w for w in sizes if w >= procs} | {steps}, reverse=True)
    best = min((predict_ms(c_ms, steps, procs, iterations, w, overhead_ms) for w in candidates),
               key=lambda p: p["parallel_ms"])
    return ("picard" if best["parallel_ms"] < best["serial_ms"] else "serial"), best


def save_profile(path, model_name: str, image_shape, device, c_ms: dict, graph: bool) -> None:
    write_json(path, {"model": model_name, "image_shape": list(image_shape), "device": str(device),
                      "graph": graph, "torch": torch.__version__,
                      "c_ms": {str(k): round(v, 4) for k, v in c_ms.items()}})


def cost_table(c_ms, source) -> dict[int, float]:
    """{b: ms} from a mapping with integer-like keys b >= 1 and finite times > 0 (DeqirError otherwise)."""
    try:
        table = {int(k): float(v) for k, v in dict(c_ms).items()}
    except (ValueError, TypeError) as e:
        raise DeqirError(f"cost profile {source}: expected {{rows: milliseconds}}, got {c_ms!r:.80}") from e
    if not table or any(b < 1 or not 0 < ms < math.inf for b, ms in table.items()):
        raise DeqirError(f"cost profile {source}: needs rows >= 1 and finite milliseconds > 0, got {table!r:.80}")
    return table


def load_profile(path) -> dict[int, float]:
    try:
        data = json.loads(Path(path).read_text())["c_ms"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DeqirError(f"cannot read cost profile {path}: {e}") from e
    return cost_table(data, path)

"""Measured denoiser cost c(b) and the latency model of docs/design.md section 5.

Serial sampling costs T c(1); the chain-parallel solver on P devices costs
K (c(ceil(W / P)) + t_comm + t_solver) for an active window of W rows; parareal costs its
pipelined critical path of batch-1 calls. ``choose_solver`` uses measured c(b) and the K the
benchmarks measured to pick the fastest, and never picks a parallel solver unless the model says
it beats serial by a margin.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from deqir_dist.errors import DeqirError, one_line
from deqir_dist.io.limits import read_file_bytes
from deqir_dist.io.jsonio import write_json
from deqir_dist.models.cuda_graph import CUDAGraphDenoiser
from deqir_dist.models.emulated import interpolate_cost, read_cost_table
from deqir_dist.sampling.denoiser import model_device, model_dtype
from deqir_dist.solvers.parareal import block_bounds, parareal_schedule

DEFAULT_BATCHES = (1, 2, 4, 8, 13, 16, 25, 50, 100)
# K to plan with comes from the benchmarks' JSON, never from constants here: picard's K per N and
# window (the built-in prior, 'rows' rule, max over images; ``deqir bench --model builtin --windows
# 0 0.5 0.25``) and parareal's K per N and (B, m) (the built-in prior, its default rule, max over
# every task and image benchmarked, at the nearest etw; ``python bench/parareal.py --model builtin``). A learned
# prior needs far more than the analytic oracle, and planning with the oracle's K would pick a
# parallel solver where it is slower. Without the files no parallel plan is offered.
# The files ship inside the package (K_DIR, package data: an installed wheel has no bench/); they
# are byte-for-byte copies of bench/results/<same name>, which tests/test_profile.py checks.
RESULTS_DIR = Path(__file__).resolve().parents[2] / "bench" / "results"     # where the benchmarks write
K_DIR = Path(__file__).resolve().parent / "planner_k"                        # what the planner reads
K_FILES = ("builtin-sr_avgpool-cpu.json", "parareal-builtin-cpu.json", "parareal-builtin-B6-7-10-cpu.json")
PICARD_K_FILE = K_DIR / K_FILES[0]
PARAREAL_K_FILE = (K_DIR / K_FILES[1], K_DIR / K_FILES[2])
# a parallel plan must beat serial by this fraction of serial's modelled latency
MARGIN = 0.1
_K_CACHE: dict = {}


def _read_json(path) -> dict | None:
    key = str(path)
    if key not in _K_CACHE:
        try:
            _K_CACHE[key] = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            _K_CACHE[key] = None
    return _K_CACHE[key]


def picard_k_table(path=None, etw: float | None = None) -> dict[int, dict[float, int]]:
    """{N: {window / N: K}} from picard's rows of the benchmark JSON ('picard' and 'picard W=w');
    empty when ``etw`` is given and differs from the benchmark's (its K is not known there)."""
    data = _read_json(path or PICARD_K_FILE)
    out: dict[int, dict[float, int]] = {}
    if etw is not None and abs(float((data or {}).get("etw", 0.0)) - etw) > 1e-9:
        return out
    for row in (data or {}).get("rows", []):
        name, n = str(row.get("solver", "")), int(row.get("steps", 0))
        if name == "picard":
            w = n
        elif name.startswith("picard W="):
            w = int(name.split("=", 1)[1])
        else:
            continue
        out.setdefault(n, {})[w / n] = int(row["K"])
    return out


def parareal_k_table(path=None, etw: float | None = None) -> dict[int, dict[tuple[int, int], int]]:
    """{N: {(B, m): K}}: the largest K of the default rule over the benchmarks' cases (tasks, images;
    with ``etw``, the cases at the nearest benchmarked etw, else every etw)."""
    paths = path or PARAREAL_K_FILE
    out: dict[int, dict[tuple[int, int], int]] = {}
    cases = [c for p in ([paths] if isinstance(paths, (str, Path)) else paths)
             for c in (_read_json(p) or {}).get("cases", [])]
    if etw is not None and cases:
        near = min({float(c.get("etw", 0.0)) for c in cases}, key=lambda e: abs(e - etw))
        cases = [c for c in cases if float(c.get("etw", 0.0)) == near]
    for case in cases:
        key = (int(case["blocks"]), int(case["coarse_steps"]))
        k = int(case["final"]["K_max"])
        per_n = out.setdefault(int(case["steps"]), {})
        per_n[key] = max(k, per_n.get(key, 0))
    return out


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
    gen = torch.Generator(device=device).manual_seed(0)     # its own draws: the global RNG is left as it was
    out = {}
    for b in batches:
        x = torch.randn((b, *image_shape), device=device, dtype=dtype, generator=gen)
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


def monotone_cost(c_ms: dict) -> dict[int, float]:
    """The table with c(b) raised to the largest c of any smaller batch: more rows in one call never
    cost less than fewer, so a larger batch timed below a smaller one is timing noise (a busy machine,
    a tiny model), and planning on it would pick a parallel solver for a saving that is not there."""
    out, top = {}, 0.0
    for b, c in sorted((int(k), float(v)) for k, v in c_ms.items()):
        top = max(top, c)
        out[b] = top
    return out


def cost_at(c_ms: dict, b: int) -> float:
    """c(b) by linear interpolation between measured batch sizes (linear extrapolation above), on the
    table's non-decreasing envelope (``monotone_cost``)."""
    if not c_ms:
        raise DeqirError("empty cost profile")
    return interpolate_cost(monotone_cost(c_ms), b)


def _nearest(table: dict, steps: int):
    return min(table, key=lambda n: abs(math.log(n / steps))) if table else None


def expected_iterations(steps: int, window: int | None = None, etw: float | None = None) -> int:
    """picard's K to plan with: the benchmarked K of the nearest N and window fraction, at most N
    (N, i.e. no saving, when nothing was benchmarked at this etw)."""
    table = picard_k_table(etw=etw)
    key = _nearest(table, steps)
    if key is None:
        return steps
    frac = (window or steps) / steps
    f = min(table[key], key=lambda v: abs(math.log(v / frac)))
    return min(table[key][f], steps)


def profile_batches(steps: int, procs: int = 1, max_batch: int | None = None) -> tuple[int, ...]:
    """The batch sizes auto may time, smallest first (``cost_at`` interpolates between them): one
    row, powers of 4 below the smallest window's rows per device, then the rows per device of each
    window ``choose_solver`` weighs (N, N/2, N/4 rows over ``procs`` devices). Timed in this order,
    the timing stops as soon as ``serial_is_certain``: on a CPU, where c(b) grows about like b, a
    few rows decide it, and the batch of N rows is never timed. ``max_batch``: the most rows that
    fit in memory (``api/budget``); larger batches are neither timed nor planned."""
    procs = max(1, procs)
    windows = {w for w in (steps, round(steps / 2), round(steps / 4)) if w >= procs} | {steps}
    rows = {math.ceil(w / procs) for w in windows}
    ladder = {4 ** k for k in range(1, 8) if 4 ** k < min(rows)}
    return tuple(b for b in sorted({1} | ladder | rows) if max_batch is None or b == 1 or b <= max_batch)


def serial_is_certain(c_ms: dict, steps: int, procs: int = 1, **choose_kw) -> bool:
    """True when ``choose_solver`` picks serial whatever the untimed batches (above the largest
    timed one) cost: more rows never cost less (``monotone_cost``), so each untimed c(b) is at
    least the largest timed c, and if no candidate beats serial at that floor, none can."""
    floor = monotone_cost(c_ms)
    top = max(floor)
    need = max(profile_batches(steps, procs, choose_kw.get("max_batch")))
    if need > top:
        floor[need] = floor[top]         # flat above the largest timed batch: the cheapest c can be
    return choose_solver(floor, steps, procs, **choose_kw)[0] == "serial"


def predict_ms(c_ms: dict, steps: int, procs: int = 1, iterations: int | None = None,
               window: int | None = None, overhead_ms: float = 0.0, warm_start: int = 1,
               etw: float | None = None) -> dict:
    """Modelled milliseconds per image: serial T c(1) vs parallel S c(1) + K (c(ceil(W/P)) + overhead).

    W rows per sweep is an upper bound: the frozen prefix only shrinks the batch."""
    w = min(window or steps, steps)
    k = iterations or expected_iterations(steps, w, etw)
    serial = steps * cost_at(c_ms, 1)
    parallel = warm_start * cost_at(c_ms, 1) + k * (cost_at(c_ms, math.ceil(w / procs)) + overhead_ms)
    return {"solver": "picard", "steps": steps, "procs": procs, "window": w, "K": k, "serial_ms": serial,
            "parallel_ms": parallel, "speedup": serial / parallel}


def predict_parareal_ms(c_ms: dict, steps: int, procs: int, blocks: int, coarse_steps: int, iterations: int,
                        overhead_ms: float = 0.0) -> dict:
    """Parareal's modelled milliseconds per image: the pipelined schedule's critical path
    (``solvers.parareal.parareal_schedule``, every call batch 1) x c(1), plus ``overhead_ms`` per
    iteration (K + 1 with the coarse pass)."""
    bounds = block_bounds(steps, blocks)
    sched = parareal_schedule(bounds, [min(coarse_steps, hi - lo) for lo, hi in bounds], iterations, procs)
    serial = steps * cost_at(c_ms, 1)
    parallel = sched["critical_path"] * cost_at(c_ms, 1) + (iterations + 1) * overhead_ms
    return {"solver": "parareal", "steps": steps, "procs": procs, "window": steps, "K": iterations,
            "blocks": blocks, "coarse_steps": coarse_steps, "critical_path_calls": sched["critical_path"],
            "serial_ms": serial, "parallel_ms": parallel, "speedup": serial / parallel}


def parareal_candidates(steps: int, etw: float | None = None) -> list[tuple[int, int, int]]:
    """(B, m, K) benchmarked at the nearest N (B at most N)."""
    table = parareal_k_table(etw=etw)
    key = _nearest(table, steps)
    if key is None:
        return []
    return [(b, m, min(k, b)) for (b, m), k in sorted(table[key].items()) if b <= steps]


def choose_solver(c_ms: dict, steps: int, procs: int = 1, iterations: int | None = None,
                  overhead_ms: float = 0.0, windows: bool = True, parareal: bool = True,
                  margin: float = MARGIN, etw: float | None = None, observed: dict | None = None,
                  max_batch: int | None = None) -> tuple[str, dict]:
    """The solver with the lowest modelled latency, if it beats serial by ``margin``; else 'serial'.

    Candidates: picard over a window of N, N/2 or N/4 rows (at least one row per device; the
    larger one on a tie; with ``iterations`` given or ``windows=False``, a stop rule other than
    'rows', only the whole chain) with K from the benchmark (``expected_iterations``), and, with
    ``parareal`` and no ``iterations`` given, parareal for every benchmarked (B, m) with its
    benchmarked K (``parareal_candidates``). ``etw``: plan with the K measured at that sampler setting
    (picard: only where benchmarked, else K = N; parareal: the nearest benchmarked etw); None: the
    largest K over every setting (parareal) and picard's benchmark as it is. ``observed``: {plan id:
    {"K", "runs", "source"}} from ``api.k_observed`` (this model, task, size and settings): a
    candidate run before is planned with the K it needed, not the table's. ``max_batch``: the
    most rows a process can hold in memory (``api/budget``); plans that need more are left out
    (none left: serial). The returned prediction is the best candidate's; its ``K_source`` says
    where its K came from."""
    sizes = (steps, round(steps / 2), round(steps / 4)) if windows and not iterations else (steps,)
    candidates = sorted({w for w in sizes if w >= procs} | {steps}, reverse=True)
    if max_batch is not None:
        fit = [w for w in candidates if w <= max_batch]
        if not fit:
            pred = predict_ms(c_ms, steps, procs, iterations, steps, overhead_ms, etw=etw)
            return "serial", {**pred, "margin": margin, "memory": f"no parallel plan fits: at most {max_batch} rows"}
        candidates = fit
    observed = observed or {}
    src = "given" if iterations else "benchmark table"
    preds = []
    for w in candidates:
        seen = None if iterations else observed.get(f"picard W={w}")
        k = min(int(seen["K"]), steps) if seen else iterations
        preds.append({**predict_ms(c_ms, steps, procs, k, w, overhead_ms, etw=etw), **_k_source(seen, src)})
    if parareal and not iterations and (max_batch is None or max_batch >= steps):
        for b, m, k in parareal_candidates(steps, etw):
            seen = observed.get(f"parareal B={b} m={m}")
            k = min(int(seen["K"]), b) if seen else k
            preds.append({**predict_parareal_ms(c_ms, steps, procs, b, m, k, overhead_ms), **_k_source(seen, src)})
    best = min(preds, key=lambda p: p["parallel_ms"])     # min keeps the first (larger window) on a tie
    best = {**best, "margin": margin}
    return (best["solver"] if best["parallel_ms"] * (1 + margin) < best["serial_ms"] else "serial"), best


def _k_source(seen: dict | None, default: str) -> dict:
    if not seen:
        return {"K_source": default}
    return {"K_source": f"{seen.get('source', 'observed')} ({seen['runs']} run{'s' * (seen['runs'] != 1)} "
                        "of this model, task, size and settings)"}


def save_profile(path, model_name: str, image_shape, device, c_ms: dict, graph: bool) -> None:
    write_json(path, {"model": model_name, "image_shape": list(image_shape), "device": str(device),
                      "graph": graph, "torch": torch.__version__,
                      "c_ms": {str(k): round(v, 4) for k, v in c_ms.items()}})


def cost_table(c_ms, source) -> dict[int, float]:
    """{b: ms} from a mapping with integer-like keys b >= 1 and finite times > 0 (DeqirError otherwise)."""
    return read_cost_table(c_ms, f"cost profile {source}")


_MAX_TABLE = 1 << 20          # a c(b) profile is a few hundred bytes: no /dev/zero, no pipe


def load_profile(path) -> dict[int, float]:
    """The ``c_ms`` table of a profile JSON file (``save_profile``'s format)."""
    try:
        data = json.loads(read_file_bytes(path, "cost profile", cap=_MAX_TABLE))["c_ms"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else one_line(e, bare_deqir=True)
        raise DeqirError(f"cannot read cost profile {path}: {why}") from None
    return cost_table(data, path)
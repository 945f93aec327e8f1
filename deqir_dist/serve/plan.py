"""The plan follows the load: a batch of B compatible images on a gang of P ranks runs either

* **sharded**: one restore() over all P ranks, every image's chain split into P blocks of rows
  (lowest latency for one image), or
* **data-parallel**: the images dealt out, ceil(B / P) per rank, each rank restoring its own in
  one process (no collectives; throughput when the queue holds enough work),

whichever the cost model of ``api.planner`` (measured c(b), the benchmarks' K, docs/design.md
section 5) predicts finishes the batch first; on a tie, data-parallel (when the plan is serial,
a sharded gang would only run the same chain on every rank). A batch of B images makes every denoiser call B
times larger: c_B(b) = c(B b). Sharded: the best plan for P processes on c_B (``auto``), or the
solver given; data-parallel: the best for one process on c_ceil(B/P). Both are exact: a
data-parallel image is what ``deqir restore`` writes for it, a sharded one what the same chain
sharded over P ranks gives (``parallel.dist``: within float rounding of one process).
"""
from __future__ import annotations

import math

from deqir_dist.api.planner import choose_solver, cost_at, load_profile, predict_ms
from deqir_dist.api.restore import plan_auto
from deqir_dist.models.settings import resolve_settings
from deqir_dist.serve.batch import SETTING_KEYS, Batch

LAYOUTS = ("auto", "sharded", "data-parallel")


def scaled(c_ms: dict, images: int) -> dict:
    """c(b) of calls that carry ``images`` images' rows each: b -> c(images x b)."""
    keys = sorted(set(int(b) for b in c_ms) | {1})
    return {b: cost_at(c_ms, images * b) for b in keys}


def batch_ms(c_ms: dict, steps: int, procs: int, images: int, solver: str, kw: dict, etw) -> float:
    """Modelled milliseconds for ``images`` images restored together on ``procs`` processes."""
    cb = scaled(c_ms, images)
    if solver == "serial":
        return steps * cost_at(cb, 1)
    if solver in ("picard", "anderson"):
        return predict_ms(cb, steps, procs, window=kw.get("window"), etw=etw)["parallel_ms"]
    windows = kw.get("stop", "rows") == "rows"
    choice, pred = choose_solver(cb, steps, procs, windows=windows,
                                 parareal=windows and kw.get("max_iter") is None and "window" not in kw, etw=etw)
    return pred["serial_ms"] if choice == "serial" else pred["parallel_ms"]


def _model_inputs(model, batch: Batch, procs: int):
    """(c_ms, steps, etw, solver) the layout model needs for ``batch``'s key (None: no model)."""
    kw = batch.kw
    solver = kw.get("solver", "auto")
    if solver not in ("auto", "serial", "picard", "anderson"):
        return None
    settings, _ = resolve_settings(model, getattr(batch.op, "name", None), {k: kw.get(k) for k in SETTING_KEYS})
    steps, etw = settings["steps"], settings["etw"]
    profile = kw.get("profile")
    if isinstance(profile, dict):
        c_ms = {int(b): float(v) for b, v in profile.items()}
    elif profile is not None:
        c_ms = load_profile(profile)
    else:
        _, plan = plan_auto(model, batch.op, procs, None, steps, etw, kw.get("stop", "rows"), kw.get("max_iter"),
                            "window" in kw)
        c_ms = plan["c_ms"]
    return c_ms, steps, etw, solver


def predictions(inputs, kw: dict, procs: int, images: int) -> dict:
    c_ms, steps, etw, solver = inputs
    return {"sharded_ms": round(batch_ms(c_ms, steps, procs, images, solver, kw, etw), 2),
            "data_parallel_ms": round(batch_ms(c_ms, steps, 1, math.ceil(images / procs), solver, kw, etw), 2)}


def choose_layout(model, batch: Batch, procs: int, forced: str = "auto") -> tuple[str, dict]:
    """("sharded" | "data-parallel", the two predictions) for ``batch`` on ``procs`` ranks."""
    if procs == 1:
        return "sharded", {}
    if forced != "auto":
        return forced, {}
    inputs = _model_inputs(model, batch, procs)
    if inputs is None:
        return "sharded", {}
    pred = predictions(inputs, batch.kw, procs, len(batch.names))
    # a tie (the serial plan: every rank would repeat the whole chain) goes to data-parallel, where
    # one image keeps one rank busy and leaves the others free
    return ("data-parallel" if pred["data_parallel_ms"] <= pred["sharded_ms"] else "sharded"), pred


def slo_batch_cap(model, batch: Batch, procs: int, max_batch: int, slo_ms: float, forced: str = "auto") -> int:
    """The largest batch (<= max_batch) whose modelled latency, in the layout that would run it,
    fits ``slo_ms``; at least 1 (a lone request is never refused for its own cost)."""
    inputs = _model_inputs(model, batch, procs)
    if inputs is None:
        return 1
    for images in range(max_batch, 1, -1):
        pred = predictions(inputs, batch.kw, procs, images)
        ms = {"sharded": pred["sharded_ms"], "data-parallel": pred["data_parallel_ms"]}.get(
            forced if procs > 1 else "sharded", min(pred.values()))
        if ms <= slo_ms:
            return images
    return 1


def deal(batch: Batch, procs: int) -> list[Batch | None]:
    """The batch's images in ``procs`` contiguous parts (None where a rank gets none)."""
    n = len(batch.names)
    per = math.ceil(n / procs)
    parts = []
    for r in range(procs):
        lo, hi = min(r * per, n), min((r + 1) * per, n)
        parts.append(None if lo == hi else Batch(batch.names[lo:hi], batch.seeds[lo:hi], batch.y[lo:hi], batch.op,
                                                 dict(batch.kw), batch.gts[lo:hi] if batch.gts else []))
    return parts

"""The K a parallel plan really needed on the user's own model: observed, stored, planned with.

``solver="auto"`` plans with K (joint-map evaluations) from the benchmarks' tables
(``api/planner_k``), which were measured on the built-in prior: a proxy. Every parallel run in the
planner's regime (the default stop rule and tolerance, no max_iter) reports its K here, keyed by
everything K depends on: the model (class and weights fingerprint, ``profile_cache``), the task
(operator name, image and measurement shapes as given), the sampler settings (N, etw, nw, clip_x0)
and the chain's schedule (``chain_id``), and the plan (picard with a window of W rows, or parareal with B blocks and m coarse
steps). ``deqir bench --calibrate`` fills the same store from a few of the user's images
(source "calibrated"). The planner then plans each candidate with the largest K of its last
:data:`KEEP` runs (a plan whose observed K makes it slower than serial in the latency model is
therefore no longer chosen) and says, per plan, where its K came from.

One JSON file per key under ``<cache>/k_observed/`` (``profile_cache.cache_dir``); nothing is read
or written when ``DEQIR_PROFILE_CACHE`` or ``DEQIR_LEARN_K`` is off ("0", "off", "no", "false") or the
model is not a torch module. Files are
replaced atomically; an unreadable one counts as empty.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from deqir_dist.api.profile_cache import OFF_ENV, cache_dir, model_fingerprint
from deqir_dist.errors import DeqirError
from deqir_dist.io.jsonio import write_json

KEEP = 8            # the planner uses the largest K of the last KEEP runs of a plan


def chain_id(start: int, alphas_cumprod, spacing: str, offset: int) -> str:
    """The chain's schedule in a key: its start, grid and a digest of alphas_cumprod (None: the library's)."""
    ac = "library" if alphas_cumprod is None else hashlib.sha256(
        alphas_cumprod.detach().double().cpu().numpy().tobytes()).hexdigest()[:16]
    return f"{int(start)}:{spacing}:{int(offset)}:{ac}"


def with_model_chain(model, settings: dict) -> dict:
    """``settings`` with the chain id of the model's own schedule where it names none."""
    if "chain" in settings:
        return settings
    from deqir_dist.models.scheduled import chain_schedule
    ac, start, spacing, offset, _, _ = chain_schedule(model)
    return {**settings, "chain": chain_id(start, ac, spacing, offset)}


def plan_id(pred: dict) -> str:
    """'picard W=<rows>' or 'parareal B=<blocks> m=<coarse steps>' for a planner prediction or a run."""
    if pred.get("solver") == "parareal":
        return f"parareal B={int(pred['blocks'])} m={int(pred['coarse_steps'])}"
    return f"picard W={int(pred['window'])}"


LEARN_ENV = "DEQIR_LEARN_K"


_PAUSED = [0]


def enabled() -> bool:
    """Whether runs are recorded and read (the switches DEQIR_PROFILE_CACHE and DEQIR_LEARN_K)."""
    return all(os.environ.get(v, "").lower() not in ("0", "off", "no", "false") for v in (OFF_ENV, LEARN_ENV))


def _enabled() -> bool:
    return enabled() and not _PAUSED[0]


@contextlib.contextmanager
def paused():
    """Within it, restore() records nothing (``deqir bench --calibrate`` records its runs itself)."""
    _PAUSED[0] += 1
    try:
        yield
    finally:
        _PAUSED[0] -= 1


def store_dir() -> Path:
    return cache_dir() / "k_observed"


def problem_key(model, op, settings: dict) -> dict | None:
    """What K depends on, apart from the plan (None: not stored for this model)."""
    from deqir_dist.models.tiled import TiledDenoiser
    if not _enabled() or isinstance(model, TiledDenoiser):
        return None         # off, or a tiled chain: its K is not a plan auto weighs (and its blend buffers are big)
    fp = model_fingerprint(model)
    if fp is None:
        return None
    settings = with_model_chain(model, settings)
    return {"model": f"{type(model).__qualname__}:{fp}", "task": str(getattr(op, "name", type(op).__name__)),
            "image_shape": [int(d) for d in op.image_shape],
            "measurement_shape": [int(d) for d in op.measurement_shape],
            "settings": {k: settings.get(k) for k in ("steps", "etw", "nw", "clip_x0", "chain")}}


def _path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return store_dir() / f"{digest}.json"


def _read(key: dict) -> dict:
    try:
        data = json.loads(_path(key).read_text())
        if data.get("key") != key or not isinstance(data.get("plans"), dict):
            return {}
        return {str(p): v for p, v in data["plans"].items()
                if isinstance(v, dict) and isinstance(v.get("K"), list) and v["K"]
                and all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in v["K"])}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}


def observed(model, op, settings: dict) -> dict[str, dict]:
    """{plan id: {"K": largest of the last KEEP runs, "runs": how many, "source": ...}} for this problem."""
    key = problem_key(model, op, settings)
    if key is None:
        return {}
    return {p: {"K": max(v["K"][-KEEP:]), "runs": int(v.get("runs", len(v["K"]))),
                "source": str(v.get("source", "observed"))} for p, v in _read(key).items()}


def record(model, op, settings: dict, pid: str, k: int, source: str = "observed") -> bool:
    """Add one run's K (the largest over its images) for plan ``pid``; False when nothing was stored
    (no key, or the cache folder cannot be written: a run never fails for it)."""
    key = problem_key(model, op, settings)
    if key is None or not isinstance(k, int) or k < 1:
        return False
    plans = _read(key)
    entry = plans.get(pid, {"K": [], "runs": 0})
    entry = {"K": (list(entry["K"]) + [int(k)])[-4 * KEEP:], "runs": int(entry.get("runs", 0)) + 1,
             "source": source if source == "calibrated" or entry.get("source") != "calibrated" else "calibrated"}
    plans[pid] = entry
    try:
        path = _path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"key": key, "plans": plans})
    except (OSError, DeqirError):
        return False
    return True


def run_plan_id(solver: str, opts, steps: int) -> str | None:
    """The plan id of a finished parallel run (None for solvers the planner does not choose)."""
    if solver == "parareal":
        return plan_id({"solver": "parareal", "blocks": opts.blocks, "coarse_steps": opts.coarse_steps})
    if solver == "picard" and opts.window:      # window 0 (every row, every sweep) is no plan of auto's
        return plan_id({"solver": "picard", "window": min(opts.window or steps, steps)})
    return None

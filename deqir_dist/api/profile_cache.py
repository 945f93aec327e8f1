"""solver="auto" measures the denoiser's cost c(b) once per (model, device, dtype, image size) and
keeps it in a file, so that a folder of images (or the next run) does not time the model again.

The file lives under the user's cache folder: ``$DEQIR_CACHE_DIR`` if set (tests point it at a
temporary folder), else ``$XDG_CACHE_HOME/deqir-dist``, else ``~/.cache/deqir-dist``; one JSON file
per key in ``profiles/``. The key holds everything a timing depends on: the model's class and a
fingerprint of its weights (names, shapes, dtypes and content sums of every tensor in its state),
the device (CUDA: the GPU's name; CPU: the processor and torch's thread count), the dtype, the
image shape and the torch version. Any change gives another key, so a stale profile is never
read; a file whose stored key differs from the one asked for (or that cannot be parsed) is
measured again and rewritten. A batch size not in the file yet is measured and added.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import weakref
from pathlib import Path

import torch

from deqir_dist.api.planner import cost_table, measure_cost
from deqir_dist.errors import DeqirError
from deqir_dist.io.jsonio import write_json
from deqir_dist.sampling.denoiser import model_device, model_dtype

CACHE_ENV = "DEQIR_CACHE_DIR"
OFF_ENV = "DEQIR_PROFILE_CACHE"          # "0" / "off": measure every time, read and write nothing


def cache_dir() -> Path:
    """The cache folder (not created here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deqir-dist"


_FINGERPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_fingerprint(model) -> str | None:
    """A digest of a torch module's class and the content of its state (None for other callables).

    Sums are computed on the model's device in float64 (one host copy), so a large GPU model is
    not copied to the host. The digest is remembered per module while no tensor of its state is
    replaced or changed in place (each tensor's storage and version counter), so restoring many
    images reads the weights once."""
    if not isinstance(model, torch.nn.Module):
        return None
    state = model.state_dict()
    stamp = tuple((name, t.data_ptr(), t._version, tuple(t.shape), t.dtype) for name, t in state.items())
    stamp += (json.dumps({str(k): float(v) for k, v in getattr(model, "c_ms", {}).items()}, sort_keys=True)
              if isinstance(getattr(model, "c_ms", None), dict) else None,)
    memo = _FINGERPRINTS.get(model)
    if memo is not None and memo[0] == stamp:
        return memo[1]
    digest = _fingerprint(model, state)
    _FINGERPRINTS[model] = (stamp, digest)
    return digest


def _fingerprint(model, state) -> str:
    h = hashlib.sha256(f"{type(model).__module__}.{type(model).__qualname__}".encode())
    table = getattr(model, "c_ms", None)         # a cost-emulating wrapper: its table is its cost
    if isinstance(table, dict):
        h.update(json.dumps({str(k): float(v) for k, v in table.items()}, sort_keys=True).encode())
    sums = []
    with torch.no_grad():
        for name, t in state.items():
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
            if t.device.type == "meta" or t.numel() == 0:
                continue
            v = t.detach().reshape(-1)
            v = v.abs().double() if v.is_complex() else v.double()
            # float64: float32 rounds the last index of a 29 M-element tensor up, past its end
            idx = torch.linspace(0, v.numel() - 1, min(v.numel(), 8), device=v.device, dtype=torch.float64).long()
            sums.append(torch.cat([v.sum()[None], v.abs().sum()[None], v[idx]]))
    if sums:
        h.update(torch.cat([s.cpu() for s in sums]).numpy().tobytes())
    return h.hexdigest()[:32]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    proc = platform.processor() or platform.machine() or "cpu"
    return f"{device.type}:{proc}:{torch.get_num_threads()} threads"


def profile_key(model, image_shape, device=None, dtype=None) -> dict | None:
    """Everything a c(b) timing depends on, or None when the model is not a torch module."""
    fp = model_fingerprint(model)
    if fp is None:
        return None
    dev = torch.device(device) if device is not None else model_device(model)
    dt = dtype or model_dtype(model) or torch.float32
    return {"model": f"{type(model).__qualname__}:{fp}", "device": device_name(dev), "dtype": str(dt),
            "image_shape": [int(d) for d in image_shape], "torch": torch.__version__}


def _path_for(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "profiles" / f"{digest}.json"


def _read(path: Path, key: dict) -> dict[int, float]:
    """The cached {b: ms} of ``key`` in ``path`` ({} when absent, unreadable or for another key)."""
    try:
        data = json.loads(path.read_text())
        if data.get("key") != key:
            return {}
        return cost_table(data["c_ms"], path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, DeqirError):
        return {}


def cached_cost(model, image_shape, batches, measure=None) -> tuple[dict[int, float], dict]:
    """c(b) in ms for each b in ``batches`` and where it came from.

    Returns (c_ms, info): info["source"] is "cache" (every b was in the file), "measured" (some
    or all were timed now; the file was written) or "measured, not cached: <why>"; info["file"]
    is the cache file (or None). ``measure(model, image_shape, batches)`` times the missing ones
    (default: ``planner.measure_cost`` with 3 repeats after 1 warm-up call)."""
    measure = measure or (lambda m, s, b: measure_cost(m, s, batches=b, repeats=3, warmup=1))
    batches = sorted({int(b) for b in batches})
    if os.environ.get(OFF_ENV, "").lower() in ("0", "off", "no", "false"):
        return dict(measure(model, tuple(image_shape), batches)), {"source": f"measured, not cached: {OFF_ENV} is off",
                                                                  "file": None}
    key = profile_key(model, image_shape)
    if key is None:
        return dict(measure(model, tuple(image_shape), batches)), {
            "source": "measured, not cached: the model is not a torch module", "file": None}
    path = _path_for(key)
    have = _read(path, key)
    missing = [b for b in batches if b not in have]
    if not missing:
        return {b: have[b] for b in batches}, {"source": "cache", "file": str(path), "key": key}
    have.update({int(b): round(float(v), 4) for b, v in measure(model, tuple(image_shape), missing).items()})
    info = {"source": "measured", "file": str(path), "key": key}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"key": key, "c_ms": {str(b): v for b, v in sorted(have.items())}})
    except (OSError, DeqirError) as e:
        info.update(source=f"measured, not cached: cannot write {path} ({type(e).__name__})", file=None)
    return {b: have[b] for b in batches}, info


def cost_until_decided(model, image_shape, batches, decided, measure=None) -> tuple[dict[int, float], dict]:
    """c(b) for ``batches`` in order (each read from the cache or timed, as ``cached_cost``), stopping
    after the first b at which ``decided(c_ms so far)`` is true: solver="auto" stops timing once
    the answer cannot change (``planner.serial_is_certain``). Returns (c_ms, info) as
    ``cached_cost``: info["source"] is "cache" when nothing was timed now."""
    c_ms, info = {}, None
    for b in batches:
        got, one = cached_cost(model, image_shape, [b], measure)
        c_ms.update(got)
        if info is None or one["source"] != "cache":
            info = one
        if decided(c_ms):
            break
    return c_ms, info


def plan_reason(choice: str, prediction: dict) -> str:
    """One line: why solver="auto" chose ``choice`` (from ``choose_solver``'s prediction)."""
    p = prediction
    try:
        shape = (f"{p['blocks']} blocks of the {p['steps']} rows, m={p['coarse_steps']}" if p.get("solver") == "parareal"
                 else f"window {p['window']} of {p['steps']} rows")
        model = (f"modelled {p['parallel_ms']:.0f} ms for the best parallel plan ({p.get('solver', 'picard')}, "
                 f"K={p['K']}, {shape}, {p['procs']} process(es)) vs {p['serial_ms']:.0f} ms serial")
    except (KeyError, TypeError, ValueError):
        return f"{choice}: chosen by the cost model"
    if choice == "serial":
        return f"serial: no parallel solver is predicted to be faster ({model})"
    return f"{choice}: predicted {p['serial_ms'] / max(p['parallel_ms'], 1e-9):.2f}x faster than serial ({model})"


def plan_record(res) -> dict:
    """What a result's record says about its solver: {"solver": what ran}, for solver="auto",
    {"plan": the choice, why, and where its cost profile came from}, and {"tiles": ...} when the
    image was restored in tiles (``api.budget``)."""
    out = {"solver": res.solver} if isinstance(getattr(res, "solver", None), str) else {}
    budget = getattr(res, "budget", None)
    if isinstance(budget, dict) and budget.get("tile"):      # restored in tiles (api.budget)
        out["tiles"] = {k: budget[k] for k in ("tile", "overlap", "tiles", "tiles_per_call", "whole_bytes")}
    plan = getattr(res, "plan", None)
    if plan:
        src = plan.get("profile") or {}
        out["plan"] = {"chosen": plan.get("chosen"), "reason": plan.get("reason"), "window": plan.get("window"),
                       "K": plan.get("K"), "K_source": plan.get("K_source"), "speedup": plan.get("speedup"),
                       "profile": src.get("source"),
                       **({"profile_file": src["file"]} if src.get("file") else {})}
    return out


def plan_summary(records: list[dict]) -> dict:
    """summary.json's account of the plans (solver="auto"): each distinct choice and reason with its
    image count, and how many images measured the model versus read the cached profile."""
    plans = [r["plan"] for r in records if isinstance(r.get("plan"), dict)]
    if not plans:
        return {}
    groups: dict = {}
    for p in plans:
        g = groups.setdefault((p["chosen"], p["reason"]), {"chosen": p["chosen"], "reason": p["reason"],
                                                           "window": p["window"], "images": 0})
        g["images"] += 1
    return {"plans": list(groups.values()),
            "K_sources": {s: sum(p.get("K_source") == s for p in plans)
                          for s in sorted({str(p.get("K_source")) for p in plans if p.get("K_source")})},
            "profile_sources": {s: sum(p["profile"] == s for p in plans) for s in sorted({p["profile"] for p in plans})}}

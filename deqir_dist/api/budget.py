"""What a restore will cost, before any work: peak memory and time, checked against a cap.

A restore holds the chain state (a few canvas-sized images per row it keeps) and, inside each
denoiser call, the model's activations, which for a convolutional network are linear in rows x
pixels. :func:`model_footprint` measures the model once per process on a small probe canvas:
the peak bytes of live tensors during one call (every tensor the call creates is counted until it
is freed, ``_PeakBytes``) and the call's time, both per row and pixel. :func:`estimate` scales
them to the canvas, the batch and the rows the solver keeps, and adds the state, the measured
cost probe of ``solver="auto"`` (the batches it may time are limited to what fits) and, for a
measurement read from a clean image, the decode and the operator's matrices.

The cap (:func:`memory_cap`) is what this process may still add to its resident memory:
``max_memory`` (bytes, or a string such as ``"6G"``: the peak RSS allowed) when given, else the
smallest of half the memory the system has available, the cgroup's headroom and the address
space ``RLIMIT_AS`` leaves (a batch job's limits count). On a CUDA device it is the free device
memory.

:func:`plan_budget` decides: the whole canvas when it fits; else, for a fully convolutional model
(``tileable``), overlapping tiles at the model's native size (``models/tiled``) with as many
tiles per call as fit; else a one-line ``DeqirError`` naming the size that would fit.

The work is capped too (:func:`time_cap`): a restore whose modelled time is over ``max_time``
(minutes, or "90m", "3h"; default ``DEFAULT_MAX_MINUTES``, 0: no cap) is refused in one line
naming the size and the step count that fit, before any of it runs. Memory alone does not bound
a hostile file: a 229-byte PNG claiming a 4096x4096 picture fits in 256 px tiles, at hours of
CPU. The time is checked with the probe's per-pixel cost first (a lower bound: per pixel a CPU is
slower on large maps), so a refused run never times a large call either.
"""
from __future__ import annotations

import math
import os
import resource
import weakref
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from deqir_dist.api.planner import cost_at, measure_cost
from deqir_dist.errors import DeqirError, TooLarge, is_int, is_real, one_line
from deqir_dist.models.tiled import overlap_factor, tile_count
from deqir_dist.sampling.denoiser import model_device, model_dtype

DEFAULT_FRACTION = 0.5       # of the memory the system has available
SAFETY = 1.5                 # tracked tensor bytes -> resident bytes (allocator slack, kernel workspaces)
PROBE_SIDE = 64              # the probe canvas (pixels a side, rounded to the model's multiple)
SERIAL_STATE = 10            # canvas images the serial sampler holds per image (y, xi, h, x0, A+ y, temporaries)
ROW_STATE = 8                # canvas images a parallel solver holds per row and image (ChainBlock's rows)
ANDERSON_ROWS = 2            # + 2 m per row for Anderson's history
CLEAN_DECODE = 6             # canvas images to read a clean image and degrade it (uint8, float, A x)
TILES_PER_CALL = (4, 64)     # the most tiles in one call (CPU, CUDA): a CPU gains nothing from larger batches
OP_MATRICES = 32             # bytes per (H^2 + W^2): separable operators' float64 factors (SVD base)
DEFAULT_MAX_MINUTES = 180    # the work cap: a restore modelled at over 3 h is refused (max_time / --max-time)


class _PeakBytes(TorchDispatchMode):
    """The peak bytes of the tensors alive at once, among those created inside the mode: each op's
    new storages are held by weak reference (no callback: nothing outlives the mode) and the live
    total is recounted after every op."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # True (torch's default) wraps __torch_dispatch__ in torch._dynamo.disable, whose first
        # call imports torch._dynamo (sympy, mpmath: ~70 MB of RSS) on the refusal path; nothing
        # is compiled inside this mode
        return False

    def __init__(self):
        super().__init__()
        self.peak = 0
        self._refs: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key, n = (st.device.type, st.data_ptr()), st.nbytes()
                old = self._refs.get(key)
                if n and (old is None or old[0]() is None):
                    self._refs[key] = (weakref.ref(st), n)
        self._refs = {k: v for k, v in self._refs.items() if v[0]() is not None}
        self.peak = max(self.peak, sum(n for _, n in self._refs.values()))
        return out


def peak_tensor_bytes(fn, *args, **kwargs) -> tuple[object, int]:
    """(fn(*args, **kwargs), the peak bytes of tensors it had alive at once)."""
    mode = _PeakBytes()
    with mode:
        out = fn(*args, **kwargs)
    mode._refs.clear()
    return out, mode.peak


@dataclass(frozen=True)
class Footprint:
    """One denoiser call per row and canvas pixel: bytes (x SAFETY) and milliseconds."""

    bytes_per_px: float
    ms_per_px: float
    probe: tuple
    c_ms: dict | None = None        # a cost-emulating model's table: its calls last c(b), whatever the size


_FOOTPRINTS: dict = {}


def _key(model):
    try:
        return weakref.ref(model)
    except TypeError:
        return id(model)


def model_footprint(model, channels: int, canvas_hw: tuple | None = None) -> Footprint:
    """The model's cost per row and pixel, measured once per model object on a small canvas
    (``PROBE_SIDE`` px; a model that refuses that size is probed on ``canvas_hw``, the canvas it
    will run on, when that is at most 512 x 512 pixels)."""
    k = _key(model)
    got = _FOOTPRINTS.get(k)
    if got is not None:
        return got
    table = getattr(model, "c_ms", None)
    if isinstance(table, dict) and callable(getattr(model, "model", None)):    # models.emulated: its
        inner = model_footprint(model.model, channels, canvas_hw)              # model's bytes, its table's time
        fp = Footprint(inner.bytes_per_px, inner.ms_per_px, inner.probe, dict(table))
        _FOOTPRINTS[k] = fp
        return fp
    m = max(1, int(getattr(model, "size_multiple", 1) or 1))
    side = max(m, -(-PROBE_SIDE // m) * m)
    dev = model_device(model, default=torch.device("cpu"))
    dt = model_dtype(model) or torch.float32
    t = torch.full((1,), 500, dtype=torch.int64, device=dev)
    hw = (side, side)
    x = torch.randn((1, channels, *hw), generator=torch.Generator().manual_seed(0)).to(dev, dt)
    with torch.no_grad():
        try:
            _, peak = peak_tensor_bytes(model, x, t)
        except Exception as e:          # noqa: BLE001 - e.g. a model of one fixed size
            if canvas_hw is not None and tuple(canvas_hw) == hw:
                raise                   # it fails on the canvas itself: its own error, as without the probe
            if canvas_hw is None or canvas_hw[0] * canvas_hw[1] > 512 * 512:
                raise DeqirError(f"cannot estimate the model's memory: it fails on a {side}x{side} probe "
                                 f"({one_line(e)})") from None
            hw = tuple(int(v) for v in canvas_hw)
            x = torch.randn((1, channels, *hw), generator=torch.Generator().manual_seed(0)).to(dev, dt)
            _, peak = peak_tensor_bytes(model, x, t)
        # one more call, timed (the tracked one pays the tracking; it was the warm-up)
        ms = measure_cost(model, (channels, *hw), batches=(1,), device=dev, dtype=dt, repeats=1, warmup=0)[1]
    px = hw[0] * hw[1]
    fp = Footprint(SAFETY * peak / px, ms / px, (channels, *hw))
    _FOOTPRINTS[k] = fp
    return fp


def parse_memory(value) -> int:
    """Bytes from an int or a string with a unit: ``"6G"``, ``"500M"``, ``"2.5GB"``, ``"800MiB"``."""
    if is_int(value) and not isinstance(value, bool):
        n = int(value)
    elif isinstance(value, str):
        s = value.strip().upper().removesuffix("IB").removesuffix("B")
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(s[-1:], 1)
        try:
            n = int(float(s[:-1] if mult > 1 else s) * mult)
        except ValueError:
            n = -1
    elif is_real(value) and not isinstance(value, bool):
        n = int(value)
    else:
        n = -1
    if n <= 0:
        raise DeqirError(f"max_memory must be a positive size such as 6G, 500M or a number of bytes, got {value!r}")
    return n


def time_cap(max_time=None) -> tuple[float | None, str]:
    """(seconds a restore may be modelled to take, or None for no cap; how the cap was set).
    ``max_time``: minutes (a number), a string with a unit ("90m", "3h", "45s", "1.5h"), 0 for no
    cap, None for ``DEFAULT_MAX_MINUTES``."""
    if max_time is None:
        return DEFAULT_MAX_MINUTES * 60.0, f"the default {_fmt_s(DEFAULT_MAX_MINUTES * 60.0)}; --max-time MINUTES " \
                                           "raises it, 0 lifts it"
    minutes = -1.0
    if is_real(max_time):
        minutes = float(max_time)
    elif isinstance(max_time, str):
        v = max_time.strip().lower()
        mult = {"s": 1 / 60, "m": 1.0, "min": 1.0, "h": 60.0}
        unit = next((u for u in ("min", "s", "m", "h") if v.endswith(u)), "")
        try:
            minutes = float(v[:len(v) - len(unit)] if unit else v) * mult.get(unit, 1.0)
        except ValueError:
            minutes = -1.0
    if not (math.isfinite(minutes) and minutes >= 0):
        raise DeqirError(f"max_time (--max-time) must be minutes >= 0 (0: no limit) or a time such as 90m, 3h or "
                         f"45s, got {max_time!r}")
    if minutes == 0:
        return None, "no limit"
    given = f"{max_time} min" if is_real(max_time) or str(max_time).strip().replace(".", "", 1).isdigit() else max_time
    return minutes * 60.0, f"--max-time {str(given).strip()}"


def _rss() -> int:
    try:
        import psutil
        return int(psutil.Process().memory_info().rss)
    except Exception:      # noqa: BLE001 - psutil missing or /proc unreadable: the peak so far
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cgroup_headroom() -> int | None:
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit == "max":
            return None
        return int(limit) - int(open("/sys/fs/cgroup/memory.current").read().strip())
    except (OSError, ValueError):
        return None


def _address_space_headroom() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        import psutil
        vms = int(psutil.Process().memory_info().vms)
    except Exception:      # noqa: BLE001
        return None
    return int(0.8 * (soft - vms))       # threads and libraries still map address space as work starts


def memory_cap(max_memory=None, device=None) -> tuple[int, str]:
    """(bytes this process may still add, how the cap was set: for messages)."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if max_memory is not None:
        cap = parse_memory(max_memory)
        return cap - (_rss() if dev.type == "cpu" else 0), f"--max-memory {_fmt(cap)} less what is resident"
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(0.9 * free), "90% of the free GPU memory"
    import psutil
    room = [(int(DEFAULT_FRACTION * psutil.virtual_memory().available), "half the available memory")]
    for value, why in ((_cgroup_headroom(), "the cgroup's memory limit"),
                       (_address_space_headroom(), "the address-space limit (ulimit -v)")):
        if value is not None:
            room.append((value, why))
    value, why = min(room)
    return value, f"{why}; --max-memory sets it"


def _fmt(n: float) -> str:
    n = float(n)
    return f"{n / (1 << 30):.1f} GB" if n >= 1 << 30 else f"{n / (1 << 20):.0f} MB"


def _fmt_s(s: float) -> str:
    if s < 10:
        return f"{s:.2g} s"
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


@dataclass
class Budget:
    """The estimate for one restore (``RestoreResult.budget`` holds ``as_dict()``)."""

    canvas: tuple                    # (C, H, W) the chain runs on
    batch: int
    steps: int
    solver: str
    rows: int                        # chain rows held per image
    extra_bytes: int                 # what the restore adds to this process's memory
    cap_bytes: int                   # what it may add
    cap_source: str
    seconds: float                   # modelled
    calls: int                       # denoiser calls (serial: N)
    ms_per_call: float
    tile: int | None = None
    overlap: int | None = None
    tiles: int | None = None
    tiles_per_call: int | None = None
    probe_batches: int = 1           # the most rows auto's cost probe may time (and its plan hold)
    whole_bytes: int | None = None   # tiled because the whole canvas needs this much (over the cap)
    max_seconds: float | None = None  # the work cap it was checked against (None: no cap)

    @property
    def fits(self) -> bool:
        return self.extra_bytes <= self.cap_bytes

    def as_dict(self) -> dict:
        d = asdict(self)
        d["canvas"] = list(self.canvas)
        return d

    def line(self) -> str:
        _, H, W = self.canvas
        how = (f"in {self.tiles} overlapping {self.tile} px tiles ({self.tiles_per_call} per call)" if self.tile
               else "whole")
        if self.whole_bytes:
            how += f", tiled because the whole image needs {_fmt(self.whole_bytes)}"
        return (f"{W}x{H} output {how}, {self.solver}, {self.steps} steps: about {_fmt_s(self.seconds)} "
                f"({self.calls} calls x {self.ms_per_call / 1e3:.2f} s, modelled) and {_fmt(self.extra_bytes)} "
                f"more memory (cap {_fmt(self.cap_bytes)})")


def _image_bytes(canvas, batch: int, dtype) -> int:
    C, H, W = canvas
    return batch * C * H * W * torch.empty((), dtype=dtype).element_size()


def estimate(model, canvas: tuple, batch: int = 1, steps: int = 100, solver: str = "serial", rows: int = 1,
             dtype=torch.float32, tile: int | None = None, overlap: int | None = None,
             tiles_per_call: int | None = None, from_clean: bool = False,
             cap: tuple[int, str] | None = None, iterations: int | None = None, anderson_m: int = 0,
             call_rows: int | None = None) -> Budget:
    """The memory and time of a restore on ``canvas`` (C, H, W): ``rows`` chain rows per image held
    and evaluated per call (serial: 1), ``tile`` (with ``overlap``, ``tiles_per_call``) when the
    model runs in tiles; ``call_rows`` the rows per denoiser call when fewer than ``rows`` (a
    picard window)."""
    C, H, W = (int(v) for v in canvas)
    fp = model_footprint(model, C, (H, W))
    img = _image_bytes(canvas, batch, dtype)
    state = SERIAL_STATE * img + (rows * (ROW_STATE + ANDERSON_ROWS * anderson_m) * img if rows > 1 else 0)
    if from_clean:
        state += CLEAN_DECODE * img + OP_MATRICES * (H * H + W * W)
    calls_rows = max(call_rows or rows, 1) * batch
    mult = max(1, int(getattr(model, "size_multiple", 1) or 1))
    if tile:
        ov = tile // 4 if overlap is None else overlap
        ntiles = tile_count((H, W), tile, ov, mult)
        per_call = max(1, min(tiles_per_call or ntiles * calls_rows, ntiles * calls_rows))
        act = fp.bytes_per_px * per_call * min(tile, H) * min(tile, W)
        act += 3 * img * calls_rows // batch          # the blended output, the tiles cut from x
        px = calls_rows * H * W * overlap_factor((H, W), tile, ov, mult)
    else:
        ov, ntiles, per_call = None, None, None
        act = fp.bytes_per_px * calls_rows * H * W
        px = calls_rows * H * W
    ms = fp.ms_per_px * px if fp.c_ms is None else cost_at(fp.c_ms, calls_rows)
    calls = steps if solver == "serial" or rows <= 1 else (iterations or steps)
    cap_bytes, cap_source = cap or memory_cap()
    return Budget((C, H, W), batch, steps, solver, rows, int(state + act), int(cap_bytes), cap_source,
                  calls * ms / 1e3, calls, ms, tile, ov, ntiles, per_call, 1)


def native_tile(model) -> int | None:
    """The tile a model is restored in when the whole canvas does not fit: its ``tile_size``, an
    ADM's training size, or 4 x a DDPM UNet's training crop (None: the model cannot be tiled)."""
    if not getattr(model, "tileable", False):
        return None
    size = getattr(model, "tile_size", None) or getattr(model, "image_size", None)
    if size is None and getattr(model, "resolution", None):
        size = 4 * int(model.resolution)
    mult = max(1, int(getattr(model, "size_multiple", 1) or 1))
    return None if not size else max(mult, int(size) // mult * mult)


def largest_fit(budget: Budget, per_px: float, fixed: float = 0.0) -> tuple[int, int]:
    """(W, H) of the largest canvas at this aspect whose estimate (linear in pixels) fits the cap."""
    _, H, W = budget.canvas
    room = max(0.0, budget.cap_bytes - fixed)
    scale = math.sqrt(room / max(per_px * H * W, 1.0))
    return max(0, int(W * scale)), max(0, int(H * scale))


def solver_rows(solver: str, steps: int, options: dict) -> tuple[int, int | None, int]:
    """(rows held per image, rows per denoiser call or None for all of them, Anderson's m) of a
    solver: serial and auto (planned as serial; its parallel plans are checked again) hold one
    row; picard and anderson all N, a window per call; parareal N, its blocks per call."""
    if solver in ("serial", "auto"):
        return 1, None, 0
    if solver == "parareal":
        return steps, options.get("blocks") or max(1, math.ceil(steps / 5)), 0
    m = int(options.get("m", 5) or 0) if solver == "anderson" else 0
    return steps, options.get("window") or steps, m


_LARGE_MS: dict = {}
LARGE_SIDE = 256             # the time of a call is re-measured at this side once a run of that size is decided


def _refine_time(model, budget: Budget) -> Budget:
    """The time of a decided run from one call at ``LARGE_SIDE`` px (or the canvas / tile, if
    smaller) instead of the 64 px probe: per pixel a CPU is slower on large maps (caches), by
    ~1.2x at 256 px and ~1.7x at 512 px for the built-in prior. Only a run that fits gets here,
    so this call fits too. The per-pixel time used is at most that of any larger side measured
    before (one timing is noisy on a loaded machine)."""
    fp = model_footprint(model, budget.canvas[0])
    side = min(LARGE_SIDE, budget.tile or LARGE_SIDE, budget.canvas[1], budget.canvas[2])
    mult = max(1, int(getattr(model, "size_multiple", 1) or 1))
    side = side // mult * mult
    if fp.c_ms is not None or side * side <= fp.probe[1] * fp.probe[2]:
        return budget
    key = (_key(model), side)
    if key not in _LARGE_MS:
        dev = model_device(model, default=torch.device("cpu"))
        try:
            ms = measure_cost(model, (budget.canvas[0], side, side), batches=(1,), device=dev,
                              dtype=model_dtype(model) or torch.float32, repeats=1, warmup=1)[1]
            _LARGE_MS[key] = ms / (side * side)
        except Exception:                   # noqa: BLE001 - a model of one size: keep the probe's
            _LARGE_MS[key] = fp.ms_per_px
    # per pixel a smaller map is never slower than a larger one measured before: a single timing
    # taken under load must not make the size a refusal named (scaled down from a larger one) fail
    rate = min([_LARGE_MS[key]] + [v for (k, s), v in _LARGE_MS.items() if k == key[0] and s > side])
    ratio = max(1.0, rate / fp.ms_per_px)
    budget.ms_per_call *= ratio
    budget.seconds *= ratio
    return budget


def _check_time(budget: Budget, limit: tuple[float | None, str], model) -> Budget:
    """``budget`` when its modelled time is within the work cap, else a one-line DeqirError naming
    the size that fits at these steps and the steps that fit at this size (time is linear in both)."""
    cap_s, source = limit
    budget.max_seconds = cap_s
    if cap_s is None or budget.seconds <= cap_s:
        return budget
    _, H, W = budget.canvas
    ratio = cap_s / budget.seconds
    fw, fh = int(W * math.sqrt(ratio)), int(H * math.sqrt(ratio))
    steps_fit = int(budget.steps * ratio)
    how = f"in {budget.tiles} {budget.tile} px tiles, " if budget.tile else ""
    size = (f"at {budget.steps} steps an image of at most about {fw}x{fh} fits" if min(fw, fh) >= 1 else
            f"at {budget.steps} steps no image size fits")
    steps = (f", or about {steps_fit} step{'s' * (steps_fit > 1)} (--steps) at this size" if steps_fit >= 1 else
             ", and not even one step fits at this size")
    batch = f" ({budget.batch} images in one call)" if budget.batch > 1 else ""
    raise TooLarge(f"restoring a {W}x{H} image{batch} ({type(model).__name__}, {budget.solver}, {budget.steps} "
                     f"steps, {how}{budget.calls} calls x {budget.ms_per_call / 1e3:.2f} s) would take about "
                     f"{_fmt_s(budget.seconds)} (modelled), over the {_fmt_s(cap_s)} work cap ({source}): "
                     f"{size}{steps}")


def _decided(model, budget: Budget, limit) -> Budget:
    """The decided run's time refined (``_refine_time``) and checked against the work cap: first
    with the probe's time (a lower bound), so a run refused for its work never times a large call."""
    _check_time(budget, limit, model)
    return _check_time(_refine_time(model, budget), limit, model)


def plan_budget(model, canvas: tuple, batch: int, steps: int, solver: str, rows: int, dtype=torch.float32,
                max_memory=None, tile=None, from_clean: bool = False, iterations: int | None = None,
                anderson_m: int = 0, device=None, call_rows: int | None = None, max_time=None) -> Budget:
    """The estimate for the restore to run, the tiling decided: ``tile`` None decides (whole when it
    fits, else the model's native tile), 0 / False never tiles, an int always tiles at that size.
    Raises a one-line DeqirError when nothing fits, naming the size (or setting) that would, and
    when the run's modelled time is over ``max_time`` (``time_cap``: minutes; None the default
    cap, 0 none)."""
    cap = memory_cap(max_memory, device)
    limit = time_cap(max_time)
    if tile is not None and tile is not False and not (is_int(tile) and int(tile) >= 0):
        raise DeqirError(f"tile must be a tile size in pixels (0: never tile), got {tile!r}")
    kw = dict(batch=batch, steps=steps, solver=solver, rows=rows, dtype=dtype, from_clean=from_clean, cap=cap,
              iterations=iterations, anderson_m=anderson_m, call_rows=call_rows)
    native = native_tile(model)
    if tile:
        if native is None:
            raise DeqirError(f"{type(model).__name__} cannot be tiled (only fully convolutional priors: the "
                             "built-in one, DDPM and ADM UNets); leave tile unset")
        return _decided(model, _fit_tiles(model, canvas, int(tile), kw), limit)
    whole = estimate(model, canvas, **kw)
    if whole.fits:
        whole.probe_batches = _probe_rows(model, canvas, kw)
        return _decided(model, whole, limit)
    if native is not None and tile is None and rows <= 1:
        tiled = _fit_tiles(model, canvas, native, kw, quiet=True)
        if tiled is not None:
            tiled.whole_bytes = whole.extra_bytes
            return _decided(model, tiled, limit)
    C, H, W = canvas
    # at this aspect every term scales with the pixels (the state, the activations; the operator's
    # H^2 + W^2 factors of a clean image too), but one tile's activations, which stay the same
    fw, fh = largest_fit(whole, whole.extra_bytes / (H * W))
    chunk = 0.0
    if native is not None and tile is None and rows <= 1:      # the largest the tiles can take
        one = estimate(model, canvas, tile=native, tiles_per_call=1, **kw)
        chunk = model_footprint(model, C).bytes_per_px * min(native, H) * min(native, W)
        fw, fh = largest_fit(one, (one.extra_bytes - chunk) / (H * W), chunk)
    advice = (f"a {solver} window of fewer rows (--window), solver serial, or " if rows > 1 else "")
    tiles = ("; tiling was turned off (tile=0)" if native is not None and not tile and tile is not None else
             "" if native is None else f"; even in {native} px tiles the chain state alone is too large")
    fit = f"{advice}an image of at most about {fw}x{fh} fits"
    mult = max(4, int(getattr(model, "size_multiple", 1) or 1))
    if min(fw, fh) < mult:    # no real picture fits: say why instead of naming a size such as 0x0
        room = max(0, whole.cap_bytes)
        why = (f"nothing is left under the cap with {_fmt(_rss())} already resident (the model, torch)"
               if room < 1 << 20 else
               f"the {_fmt(room)} left under the cap is less than one {native} px tile's activations need" if chunk
               else f"the {_fmt(room)} left under the cap is less than a {mult}x{mult} image needs")
        fit = f"no image of this shape fits: {why}; raise the limit"
    raise TooLarge(f"restoring a {W}x{H} image ({type(model).__name__}, {solver}, {rows} row(s)) needs about "
                     f"{_fmt(whole.extra_bytes)} more memory, over the {_fmt(max(0, whole.cap_bytes))} it may use "
                     f"({whole.cap_source}){tiles}: {fit}")


def _probe_rows(model, canvas, kw) -> int:
    """The most rows per call that fit next to a parallel solver's state of all N rows: what auto
    may time (c(b) for b up to it) and the largest window it may plan; 1 when the state of N rows
    does not fit (only serial can run)."""
    one = estimate(model, canvas, **kw)
    img = _image_bytes(canvas, kw["batch"], kw["dtype"])
    room = one.cap_bytes - one.extra_bytes - kw["steps"] * ROW_STATE * img
    per_row = max(1.0, kw["batch"] * model_footprint(model, canvas[0]).bytes_per_px * canvas[1] * canvas[2])
    return max(1, 1 + int(room // per_row)) if room >= 0 else 1


def _fit_tiles(model, canvas, tile: int, kw, quiet: bool = False) -> Budget | None:
    """Tiles of ``tile`` px with as many per call as fit (at most ``TILES_PER_CALL``)."""
    C, H, W = canvas
    mult = max(1, int(getattr(model, "size_multiple", 1) or 1))
    if tile % mult:
        raise DeqirError(f"tile {tile} must be a multiple of the model's size multiple {mult}")
    one = estimate(model, canvas, tile=tile, tiles_per_call=1, **kw)
    if not one.fits:
        if quiet:
            return None
        raise TooLarge(f"restoring a {W}x{H} image in {tile} px tiles needs about {_fmt(one.extra_bytes)} more "
                         f"memory, over the {_fmt(max(0, one.cap_bytes))} it may use ({one.cap_source}): use "
                         "smaller tiles or a smaller image")
    per_tile = max(1.0, model_footprint(model, C).bytes_per_px * min(tile, H) * min(tile, W))
    most = one.tiles * max(1, kw["call_rows"] or kw["rows"]) * kw["batch"]
    n = int(min(TILES_PER_CALL[model_device(model, default=torch.device("cpu")).type == "cuda"], most,
                1 + (one.cap_bytes - one.extra_bytes) // per_tile))
    return estimate(model, canvas, tile=tile, tiles_per_call=max(1, n), **kw)


def input_check(model, task: str | None, steps: int | None = None, solver: str = "auto", options: dict | None = None,
                max_memory=None, tile=None, on_budget=None, max_time=None):
    """``check(path, image_shape, from_clean)`` for ``dataset.items`` (``ItemSource``, ``load_items``):
    the restore of each input estimated from its header's size, before its pixels are decoded or
    its operator built; over the cap and not tileable, a one-line DeqirError naming the file and
    the size that fits; over the work cap ``max_time`` (``time_cap``), the same. ``steps`` None:
    the model card's. ``on_budget(path, budget)`` sees each estimate (the CLI prints one line per
    size)."""
    from deqir_dist.api.conventions import size_multiple
    from deqir_dist.models.settings import resolve_settings
    if max_memory is not None:
        parse_memory(max_memory)
    time_cap(max_time)
    if tile is not None and tile is not False and not (is_int(tile) and int(tile) >= 0):
        raise DeqirError(f"tile (--tile) must be a tile size in pixels (0: never tile), got {tile!r}")
    steps = resolve_settings(model, task, {"steps": steps})[0]["steps"]
    rows, call_rows, m = solver_rows(solver, steps, options or {})
    mult = size_multiple(model)

    def check(path, shape, from_clean):
        C, H, W = (int(v) for v in shape)
        canvas = (C, -(-H // mult) * mult, -(-W // mult) * mult)
        try:
            b = plan_budget(model, canvas, 1, steps, solver, rows, max_memory=max_memory, tile=tile,
                            from_clean=from_clean, call_rows=call_rows, anderson_m=m, max_time=max_time)
        except DeqirError as e:
            raise type(e)(f"{path}: {e}") from None     # TooLarge stays TooLarge
        if on_budget is not None:
            on_budget(path, b)
    return check

"""Any size in bounded memory (issue 25): the estimate made before any work (api/budget), the cap
and its one-line refusal, tiles blended at every step (models/tiled), allocator failures as one
line, and the red team's two files (a 229-byte PNG claiming 4096x4096, a 4096x4096 PNG of zeros
with --from-clean) refused in one line under 500 MB of RSS."""
from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from deqir_dist.api import budget as B
from deqir_dist.api.planner import choose_solver, profile_batches
from deqir_dist.api.restore import restore
from deqir_dist.apps.cli import main
from deqir_dist.errors import DeqirError
from deqir_dist.models import load_denoiser
from deqir_dist.models.tiled import TiledDenoiser, tile_starts
from deqir_dist.physics.registry import make_operator

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def builtin():
    return load_denoiser("builtin")


class _Pointwise(torch.nn.Module):
    """eps = tanh(x) * (1 + t / 1000): no context at all, so any tiling must give it exactly."""

    size_multiple = 4
    tileable = True

    def forward(self, x, t):
        return torch.tanh(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000)


def _problem(h, w, scale=4, seed=0):
    op = make_operator("sr_avgpool", image_shape=(3, h, w), scale=scale)
    x = torch.rand((1, 3, h, w), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return op, op.A(x), x


# ------------------------------------------------------------------------------------------- tiles


def test_tile_layout_covers_the_canvas_on_the_model_grid():
    for size, tile, ov in ((100, 32, 8), (64, 64, 16), (40, 64, 16), (257, 64, 0)):
        starts = tile_starts(size, min(tile, size), ov, 4)
        assert starts[0] == 0 and starts[-1] + min(tile, size) == size
        assert all(b - a <= min(tile, size) - ov or ov == 0 for a, b in zip(starts, starts[1:]))
        if size % 4 == 0:
            assert all(s % 4 == 0 for s in starts)


def test_tiled_pointwise_model_is_exact_and_one_tile_is_the_model(builtin):
    m = _Pointwise()
    x = torch.randn(3, 3, 72, 100, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500, 990])
    for tile, ov, per_call in ((32, 8, None), (32, 0, 5), (48, 16, 1)):
        td = TiledDenoiser(m, (72, 100), tile, ov, per_call)
        assert td.tiles > 1
        torch.testing.assert_close(td(x, t), m(x, t), rtol=1e-6, atol=1e-6)   # weights sum to one
    # a canvas within one tile: the model's own call on the whole image, bit for bit
    xb = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    tb = torch.tensor([300, 300])
    with torch.no_grad():
        assert torch.equal(TiledDenoiser(builtin, (32, 48), 64)(xb, tb), builtin(xb, tb))


def test_tiled_restore_is_close_to_whole_and_tiles_form_one_chain(builtin):
    """The built-in prior is convolutional: one chain over blended tiles stays close to the whole
    canvas's chain (same noise), and far closer than to another sample."""
    op, y, _ = _problem(64, 96)
    kw = dict(steps=10, solver="serial", generator=None)
    whole = restore(builtin, y, op, tile=0, **{**kw, "generator": torch.Generator().manual_seed(0)})
    tiled = restore(builtin, y, op, tile=32, **{**kw, "generator": torch.Generator().manual_seed(0)})
    other = restore(builtin, y, op, tile=0, **{**kw, "generator": torch.Generator().manual_seed(1)})
    assert tiled.budget["tile"] == 32 and tiled.budget["tiles"] > 1 and whole.budget["tile"] is None
    d_tiled = (tiled.images - whole.images).pow(2).mean()
    d_other = (other.images - whole.images).pow(2).mean()
    # measured: 0.38 x with the prior shipped on 2026-12-08 (under 0.25 x with the previous, less
    # trained one, whose samples differed more); how close tiles come at real tile sizes is
    # bench/tiles.py's job, this bound only says one blended chain is not a different sample
    assert d_tiled < 0.5 * d_other, (float(d_tiled), float(d_other))


# ---------------------------------------------------------------------------------- the estimate


def test_parse_memory():
    assert B.parse_memory("6G") == 6 << 30 and B.parse_memory("500M") == 500 << 20
    assert B.parse_memory("2.5GB") == int(2.5 * (1 << 30)) and B.parse_memory(1234) == 1234
    for bad in ("lots", "-1G", 0, None, True):
        with pytest.raises(DeqirError, match="max_memory must be"):
            B.parse_memory(bad)


@pytest.mark.parametrize("solver", ["serial", "picard", "anderson"])
def test_estimate_bounds_the_tensors_a_restore_holds(builtin, solver):
    """Every tensor the restore creates, tracked until freed: the estimate is above the peak, and
    not absurdly so (within 4x): it is a model of the memory, not a guess."""
    op, y, _ = _problem(48, 64)
    res, peak = B.peak_tensor_bytes(restore, builtin, y, op, steps=12, solver=solver,
                                    generator=torch.Generator().manual_seed(0))
    est = res.budget["extra_bytes"]
    assert peak <= est <= 4 * peak, (solver, peak, est)


def test_over_the_cap_is_one_line_naming_the_size_that_fits():
    analytic = load_denoiser("analytic")
    op, y, _ = _problem(128, 128)
    whole = B.estimate(analytic, (3, 128, 128), steps=5, cap=(1 << 40, "test"))
    cap = B._rss() + whole.extra_bytes // 4
    with pytest.raises(DeqirError) as e:
        restore(analytic, y, op, steps=5, solver="serial", max_memory=cap)
    msg = str(e.value)
    assert "\n" not in msg and "128x128" in msg and "--max-memory" in msg and "at most about" in msg
    side = int(msg.split("at most about ")[1].split("x")[0])
    assert 40 <= side <= 80, msg            # a quarter of the memory: about half the side


def test_a_canvas_over_the_cap_is_tiled_and_says_so(builtin, monkeypatch):
    monkeypatch.setattr(builtin, "tile_size", 32, raising=False)     # its native tile, on a small canvas
    op, y, _ = _problem(192, 256)
    whole = B.estimate(builtin, (3, 192, 256), steps=2, cap=(1 << 40, "test"))      # ~150 MB
    cap = B._rss() + whole.extra_bytes // 2                  # tiles of 32 px need ~20 MB: a wide margin
    res = restore(builtin, y, op, steps=2, max_memory=cap, generator=torch.Generator().manual_seed(0))
    b = res.budget
    assert b["tile"] == 32 and b["tiles"] > 1 and b["whole_bytes"] > b["cap_bytes"] >= b["extra_bytes"]
    assert res.solver == "serial" and res.images.shape == (1, 3, 192, 256) and torch.isfinite(res.images).all()
    with pytest.raises(DeqirError, match="tiling was turned off"):
        restore(builtin, y, op, steps=2, max_memory=cap, tile=0)


def test_memory_decides_what_auto_may_time_and_plan():
    assert profile_batches(100, 1, max_batch=10) == (1, 4)
    c = {b: 10.0 for b in (1, 4, 16, 25, 50, 100)}         # flat c(b): parallel would win by far
    assert choose_solver(c, 100)[0] != "serial"
    choice, pred = choose_solver(c, 100, max_batch=8)
    assert choice == "serial" and "no parallel plan fits" in pred["memory"]
    choice, pred = choose_solver(c, 100, max_batch=30)
    assert pred["window"] <= 30


def test_allocator_failure_is_one_line(tmp_path, capsys):
    class Greedy(torch.nn.Module):
        def forward(self, x, t):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 3221225472 bytes. Error code 12")
    op, y, _ = _problem(16, 16)
    with pytest.raises(DeqirError, match="out of memory while restoring") as e:
        restore(Greedy(), y, op, steps=3, solver="serial")
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------- the red team's two files

CHILD = textwrap.dedent("""
    import contextlib, io, json, resource, sys, time
    from deqir_dist.apps.cli import main
    out = []
    def peak_mb():   # this image's own peak: ru_maxrss carries the forked pytest parent's across exec
        with open("/proc/self/status") as fh:
            return next(int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM:")) / 1024
    for name, argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except BaseException as e:
                code = repr(e)[:300]
        out.append({"name": name, "code": code, "err": err.getvalue(), "seconds": time.perf_counter() - t0,
                    "rss_mb": peak_mb()})
    print(json.dumps(out))
""")


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _zeros_png(path: Path, w: int, h: int, text: dict | None = None) -> Path:
    row = b"\0" * (1 + 3 * w)
    z = zlib.compressobj(9)
    data = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    ihdr = struct.pack(">II", w, h) + bytes([8, 2, 0, 0, 0])
    extra = b"".join(_chunk(b"tEXt", k.encode() + b"\0" + v.encode()) for k, v in (text or {}).items())
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", data)
                     + _chunk(b"IEND", b""))
    return path


def test_red_team_files_are_refused_in_one_line_in_bounded_memory(tmp_path, builtin):
    desc = {"format": 1, "sigma_y": 0.0, "bits": 8, "task": "sr_avgpool", "image_shape": [3, 4096, 4096],
            "params": {"scale": 256}}
    tiny = _zeros_png(tmp_path / "claims4096.png", 16, 16, {"deqir-measurement": json.dumps(desc)})
    real = _zeros_png(tmp_path / "zeros4096.png", 4096, 4096)
    assert tiny.stat().st_size < 400 and real.stat().st_size < 100_000
    o = str(tmp_path / "out")
    cases = [("tiny, analytic", ["restore", str(tiny), "--model", "analytic", "--solver", "serial", "--steps", "5",
                                 "--no-progress", "-o", o]),
             ("tiny, builtin", ["restore", str(tiny), "--no-progress", "-o", o]),
             ("real, --from-clean", ["restore", str(real), "--task", "sr_bicubic", "--scale", "4", "--from-clean",
                                     "--no-progress", "-o", o]),
             ("real, --max-memory", ["restore", str(real), "--task", "sr_bicubic", "--scale", "4", "--from-clean",
                                     "--max-memory", "1G", "--no-progress", "-o", o])]
    # memory no longer stops it (its 256 px tiles fit in a few GB): the work cap does, at the default.
    # A machine over twice as fast as this project's CPU models it under the default cap: there the
    # test asks for a quarter of its modelled time instead (the same refusal, the same path)
    whole = B.plan_budget(builtin, (3, 4096, 4096), 1, 100, "auto", 1, max_memory="64G", max_time=0)
    cap = [] if whole.seconds > 2 * 60 * B.DEFAULT_MAX_MINUTES else ["--max-time", f"{whole.seconds / 240:.1f}"]
    work = [("tiny, builtin, work cap", ["restore", str(tiny), "--max-memory", "8G", *cap, "--no-progress", "-o", o]),
            ("real, work cap", ["restore", str(real), "--task", "sr_bicubic", "--scale", "4", "--from-clean",
                                "--max-memory", "8G", *cap, "--no-progress", "-o", o])]
    limit = 3 << 30                     # address space: torch maps ~1 GB; the cap follows the limit

    def limit_as():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEQIR_CACHE_DIR": str(tmp_path / "cache")}
    results = []
    for group in (cases, work):       # each group in a fresh child: its peak RSS is its own
        p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(group)], capture_output=True, timeout=240,
                           preexec_fn=limit_as, env=env, cwd=ROOT)
        assert p.returncode == 0, p.stderr.decode()[-2000:]
        results += json.loads(p.stdout.decode().splitlines()[-1])
    for r in results:
        lines = [ln for ln in r["err"].splitlines() if ln.strip()]
        assert r["code"] == 2 and len(lines) == 1, r
        assert "4096x4096 image" in lines[0] and "at most about" in lines[0], r
        assert r["seconds"] < 60, r
    for r in results[len(cases):]:
        assert "work cap" in r["err"] and "(--steps) at this size" in r["err"], r
        assert not cap or "--max-time" in r["err"], r
    # the target: importing torch and the package is ~230 MB of it; the memory probe's
    # dispatch mode no longer imports torch._dynamo (~70 MB), nor the PNG header check decodes the
    # 4096 px picture to look for EXIF (~64 MB), nor a refused run times a 256 px call (~150 MB)
    assert max(r["rss_mb"] for r in results) < 500, results
    assert not Path(o).exists()


def test_a_smaller_side_is_never_timed_slower_per_pixel_than_a_larger_one(builtin, monkeypatch):
    """The work cap's refusal names a size scaled down from the refused one; planning that size
    re-times a call at its own side. A noisy timing there (a loaded machine: this test's flake)
    must not make it slower per pixel than the larger side already measured, or the named size
    is refused in turn."""
    B.plan_budget(builtin, (3, 128, 192), 1, 20, "serial", 1, max_time=0)      # side 128 measured
    fast = B.plan_budget(builtin, (3, 84, 128), 1, 20, "serial", 1, max_time=0)      # side 84, as timed
    key = next(k for k in B._LARGE_MS if k[1] == 128)
    B._LARGE_MS.pop((key[0], 84), None)
    real = B.measure_cost
    monkeypatch.setattr(B, "measure_cost", lambda *a, **k: {b: 50 * v for b, v in real(*a, **k).items()})
    slow = B.plan_budget(builtin, (3, 84, 128), 1, 20, "serial", 1, max_time=0)   # re-timed 50x slower
    assert B._LARGE_MS[(key[0], 84)] > 10 * B._LARGE_MS[key]                   # the noisy timing is kept
    probe_rate = B.model_footprint(builtin, 3).ms_per_px
    assert slow.ms_per_call <= max(probe_rate, B._LARGE_MS[key]) * 84 * 128 * (1 + 1e-9), (slow, fast)


def test_time_cap_parses_minutes_and_units():
    assert B.time_cap(None)[0] == 60 * B.DEFAULT_MAX_MINUTES and B.time_cap(0) == (None, "no limit")
    assert B.time_cap(90)[0] == 5400 and B.time_cap("90m")[0] == 5400 and B.time_cap("1.5h")[0] == 5400
    assert B.time_cap("45s")[0] == 45 and B.time_cap("2")[0] == 120 and B.time_cap("0")[0] is None
    for bad in ("soon", "-5", -1, float("nan"), float("inf"), True, [3]):
        with pytest.raises(DeqirError, match="max_time"):
            B.time_cap(bad)


def test_over_the_work_cap_is_one_line_naming_the_size_and_steps_that_fit(builtin):
    """restore() refuses a run modelled over max_time before any work (no denoiser call beyond the
    64 px probe), naming a size and a step count that then pass the same cap; 0 lifts the cap."""
    op, y, _ = _problem(128, 192)
    est = B.plan_budget(builtin, (3, 128, 192), 1, 20, "serial", 1, max_time=0)
    assert est.max_seconds is None and est.seconds > 0
    minutes = est.seconds / 60 / 4                     # a quarter of its time
    calls = []
    hook = builtin.register_forward_hook(lambda m, a, o: calls.append(tuple(a[0].shape)))
    try:
        with pytest.raises(DeqirError) as e:
            restore(builtin, y, op, steps=20, solver="serial", max_time=minutes)
    finally:
        hook.remove()
    msg = str(e.value)
    assert "\n" not in msg and "192x128 image" in msg and "work cap" in msg and "--max-time" in msg, msg
    assert all(s[-1] <= 64 for s in calls), calls           # nothing but the probe ran
    fw, fh = (int(v) for v in msg.split("at most about ")[1].split(" ")[0].split("x"))
    steps = int(msg.split("or about ")[1].split(" step")[0])
    # about half the side and a quarter of N (the refusal uses the 64 px probe's time: a little less)
    assert 60 <= fw < 192 and 40 <= fh < 128 and 3 <= steps <= 12, msg
    # what it names fits under the same cap (time is linear in pixels and in steps)
    mult = builtin.size_multiple
    assert B.plan_budget(builtin, (3, fh // mult * mult, fw // mult * mult), 1, 20, "serial", 1,
                         max_time=minutes).seconds <= minutes * 60
    assert B.plan_budget(builtin, (3, 128, 192), 1, steps, "serial", 1, max_time=minutes).seconds <= minutes * 60
    with pytest.raises(DeqirError, match="max_time .--max-time. must be"):
        restore(builtin, y, op, steps=2, max_time="soon")
    res = restore(builtin, y, op, steps=2, solver="serial", max_time=0, generator=torch.Generator().manual_seed(0))
    assert res.budget["max_seconds"] is None and torch.isfinite(res.images).all()


def test_memory_refusal_names_a_real_size_or_says_none_fits():
    """The size named fits under the same cap; with nothing left under the cap (it is below what the
    process holds already) it says no image fits and why, never '0x0'."""
    analytic = load_denoiser("analytic")
    whole = B.estimate(analytic, (3, 256, 192), steps=5, cap=(1 << 40, "test"))
    cap = B._rss() + whole.extra_bytes // 3
    with pytest.raises(DeqirError) as e:
        B.plan_budget(analytic, (3, 256, 192), 1, 5, "serial", 1, max_memory=cap)
    fw, fh = (int(v) for v in str(e.value).split("at most about ")[1].split(" ")[0].split("x"))
    assert 0 < fw < 192 and 0 < fh < 256
    B.plan_budget(analytic, (3, fh, fw), 1, 5, "serial", 1, max_memory=cap)     # fits: no error
    with pytest.raises(DeqirError) as e:
        B.plan_budget(analytic, (3, 256, 192), 1, 5, "serial", 1, max_memory=B._rss() // 2)
    msg = str(e.value)
    assert "no image of this shape fits: nothing is left" in msg and "already resident" in msg and "0x0" not in msg
    assert "\n" not in msg


def test_cli_prints_the_estimate_and_restores_in_tiles(tmp_path, capsys):
    from PIL import Image
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    code = main(["restore", str(tmp_path / "p.png"), "--task", "sr_avgpool", "--scale", "4", "--from-clean",
                 "--steps", "3", "--tile", "32", "-o", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 0, err
    line = [ln for ln in err.splitlines() if ln.startswith("deqir: p.png:")]
    assert len(line) == 1 and "56x40 output in 4 overlapping 32 px tiles" in line[0], err
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["tile"] == 32 and summary["images"][0]["tiles"]["tiles"] == 4


def test_auto_times_and_plans_only_batches_that_fit(monkeypatch):
    """Under a cap that leaves room for a few rows, auto times no batch larger and plans within them.
    (How far it times without a cap depends on this machine's timings of the emulated model, whose
    overheads grow with b: at c(10) serial can already be certain.)"""
    from deqir_dist.models.emulated import CostEmulatingDenoiser
    monkeypatch.setenv("DEQIR_PROFILE_CACHE", "off")
    emu = CostEmulatingDenoiser(load_denoiser("analytic"), {1: 0.2, 100: 0.2})
    op, y, _ = _problem(16, 16)
    canvas = (3, 16, 16)
    one = B.estimate(emu, canvas, steps=40, cap=(1 << 40, "test"))
    per_row = B.model_footprint(emu, 3).bytes_per_px * 16 * 16
    state = 40 * B.ROW_STATE * B._image_bytes(canvas, 1, torch.float32)
    emu.batches.clear()
    cap = B._rss() + one.extra_bytes + state + int(6.5 * per_row)
    res = restore(emu, y, op, steps=40, max_memory=cap, generator=torch.Generator().manual_seed(0))
    limit = res.budget["probe_batches"]
    assert 2 <= limit < 16, res.budget
    assert max(res.plan["c_ms"]) <= limit and max(emu.batches) <= limit, (res.plan["c_ms"], emu.batches)
    assert res.solver == "serial" or res.plan["window"] <= limit


def test_cli_allocator_failure_is_one_line(tmp_path, capsys, monkeypatch):
    import deqir_dist.dataset.items as items_mod
    from PIL import Image

    def greedy(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 3221225472 bytes")
    monkeypatch.setattr(items_mod, "restore", greedy)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "p.png")
    code = main(["restore", str(tmp_path / "p.png"), "--task", "sr_avgpool", "--scale", "2", "--from-clean",
                 "--model", "analytic", "--steps", "2", "--no-progress", "-o", str(tmp_path / "o")])
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("deqir: error: out of memory"), lines
    assert not (tmp_path / "o").exists()


def test_restore_file_checks_the_size_before_decoding(tmp_path):
    """The API's restore_file estimates from the header too: a 4096x4096 PNG of zeros with
    from_clean is refused before its 200 MB of pixels are decoded."""
    import deqir_dist as dq
    real = _zeros_png(tmp_path / "zeros4096.png", 4096, 4096)
    with pytest.raises(DeqirError, match="zeros4096.png: restoring a 4096x4096 image") as e:
        dq.restore_file(real, "sr_bicubic", scale=4, from_clean=True, max_memory=B._rss() + (300 << 20))
    assert "\n" not in str(e.value)


def test_png_header_size_reads_exif_orientation_without_decoding(tmp_path, monkeypatch):
    """header_size turns a PNG whose eXIf chunk says 5-8 (before or after its pixels), as read_image
    does, from the chunk list: Pillow's getexif() on a PNG decodes every pixel to look for it."""
    from PIL import Image, ImageFile

    from deqir_dist.io.images import header_size, read_image
    im = Image.fromarray(np.zeros((20, 36, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "turned.png", exif=exif.tobytes())
    data = (tmp_path / "turned.png").read_bytes()
    i = data.index(b"eXIf") - 4
    n = struct.unpack(">I", data[i:i + 4])[0] + 12
    chunk, rest = data[i:i + n], data[:i] + data[i + n:]
    j = rest.index(b"IEND") - 4
    (tmp_path / "after.png").write_bytes(rest[:j] + chunk + rest[j:])       # eXIf after IDAT
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("header_size decoded the pixels"))
    for name in ("turned.png", "after.png"):
        assert header_size(tmp_path / name) == (20, 36)
    assert header_size(_zeros_png(tmp_path / "plain.png", 36, 20)) == (36, 20)
    monkeypatch.undo()
    assert tuple(read_image(tmp_path / "after.png").shape) == (3, 36, 20)


def test_max_time_flags_are_checked_before_any_work(tmp_path, capsys):
    """--max-time on restore, ray-restore and serve: a bad value is one line, exit 2, nothing written."""
    from PIL import Image
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "p.png")
    base = ["--task", "sr_avgpool", "--scale", "2", "--model", "analytic", "--max-time", "soon"]
    for argv in (["restore", str(tmp_path / "p.png"), "--from-clean", *base, "-o", str(tmp_path / "o")],
                 ["ray-restore", str(tmp_path), "--from-clean", *base, "-o", str(tmp_path / "o")],
                 ["serve", "--port", "0", *base]):
        assert main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "max_time (--max-time) must be" in lines[0], (argv, lines)
    assert not (tmp_path / "o").exists()

"""The two-level (parareal) solver: exact after K = B iterations, its schedule, restore and the ranks."""
import json
import math

import pytest
import torch

from deqir_dist import DeqirError, make_operator, restore
from deqir_dist.api import planner
from deqir_dist.models import GaussianMixtureDenoiser
from deqir_dist.sampling.denoiser import EpsFn
from deqir_dist.sampling.schedule import chain_coefficients
from deqir_dist.sampling.serial import sample_serial
from deqir_dist.solvers.parareal import (
    PararealOptions,
    block_bounds,
    parareal_schedule,
    solve_parareal,
)

from . import parareal_workers
from .test_cli import photos  # noqa: F401  (the fixture)
from .test_distributed import _run

# the planner tests check its logic on fixed K values (conftest.reference_picard_table)
pytestmark = pytest.mark.usefixtures("reference_picard_table")

SHAPE = (3, 8, 8)


def _problem(task="sr_bicubic", batch=2, seed=0, **op_kw):
    model = GaussianMixtureDenoiser(seed=0).double()
    g = torch.Generator().manual_seed(seed)
    op = make_operator(task, SHAPE, **op_kw)
    x = model.sample(batch, SHAPE, g).double()
    return model, op, op.A(x), torch.randn((batch, *SHAPE), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("blocks,m,coarse,layout,etw,nw,task,secant", [
    (5, 1, "normalized", 1.0, 0.0, 0.0, "sr_bicubic", 2),
    (4, 2, "ddim", 1.0, 0.8, 0.0, "inpaint", 0),
    (6, 3, "ab2", 1.6, 0.5, 0.3, "deblur_gauss", 3),
    (3, 1, "unrolled", 0.7, 0.0, 0.2, "colorize", 0),
])
def test_k_equal_b_is_the_serial_answer(blocks, m, coarse, layout, etw, nw, task, secant):
    steps = 17
    model, op, y, xi = _problem(task, **({"scale": 4} if task == "sr_bicubic" else {}))
    coeffs = chain_coefficients(steps, etw=etw, nw=nw)
    z = torch.randn((2, steps, *SHAPE), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    eps = EpsFn(model, 3, torch.float64)
    serial = sample_serial(eps, op, coeffs, y, xi, z)
    opts = PararealOptions.make(steps, blocks, m, stop="none", coarse=coarse, layout=layout, secant=secant)
    out = solve_parareal(eps, op, coeffs, y, xi, opts, z, keep=True)
    assert out.iterations == [blocks, blocks]
    assert float((out.final - serial).abs().max()) <= 1e-10
    # before K = B it is not the serial answer (the test can fail), and the coarse pass is far off
    assert float((out.boundaries[0] - serial).abs().max()) > 1e-4


def test_one_jump_per_row_is_the_fine_step():
    """G with m = s jumps of one row each is F (normalised coordinates are exact for one row)."""
    steps = 12
    model, op, y, xi = _problem("inpaint", mask="random")
    coeffs = chain_coefficients(steps, etw=0.8)
    eps = EpsFn(model, 3, torch.float64)
    opts = PararealOptions.make(steps, 3, 4, stop="none", max_iter=0)
    out = solve_parareal(eps, op, coeffs, y, xi, opts)
    assert float((out.final - sample_serial(eps, op, coeffs, y, xi)).abs().max()) <= 1e-10


@pytest.mark.parametrize("blocks,m,layout", [(4, 1, 1.0), (5, 2, 1.0), (6, 1, 1.8)])
def test_schedule_counts_the_calls_that_ran(blocks, m, layout):
    steps = 24
    model, op, y, xi = _problem(batch=1)
    coeffs = chain_coefficients(steps)
    bounds = block_bounds(steps, blocks, layout)
    for k in range(blocks + 1):
        opts = PararealOptions.make(steps, blocks, m, stop="none", max_iter=k, layout=layout)
        out = solve_parareal(EpsFn(model, 3, torch.float64), op, coeffs, y, xi, opts)
        sched = parareal_schedule(bounds, [min(m, hi - lo) for lo, hi in bounds], k)
        assert out.calls == sched["calls"], k
        assert sched["critical_path"] <= sched["calls"]
        # one timing per pass (the coarse pass, then each iteration); they count every call
        assert len(out.timings) == k + 1 and sum(t.rows for t in out.timings) == out.calls
        assert out.timings[0].rows == sum(min(m, hi - lo) for lo, hi in bounds)
        assert all(0 <= t.denoiser_s <= t.total_s and t.comm_s == 0 and t.active == 1 for t in out.timings)
    # one worker holding every block: the critical path is all its calls
    one = parareal_schedule(bounds, [m] * blocks, 2, procs=1)
    assert one["critical_path"] == one["calls"] == sum(one["per_worker"])


def test_schedule_pipelines():
    """N = 25, B = 5, m = 1, K = 1: coarse pass 5, the fine solves overlap it; serial is 25."""
    b = block_bounds(25, 5)
    assert parareal_schedule(b, [1] * 5, 0)["critical_path"] == 5
    assert parareal_schedule(b, [1] * 5, 1)["critical_path"] == 10
    assert parareal_schedule(b, [1] * 5, 5)["critical_path"] > 25     # K = B is slower than serial
    # the ranks' lagged stopping decision (parareal_dist.STOP_LAG = 2) costs little; waiting every
    # iteration for the last rank (lag 1) costs the pipeline at many blocks
    b20 = block_bounds(100, 20)
    pipe, lag2, lag1 = (parareal_schedule(b20, [1] * 20, 4, stop_lag=lag)["critical_path"] for lag in (0, 2, 1))
    assert pipe == 40 and pipe <= lag2 < lag1 and lag1 > 1.5 * pipe


def test_restore_reports_the_schedule_and_stops_per_image():
    model, op, y, xi = _problem("inpaint", batch=3, mask="box")
    ser = restore(model, y, op, steps=20, solver="serial", noise=xi, dtype=torch.float64)
    full = restore(model, y, op, steps=20, solver="parareal", noise=xi, dtype=torch.float64, blocks=5,
                   stop="none")
    assert float((full.image - ser.image).abs().max()) <= 1e-10
    assert (full.blocks, full.coarse_steps, full.iterations) == (5, 1, 5)
    assert full.critical_path_calls == parareal_schedule(block_bounds(20, 5), [1] * 5, 5, stop_lag=2)["critical_path"]
    early = restore(model, y, op, steps=20, solver="parareal", noise=xi, dtype=torch.float64, blocks=5,
                    stop="final", stop_tol=45.0)
    assert early.iterations < 5 and len(early.trace) == early.iterations
    default = restore(model, y, op, steps=20, solver="parareal", noise=xi, dtype=torch.float64, blocks=5)
    assert (default.stop, default.stop_tol) == ("final", 40.0)      # restore's stop="rows" default
    psnr = 10 * torch.log10(4 / (early.image - ser.image).pow(2).flatten(1).mean(1))
    assert bool((psnr >= 45).all()), psnr


@pytest.mark.parametrize("kw,msg", [
    ({"blocks": 0}, "blocks"), ({"blocks": 21}, "blocks"), ({"coarse_steps": 0}, "coarse_steps"),
    ({"coarse": "rk4"}, "coarse"), ({"stop": "residual"}, "parareal stops on"), ({"window": 4}, "unknown parareal"),
    ({"max_iter": -1}, "max_iter"), ({"secant": -1}, "secant"), ({"layout": 9}, "layout"), ({"stop": "final", "stop_tol": 0}, "stop_tol"),
    ({"stop": "rows", "stop_tol": 0.03}, "parareal stops on"),
])
def test_bad_parareal_options_are_one_line_errors(kw, msg):
    model, op, y, xi = _problem()
    with pytest.raises(DeqirError, match=msg) as e:
        restore(model, y, op, steps=20, solver="parareal", noise=xi, **kw)
    assert "\n" not in str(e.value)


def test_parareal_options_are_refused_by_other_solvers():
    model, op, y, xi = _problem()
    with pytest.raises(DeqirError, match="blocks"):
        restore(model, y, op, steps=20, solver="picard", noise=xi, blocks=4)
    with pytest.raises(DeqirError, match="init"):
        restore(model, y, op, steps=20, solver="parareal", noise=xi, init=torch.zeros(2, 20, *SHAPE))


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_parareal_equals_single_process(world, tmp_path):
    codes, _ = _run(parareal_workers.equivalence, world, tmp_path)
    assert codes == [0] * world
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for case in zip(*ranks):
        for row in case:
            assert row["diff"] <= 1e-10, row
            assert row["k_multi"] == row["k_single"], row
            assert row["image_sum"] == case[0]["image_sum"]
            # per-pass timings: one process has the coarse pass + K iterations; the ranks time theirs
            assert row["timings_single"] == max(row["k_single"]) + 1 and row["rows_single"] > 0
            assert row["timings_multi"] >= 1 and row["comm_multi"] >= 0
            tm, ts = torch.tensor(row["trace_multi"]), torch.tensor(row["trace_single"])
            assert tm.shape == ts.shape and torch.allclose(tm, ts, rtol=1e-8, atol=1e-10, equal_nan=True), row
        assert sum(row["bytes_multi"] for row in case) > 0       # the ranks passed states along


def test_dead_rank_makes_the_others_fail_fast(tmp_path):
    codes, secs = _run(parareal_workers.dies_mid_solve, 3, tmp_path, timeout=60)
    assert codes[1] == 17
    assert codes[0] != 0 and codes[2] != 0
    assert secs < 45
    for r in (0, 2):
        msg = (tmp_path / f"rank{r}.err").read_text()
        assert "rank 1" in msg and "\n" not in msg, msg


def test_cli_runs_parareal_and_refuses_its_flags_elsewhere(photos, tmp_path, capsys):  # noqa: F811
    from deqir_dist.apps.cli import main
    out_dir = tmp_path / "o"
    code = main(["restore", str(photos / "img0.png"), "--from-clean", "--task", "sr_bicubic", "--scale", "2",
                 "-o", str(out_dir), "--steps", "8", "--solver", "parareal", "--blocks", "3", "--coarse-steps", "2",
                 "--model", "analytic", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["solver"] == "parareal" and "iterations" in summary["images"][0]
    code = main(["restore", str(photos / "img0.png"), "--from-clean", "--task", "sr_bicubic", "--scale", "2",
                 "-o", str(tmp_path / "p"), "--steps", "8", "--blocks", "3", "--model", "analytic"])
    err = capsys.readouterr().err
    assert code == 2 and "--blocks is a parareal option" in err and not (tmp_path / "p").exists()


# c(b) in ms of the built-in prior on this CPU (1 thread, 3x32x32; measured while writing the test, other
# work on the machine): a batch costs about its rows, so no parallel plan pays
CPU_PROFILE = {1: 51.5, 8: 226.2, 32: 1408.4}
ADM_H200 = {1: 24.9, 4: 56.6, 8: 97.9, 13: 149.7, 25: 284.3}    # bench/results/adm256-h200-design-cb.json


def test_planner_picks_serial_on_a_cpu_profile():
    for steps in (25, 50, 100):
        for procs in (1, 2, 4):
            choice, best = planner.choose_solver(CPU_PROFILE, steps, procs)
            assert choice == "serial", (steps, procs, best)


def test_planner_never_picks_a_plan_slower_than_serial():
    """Every plan it picks is, by an independent evaluation of the model, faster than serial by the
    margin; and it is the fastest of the candidates the benchmarks offer."""
    picked = set()
    profiles = [CPU_PROFILE, ADM_H200, {1: 10.0, 100: 12.0}, {1: 1.0, 8: 1.2, 100: 90.0}]
    for c_ms in profiles:
        for steps in (25, 40, 50, 100):
            for procs in (1, 2, 5, 8, 10, 16, 20):
                choice, best = planner.choose_solver(c_ms, steps, procs)
                serial = steps * planner.cost_at(c_ms, 1)
                if choice == "serial":
                    continue
                picked.add(choice)
                if choice == "parareal":
                    bounds = block_bounds(steps, best["blocks"])
                    k = planner.parareal_k_table()[min(planner.parareal_k_table(),
                                                       key=lambda n: abs(math.log(n / steps)))]
                    k = min(k[(best["blocks"], best["coarse_steps"])], best["blocks"])
                    crit = parareal_schedule(bounds, [min(best["coarse_steps"], hi - lo) for lo, hi in bounds], k,
                                             procs)["critical_path"]
                    ms = crit * planner.cost_at(c_ms, 1)
                else:
                    ms = planner.cost_at(c_ms, 1) + best["K"] * planner.cost_at(c_ms, math.ceil(best["window"] / procs))
                assert ms == pytest.approx(best["parallel_ms"])
                assert ms * (1 + planner.MARGIN) < serial, (c_ms, steps, procs, best)
    assert picked, "no profile made a parallel plan pay: the test would not see a wrong one"


def test_planner_reads_k_from_the_benchmarks(tmp_path, monkeypatch):
    """K comes from the JSON: a benchmark that says parareal needs K = B makes it lose everywhere."""
    table = planner.parareal_k_table()
    assert table, "deqir_dist/api/planner_k/parareal-builtin-cpu.json (package data) is missing"
    fake = {"cases": [{"steps": 100, "blocks": 10, "coarse_steps": 1, "etw": 0.0, "final": {"K_max": 10}}]}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(fake))
    monkeypatch.setattr(planner, "PARAREAL_K_FILE", path)
    assert planner.parareal_k_table() == {100: {(10, 1): 10}}
    assert planner.choose_solver(ADM_H200, 100, 10, windows=False)[0] == "serial"      # K = B: slower than serial
    fake["cases"][0]["final"]["K_max"] = 1
    path.write_text(json.dumps(fake))
    planner._K_CACHE.clear()
    choice, best = planner.choose_solver(ADM_H200, 100, 10)
    assert choice == "parareal" and (best["blocks"], best["K"]) == (10, 1)
    planner._K_CACHE.clear()


def test_restore_auto_takes_the_planners_blocks(monkeypatch, tmp_path):
    fake = {"cases": [{"steps": 20, "blocks": 4, "coarse_steps": 1, "etw": 0.0, "final": {"K_max": 1}}]}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(fake))
    monkeypatch.setattr(planner, "PARAREAL_K_FILE", path)
    planner._K_CACHE.clear()
    model, op, y, xi = _problem()
    # one process: parareal's schedule has every block on one worker, so it never pays
    r = restore(model, y, op, steps=20, solver="auto", noise=xi, profile={1: 1.0, 20: 20.0})
    assert r.solver == "serial"
    choice, best = planner.choose_solver({1: 1.0, 20: 20.0}, 20, 4)
    assert choice == "parareal" and best["blocks"] == 4
    planner._K_CACHE.clear()

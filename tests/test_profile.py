"""The latency model and solver="auto"."""
import pytest
import torch

from deqir_dist import DeqirError, make_operator, restore
from deqir_dist.api.planner import choose_solver, cost_at, measure_cost, predict_ms

# the planner tests check its logic on fixed K values (conftest.reference_picard_table)
pytestmark = pytest.mark.usefixtures("reference_picard_table")


def test_cost_interpolation():
    c = {1: 1.0, 4: 4.0, 8: 6.0}
    assert cost_at(c, 1) == 1.0 and cost_at(c, 2) == 2.0 and cost_at(c, 6) == 5.0
    assert cost_at(c, 12) == pytest.approx(8.0)          # extrapolated with the last slope
    assert cost_at({"1": 2.0}, 5) == 2.0 * 5             # a single point: proportional


def test_a_larger_batch_timed_faster_is_noise_and_plans_nothing():
    """Timing noise on a busy machine can time c(2) below c(1); the planner's cost is the table's
    non-decreasing envelope, so with K = N (N = 6) no window is modelled as a saving."""
    noisy = {1: 1.0, 2: 0.6, 6: 0.9}
    assert [cost_at(noisy, b) for b in (1, 2, 4, 6)] == [1.0, 1.0, 1.0, 1.0]
    assert cost_at({1: 1.0, 2: 0.6, 4: 3.0}, 3) == 2.0
    choice, p = choose_solver(noisy, 6, procs=1)
    assert choice == "serial" and p["parallel_ms"] > p["serial_ms"]


def test_planner_never_picks_parallel_when_predicted_slower():
    linear = {1: 1.0, 25: 25.0, 100: 100.0}              # compute-bound: a batch costs b calls
    flat = {1: 10.0, 25: 11.0, 100: 12.0}                # launch-bound: a batch costs one call
    for steps in (25, 100):
        choice, p = choose_solver(linear, steps, procs=1)
        assert choice == "serial" and p["parallel_ms"] >= p["serial_ms"]
        choice, p = choose_solver(flat, steps, procs=1)
        assert choice == "picard" and p["speedup"] > 1
    # compute-bound beyond 8 rows, P = 4: the quarter window (7 rows per device) wins despite its K
    knee = {1: 10.0, 8: 10.0, 100: 100.0}
    choice, p = choose_solver(knee, 100, procs=4)
    assert choice == "picard" and p["window"] == 25 and p["K"] == 67
    assert p["parallel_ms"] < predict_ms(knee, 100, 4)["parallel_ms"] < p["serial_ms"]
    assert choose_solver(knee, 100, procs=4, windows=False)[1]["window"] == 100     # stop rule without windows
    assert choose_solver({1: 5.0, 100: 5.0}, 10, procs=1)[1]["window"] == 10        # a tie: the larger window
    # more devices shrink the rows per call: at P = N, one row per device
    p = predict_ms(linear, 100, procs=100, iterations=7)
    assert p["parallel_ms"] == pytest.approx(1.0 + 7 * 1.0)


def test_measure_cost_returns_positive_times(gmm):
    c = measure_cost(gmm, (3, 8, 8), batches=(1, 4), repeats=2, warmup=1)
    assert set(c) == {1, 4} and all(v > 0 for v in c.values())


def test_restore_auto_follows_the_profile(gmm):
    op = make_operator("sr_avgpool", (3, 8, 8), scale=2)
    g = torch.Generator().manual_seed(0)
    y = op.A(gmm.sample(1, (3, 8, 8), g))
    r = restore(gmm, y, op, steps=25, solver="auto", profile={1: 1.0, 25: 25.0}, generator=g)
    assert r.solver == "serial" and r.plan["chosen"] == "serial"
    r = restore(gmm, y, op, steps=25, solver="auto", profile={1: 1.0, 25: 1.1}, generator=g)
    assert r.solver == "picard" and r.iterations < 25 and r.plan["window"] == 25 and r.state_rows == 25
    # flat to 25 rows, then compute-bound: the quarter window (K 67) beats the whole chain (K 27)
    knee = {1: 1.0, 25: 1.0, 100: 10.0}
    r = restore(gmm, y, op, steps=100, solver="auto", profile=knee, generator=g)
    assert r.solver == "picard" and r.plan["window"] == 25 and r.state_rows == 25
    r = restore(gmm, y, op, steps=100, solver="auto", profile=knee, generator=g, max_iter=5)
    assert r.solver == "picard" and r.state_rows == 100         # a short budget: the whole chain, not the window
    r = restore(gmm, y, op, steps=10, solver="auto", generator=g)    # measures on the fly
    assert r.solver in ("serial", "picard") and "c_ms" in r.plan


def test_bad_profile_file(gmm, tmp_path):
    op = make_operator("denoise", (3, 8, 8))
    bad = tmp_path / "p.json"
    bad.write_text("{not json")
    with pytest.raises(DeqirError, match="profile"):
        restore(gmm, torch.zeros(1, 3, 8, 8), op, steps=5, solver="auto", profile=str(bad))


def test_gpu_check_script_runs_on_cpu(tmp_path):
    """bench/gpu_check.py is run once on a lent GPU; its code paths are exercised here on CPU."""
    import importlib.util
    import json
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--out", str(tmp_path / "g.json")]) == 0
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["serial_vs_parallel"][0]["psnr_vs_serial"] >= 40
    assert all(r["parallel_ms"] > 0 for r in data["modelled_adm_t100"])


@pytest.mark.shipped_k_tables
def test_k_tables_ship_in_the_package_as_copies_of_the_benchmarks():
    """The planner reads its K from package data (a wheel has no bench/), each file an exact copy of
    the benchmark's JSON; pyproject.toml ships them. Without them no parallel plan is offered."""
    import re
    from pathlib import Path

    from deqir_dist.api import planner
    root = Path(__file__).resolve().parents[1]
    pkg = Path(planner.__file__).resolve().parent
    assert planner.K_DIR.parent == pkg and planner.PICARD_K_FILE.parent == planner.K_DIR
    assert all(Path(p).parent == planner.K_DIR for p in planner.PARAREAL_K_FILE)
    for name in planner.K_FILES:
        shipped, bench = planner.K_DIR / name, root / "bench" / "results" / name
        assert shipped.is_file(), f"{shipped} missing"
        if bench.is_file():             # a source checkout: the copy must be current
            assert shipped.read_bytes() == bench.read_bytes(), \
                f"bench/results/{name} changed: copy it to deqir_dist/api/planner_k/ (the planner's K tables)"
    assert re.search(r'^"deqir_dist\.api" = \[[^\]]*"planner_k/\*\.json"', (root / "pyproject.toml").read_text(), re.M)
    assert planner.picard_k_table() and planner.parareal_k_table()


def test_without_k_tables_no_parallel_plan(monkeypatch, tmp_path):
    from deqir_dist.api import planner
    monkeypatch.setattr(planner, "PICARD_K_FILE", tmp_path / "none.json")
    monkeypatch.setattr(planner, "PARAREAL_K_FILE", (tmp_path / "none2.json",))
    planner._K_CACHE.clear()
    try:
        for c_ms in ({1: 10.0, 100: 10.0}, {1: 1.0, 8: 1.0, 100: 90.0}):     # flat: anything would pay
            for procs in (1, 4, 25):
                assert choose_solver(c_ms, 25, procs)[0] == "serial"
    finally:
        planner._K_CACHE.clear()


def test_on_one_device_parareal_never_pays_and_picard_only_on_a_flat_cost():
    """P = 1 (a Ray worker with one device, a single process): with the shipped K tables, parareal's
    critical path is at least N batch-1 calls, so it never beats serial, whatever c(b); picard beats
    serial exactly when its c(1) + K c(W) (the window of the nearest benchmarked N) wins by the margin,
    i.e. only when c(W) / c(1) < (N / 1.1 - 1) / K (between 1.5 and 3.3 for the shipped K): a
    launch-bound model on a GPU, not a CPU, where c(b) grows about like b. So "one device: serial"
    is the planner's answer on a CPU, not a rule: auto measures c(b) there too."""
    from deqir_dist.api import planner
    from deqir_dist.solvers.parareal import block_bounds, parareal_schedule
    for steps in (25, 50, 100):
        for b, m, k in planner.parareal_candidates(steps):
            bounds = block_bounds(steps, b)
            crit = parareal_schedule(bounds, [min(m, hi - lo) for lo, hi in bounds], k, 1)["critical_path"]
            assert crit >= steps, (steps, b, m, k, crit)
        for alpha in (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0):   # c(b) = b^alpha: monotone, flat to linear
            c_ms = {b: float(b) ** alpha for b in (1, 2, 4, 8, 16, 25, 32, 50, 64, 100)}
            choice, best = choose_solver(c_ms, steps, 1)
            assert choice != "parareal"
            wins = [1 + planner.expected_iterations(steps, w) * cost_at(c_ms, w)
                    for w in {steps, round(steps / 2), round(steps / 4)}]
            assert (choice == "picard") == (min(wins) * (1 + planner.MARGIN) < steps), (steps, alpha, best)
            if alpha >= 0.5:
                assert choice == "serial", (steps, alpha, best)


def test_restore_defaults_to_auto_and_timing_leaves_the_global_rng_alone(gmm, monkeypatch, tmp_path):
    """restore()'s default solver is auto; timing the model (cold cache) draws from its own generator,
    so a run that measures and one that reads the cache draw the same noise from the global RNG."""
    import inspect

    from deqir_dist.api.restore import check_settings
    from deqir_dist.solvers.options import DEFAULT_SOLVER
    assert DEFAULT_SOLVER == "auto"
    assert inspect.signature(restore).parameters["solver"].default == "auto"
    assert inspect.signature(check_settings).parameters["solver"].default == "auto"
    monkeypatch.setenv("DEQIR_CACHE_DIR", str(tmp_path))
    op = make_operator("sr_avgpool", (3, 8, 8), scale=2)
    y = op.A(gmm.sample(1, (3, 8, 8), torch.Generator().manual_seed(0)))
    torch.manual_seed(0)
    a = restore(gmm, y, op, steps=6)
    torch.manual_seed(0)
    b = restore(gmm, y, op, steps=6)
    assert (a.plan["profile"]["source"], b.plan["profile"]["source"]) == ("measured", "cache")
    assert a.solver == b.solver == a.plan["chosen"] == "serial"      # N = 6: K = N, no saving possible
    assert torch.equal(a.image, b.image)


def test_a_plan_observed_slower_is_dropped():
    """choose_solver with observed K (api.k_observed): the knee profile's quarter window wins on the
    table's K (67); observed needing K = 100 there, it loses, and the plan says where each K came from."""
    knee = {1: 10.0, 8: 10.0, 100: 100.0}
    choice, p = choose_solver(knee, 100, procs=4)
    assert (choice, p["window"], p["K_source"]) == ("picard", 25, "benchmark table")
    seen = {"picard W=25": {"K": 100, "runs": 3, "source": "observed"},
            "picard W=50": {"K": 100, "runs": 1, "source": "calibrated"}}
    choice, p = choose_solver(knee, 100, procs=4, observed=seen)
    assert p["window"] != 25
    if p["window"] == 50:
        assert p["K_source"].startswith("calibrated (1 run ")
    everything = {f"picard W={w}": {"K": 100, "runs": 2, "source": "observed"} for w in (25, 50, 100)}
    choice, p = choose_solver(knee, 100, procs=4, observed=everything)
    assert choice == "serial" and p["K_source"].startswith("observed (2 runs ")


def test_auto_learns_k_from_the_users_own_runs(gmm, monkeypatch, tmp_path):
    """Every parallel run in the planner's regime records its K for (model, task, size, settings, plan);
    auto then plans that candidate with it, and a plan observed to lose to serial is not chosen again.
    Off (DEQIR_LEARN_K=0, the test suite's default) nothing is read or written."""
    from deqir_dist.api import k_observed
    monkeypatch.setenv("DEQIR_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("DEQIR_LEARN_K", "1")
    op = make_operator("sr_avgpool", (3, 8, 8), scale=2)
    y = op.A(gmm.sample(2, (3, 8, 8), torch.Generator().manual_seed(0)))
    knee = {1: 1.0, 25: 1.0, 100: 10.0}
    first = restore(gmm, y, op, steps=100, profile=knee, generator=torch.Generator().manual_seed(1))
    assert first.solver == "picard" and first.plan["window"] == 25
    assert first.plan["K_source"] == "benchmark table" and first.plan["K"] == 67
    # the run itself was recorded: the next image plans with the K the oracle really needed
    assert k_observed.observed(gmm, op, first.settings)["picard W=25"] == {
        "K": first.iterations, "runs": 1, "source": "observed"}
    second = restore(gmm, y, op, steps=100, profile=knee, generator=torch.Generator().manual_seed(1))
    assert second.plan["K"] == first.iterations and second.plan["K_source"].startswith("observed (1 run ")
    assert torch.equal(second.image, first.image)
    # runs outside the planner's regime (another stop rule or tolerance) teach it nothing
    restore(gmm, y, op, steps=100, solver="picard", stop="final", generator=torch.Generator().manual_seed(1))
    restore(gmm, y, op, steps=100, solver="picard", stop_tol=1e-2, generator=torch.Generator().manual_seed(1))
    assert set(k_observed.observed(gmm, op, first.settings)) == {"picard W=25"}
    # every window observed at K = N: no parallel plan pays, auto runs serial
    for w in (25, 50, 100):
        assert k_observed.record(gmm, op, first.settings, f"picard W={w}", 100)
    third = restore(gmm, y, op, steps=100, profile=knee, generator=torch.Generator().manual_seed(1))
    assert third.solver == "serial" and "observed" in third.plan["K_source"]
    # another size is another problem; the switch turns the store off
    op2 = make_operator("sr_avgpool", (3, 8, 12), scale=2)
    assert k_observed.observed(gmm, op2, first.settings) == {}
    monkeypatch.setenv("DEQIR_LEARN_K", "0")
    assert k_observed.observed(gmm, op, first.settings) == {}
    assert not k_observed.record(gmm, op, first.settings, "picard W=25", 3)


def test_bench_calibrate_stores_the_k_of_the_users_images(monkeypatch, tmp_path, capsys):
    """deqir bench --calibrate runs every candidate auto weighs on the user's images, stores each K
    (source 'calibrated'), and auto's next plan for that problem reads them."""
    import json

    import numpy as np
    from PIL import Image

    from deqir_dist.api import k_observed
    from deqir_dist.apps.cli import main
    from deqir_dist.dataset.items import load_items
    from deqir_dist.models import load_denoiser
    monkeypatch.setenv("DEQIR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DEQIR_LEARN_K", "1")
    rng = np.random.default_rng(0)
    img = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "cal.json"
    assert main(["bench", "--calibrate", str(img), "--from-clean", "--task", "sr_bicubic", "--scale", "2",
                 "--steps", "6", "--threads", "1", "--no-progress", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    plans = [r["plan"] for r in res["rows"]]
    assert plans[:3] == ["picard W=6", "picard W=3", "picard W=2"] and all(r["stored"] for r in res["rows"])
    assert all(r["psnr_vs_serial"] > 40 for r in res["rows"])
    den = load_denoiser("builtin")
    item = load_items([img], "sr_bicubic", {"scale": 2}, True)[0]
    from deqir_dist.models.settings import resolve_settings
    seen = k_observed.observed(den, item.op, resolve_settings(den, "sr_bicubic", {"steps": 6})[0])
    assert set(seen) == set(plans) and all(v["source"] == "calibrated" for v in seen.values())
    assert {r["plan"]: r["K"] for r in res["rows"]} == {p: v["K"] for p, v in seen.items()}
    assert res["auto"][0]["K_source"].startswith("calibrated (1 run ")
    assert "solver=auto now plans with these K" in capsys.readouterr().out
    # the flags of calibrate are refused elsewhere in one line
    assert main(["bench", "--from-clean"]) == 2

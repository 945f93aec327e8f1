"""The cost-emulating denoiser: each call of batch b lasts >= c(b), overruns are counted, the output
is the wrapped model's, and it plugs into load_denoiser, restore and the CLI."""
import json
import time
from pathlib import Path

import pytest
import torch

from deqir_dist import make_operator, restore
from deqir_dist.api.planner import cost_at
from deqir_dist.errors import DeqirError
from deqir_dist.models import GaussianMixtureDenoiser, load_denoiser
from deqir_dist.models.emulated import (
    CostEmulatingDenoiser,
    interpolate_cost,
    load_cost_file,
)

ROOT = Path(__file__).resolve().parents[1]
ADM = ROOT / "bench" / "results" / "adm256-h200-design-cb.json"
TABLE = {1: 8.0, 4: 14.0, 8: 30.0}


def _x(b, shape=(3, 8, 8)):
    g = torch.Generator().manual_seed(b)
    return torch.randn((b, *shape), generator=g), torch.full((b,), 400, dtype=torch.int64)


def test_interpolation_is_the_planners():
    table = load_cost_file(ADM)
    for b in range(1, 60):
        assert interpolate_cost(table, b) == pytest.approx(cost_at(table, b), rel=1e-12)


def test_a_call_of_batch_b_lasts_at_least_c_b_and_equals_the_model():
    table = {b: 5 * ms for b, ms in TABLE.items()}      # room for a loaded CI machine's compute
    oracle = GaussianMixtureDenoiser()
    emu = CostEmulatingDenoiser(GaussianMixtureDenoiser(), table)
    emu(*_x(1))                                          # warm-up (first-call allocations), not counted
    emu.reset()
    for b in (1, 2, 3, 6, 8):
        x, t = _x(b)
        t0 = time.perf_counter()
        out = emu(x, t)
        took = time.perf_counter() - t0
        assert took >= interpolate_cost(table, b) / 1e3
        assert torch.equal(out, oracle(x, t))
    s = emu.stats()
    assert s["calls"] == 5 and s["rows"] == 20 and s["overruns"] == 0
    assert s["batches"] == {"1": 1, "2": 1, "3": 1, "6": 1, "8": 1}
    assert s["held_s"] >= s["target_s"] == pytest.approx(sum(interpolate_cost(table, b) for b in (1, 2, 3, 6, 8)) / 1e3)
    assert s["held_s"] == pytest.approx(s["compute_s"] + s["sleep_s"])


def test_calls_slower_than_the_table_are_counted():
    class Slow(torch.nn.Module):
        def forward(self, x, t):
            time.sleep(0.02)
            return x

    emu = CostEmulatingDenoiser(Slow(), {1: 5.0, 2: 40.0})
    x, t = _x(1)
    emu(x, t)                      # 20 ms of compute against 5 ms: an overrun, no sleep
    emu(*_x(2))                    # 20 ms against 40 ms: held
    s = emu.stats()
    assert s["calls"] == 2 and s["overruns"] == 1
    assert s["overrun_s"] >= 0.014
    emu.reset()
    assert emu.stats()["calls"] == 0 and emu.stats()["overruns"] == 0


def test_load_denoiser_emulate_cost_and_restore_equals_the_oracle():
    emu = load_denoiser(None, emulate_cost=ADM)
    assert isinstance(emu, CostEmulatingDenoiser) and isinstance(emu.model, GaussianMixtureDenoiser)
    assert emu.c_ms[25] == pytest.approx(284.3)
    fast = load_denoiser(None, emulate_cost={1: 0.5, 10: 1.0})
    shape = (3, 8, 8)
    op = make_operator("sr_avgpool", shape, scale=2)
    g = torch.Generator().manual_seed(0)
    oracle = GaussianMixtureDenoiser()
    y = op.A(oracle.sample(1, shape, g))
    xi = torch.randn((1, *shape), generator=g)
    ref = restore(oracle, y, op, steps=10, solver="serial", noise=xi)
    got = restore(fast, y, op, steps=10, solver="serial", noise=xi)
    assert torch.equal(got.image, ref.image)
    assert fast.calls == 10 and fast.batches == {1: 10}
    par = restore(fast, y, op, steps=10, solver="picard", noise=xi, window=0, stop="none", max_iter=10)
    assert fast.calls == 21 and fast.batches == {1: 11, 10: 10}      # the warm start: one call of 1 row
    assert float((par.image - ref.image).abs().max()) <= 1e-5


@pytest.mark.parametrize("table", [{}, {0: 1.0}, {1: -2.0}, {1: float("inf")}, {"x": 1.0}])
def test_bad_tables_are_refused(table):
    with pytest.raises(DeqirError):
        CostEmulatingDenoiser(GaussianMixtureDenoiser(), table)


def test_bad_table_files_are_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "x"}))
    for path in (bad, tmp_path / "missing.json"):
        with pytest.raises(DeqirError) as e:
            load_denoiser(None, emulate_cost=path)
        assert "\n" not in str(e.value)


def _photo(tmp_path):
    from deqir_dist.io.images import write_image
    path = tmp_path / "img0.png"
    g = torch.Generator().manual_seed(0)
    write_image(path, torch.rand((3, 16, 16), generator=g) * 2 - 1)
    return path


def test_cli_restore_and_bench_emulate_cost(tmp_path, capsys):
    from deqir_dist.apps.cli import main
    table = tmp_path / "c.json"
    table.write_text(json.dumps({"c_ms": {"1": 1.0, "16": 2.0}}))
    out = tmp_path / "o"
    args = ["restore", str(_photo(tmp_path)), "--from-clean", "--task", "sr_avgpool", "--scale", "2",
            "-o", str(out), "--steps", "6", "--no-progress", "--emulate-cost", str(table)]
    assert main(args) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["emulated_calls"]["calls"] >= 2 and summary["emulated_calls"]["overruns"] >= 0
    assert summary["emulate_cost"] == str(table)
    bench = tmp_path / "b.json"
    assert main(["bench", "--steps", "5", "--size", "8", "--images", "1", "--no-progress", "--emulate-cost",
                 str(table), "--json", str(bench)]) == 0
    res = json.loads(bench.read_text())
    assert res["emulated_calls"]["calls"] > 5 and {r["solver"] for r in res["rows"]} >= {"serial", "picard"}


def test_cli_bad_table_exits_2_writing_nothing(tmp_path, capsys):
    from deqir_dist.apps.cli import main
    out = tmp_path / "o"
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    args = ["restore", str(_photo(tmp_path)), "--from-clean", "--task", "sr_avgpool", "--scale", "2",
            "-o", str(out), "--steps", "6", "--no-progress", "--emulate-cost", str(bad)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cost table" in err and err.count("\n") == 1 and not out.exists()
    assert main(["bench", "--profile", "--emulate-cost", str(bad)]) == 2
    assert "--cost-from" in capsys.readouterr().err

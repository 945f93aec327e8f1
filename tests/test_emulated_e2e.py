"""bench/emulated_e2e.py end to end at P = 2 (spawned gloo ranks): slow, skipped by default."""
import importlib
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_emulated_e2e_runs_and_holds_the_table(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))       # importable by name: the spawned ranks unpickle it
    mod = importlib.import_module("emulated_e2e")
    out = tmp_path / "e.json"
    assert mod.main(["--procs", "2", "--steps", "8", "--repeats", "1", "--solvers", "picard",
                     "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["solver"]: r for r in data["summary"]}
    assert set(rows) == {"serial", "picard"}
    # a held call never returns early: serial takes at least N c(1)
    assert rows["serial"]["wall_ms"] >= rows["serial"]["model_ms"]
    assert rows["picard"]["wall_ms"] >= rows["picard"]["schedule_ms"]
    assert rows["picard"]["psnr_vs_serial"] >= 40
    assert any(r["solver"] == "all_reduce" and r["median_ms"] > 0 for r in data["runs"])

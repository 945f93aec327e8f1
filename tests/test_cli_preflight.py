"""launch/bench_chain.py: bad arguments end with one line per rank, and no rank waits for another."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "bench_chain.py"


def _bench_chain():
    spec = importlib.util.spec_from_file_location("bench_chain_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("args, match", [(["--steps", "0"], "--steps 0"), (["--steps", "4", "--size", "0"], "--size"),
                                         (["--steps", "4", "--window", "-2"], "window"),
                                         (["--steps", "4", "--dist-timeout", "0"], "--dist-timeout")])
def test_bad_arguments_one_line_before_joining(args, match, capsys):
    assert _bench_chain().main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_chain: error: ") and err.count("\n") == 1 and match in err, err


def test_two_ranks_agree_on_a_failure_of_rank_0_only(tmp_path):
    """--json in an impossible place fails on rank 0 only; rank 1 learns it from the agreement step
    instead of waiting in a collective, and neither prints a traceback."""
    (tmp_path / "afile").write_text("x")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(SCRIPT), "--steps", "4", "--size", "8", "--dist-timeout", "60",
                        "--json", str(tmp_path / "afile" / "x.json")],
                       capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    out = r.stdout + r.stderr
    assert r.returncode != 0
    assert out.count("bench_chain: error: ") == 2, out[-3000:]          # one line per rank
    assert "bench_chain: error: rank 0: cannot create directory" in out
    assert "bench_chain: error: rank 1: rank 0 failed to prepare" in out
    assert 'bench_chain.py", line' not in out                # no traceback from the script itself

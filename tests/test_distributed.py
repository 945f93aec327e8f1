"""The sharded chain on gloo (CPU): equal to the single-process solve, and it fails fast and clearly."""
import json
import socket
import time

import pytest
import torch.multiprocessing as mp

from . import dist_workers


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(fn, world, tmp_path, timeout=90):
    ctx = mp.get_context("spawn")
    port = _port()
    procs = [ctx.Process(target=dist_workers.run_then_exit, args=(fn, r, world, port, str(tmp_path)))
             for r in range(world)]
    for p in procs:
        p.start()
    t0 = time.monotonic()
    for p in procs:
        p.join(max(1, timeout - (time.monotonic() - t0)))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} rank(s) hung"
    return [p.exitcode for p in procs], time.monotonic() - t0


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_distributed_equals_single_process(world, tmp_path):
    codes, _ = _run(dist_workers.equivalence, world, tmp_path)
    assert codes == [0] * world
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for case in zip(*ranks):
        for r, row in enumerate(case):
            assert row["diff"] <= 1e-5, row
            assert row["k_multi"] == row["k_single"], row
            lo, hi = row["rows"]
            assert row["state_rows"] == hi - lo < row["steps"] or world == 1
            assert row["image_sum"] == case[0]["image_sum"]     # every rank returns the same image
        blocks = [tuple(row["rows"]) for row in case]
        assert blocks[0][0] == 0 and blocks[-1][1] == case[0]["steps"]


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_window_equals_single_process(world, tmp_path):
    codes, _ = _run(dist_workers.window_equivalence, world, tmp_path)
    assert codes == [0] * world
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for case in zip(*ranks):
        for row in case:
            assert row["diff"] <= 1e-5, row
            assert row["k_multi"] == row["k_single"], row
            assert row["state_rows"] <= -(-row["window"] // world), row     # each rank holds its share only
            assert row["image_sum"] == case[0]["image_sum"]
        assert sum(row["bytes"] for row in case) > 0


@pytest.mark.parametrize("worker", [dist_workers.dies_mid_solve, dist_workers.dies_mid_window])
def test_dead_rank_makes_the_others_fail_fast(tmp_path, worker):
    codes, secs = _run(worker, 3, tmp_path, timeout=60)
    assert codes[1] == 17
    assert codes[0] != 0 and codes[2] != 0
    assert secs < 45
    for r in (0, 2):
        msg = (tmp_path / f"rank{r}.err").read_text()
        assert "rank 1" in msg and "\n" not in msg, msg


def test_two_dead_ranks_are_both_named_and_no_live_one_is(tmp_path):
    """The survivors name exactly the dead ranks: rank 0, which holds the group's store, waits
    for the others to read it before it leaves (else rank 3 would find the store gone and blame 0)."""
    codes, secs = _run(dist_workers.two_die_mid_solve, 4, tmp_path, timeout=60)
    assert codes[1] == codes[2] == 17 and codes[0] != 0 and codes[3] != 0
    assert secs < 45
    for r in (0, 3):
        msg = (tmp_path / f"rank{r}.err").read_text()
        assert "rank 1, 2 died or hung" in msg and "\n" not in msg, msg


def test_mismatched_inputs_fail_on_every_rank(tmp_path):
    codes, _ = _run(dist_workers.mismatched, 2, tmp_path)
    assert codes == [1, 1]
    for r in (0, 1):
        assert "different inputs" in (tmp_path / f"rank{r}.err").read_text()


def test_more_ranks_than_rows_is_an_error(tmp_path):
    codes, _ = _run(dist_workers.too_many_ranks, 3, tmp_path)
    assert codes == [1, 1, 1]
    assert "at most one rank per row" in (tmp_path / "rank0.err").read_text()


def test_auto_is_planned_once_on_rank_0_and_followed_by_every_rank(tmp_path):
    """The default solver, auto, sharded over P = 2: rank 0 alone times its model (or reads the
    profile) and decides; rank 1, whose own timing would pick picard, runs rank 0's choice."""
    codes, _ = _run(dist_workers.auto_plan_agrees, 2, tmp_path)
    assert codes == [0, 0]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r1["own"] == "picard" and r0["own"] == "serial"        # alone, the ranks would disagree
    measured, flat = zip(r0["runs"], r1["runs"])
    for a, b in (measured, flat):
        assert a["solver"] == b["solver"] == a["chosen"] == b["chosen"]
        assert (a["reason"], a["c_ms"], a["source"], a["image_sum"]) == (b["reason"], b["c_ms"], b["source"],
                                                                        b["image_sum"])
    assert measured[0]["solver"] == "serial" and measured[0]["source"] in ("measured", "cache")
    assert flat[0]["solver"] == "picard" and flat[0]["rows"] != flat[1]["rows"]    # sharded
    assert "cannot read cost profile" in r0["error"]
    assert r1["error"].startswith("solver='auto': rank 0 could not plan: cannot read cost profile")


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_noise_gradient_equals_single_process(world, tmp_path):
    """issue 7.4: the adjoint sharded like the forward (reverse scan over ranks) gives the same dL/dxi."""
    codes, _ = _run(dist_workers.noise_gradient_equivalence, world, tmp_path)
    assert codes == [0] * world
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for rows in ranks:                                   # refused on every rank, before any solve
        phantom, anderson = rows.pop()["errors"]
        assert "method='implicit' only" in phantom and "Picard adjoint only" in anderson
    for case in zip(*ranks):
        for row in case:
            assert row["grad_norm"] > 0, row
            assert row["rel"] <= 1e-4, row
            assert row["loss_diff"] <= 1e-10 and row["image_diff"] <= 1e-8, row
            assert row["k_adj"] == [10, 10], row
            assert row["trace_diff"] <= 1e-4, row
            lo, hi = row["rows"]
            assert row["traj_rows"] == hi - lo < 10          # no rank holds all rows
            assert row["grad_sum"] == case[0]["grad_sum"]    # every rank returns the same gradient
        blocks = [tuple(r["rows"]) for r in case]
        assert blocks[0][0] == 0 and blocks[-1][1] == 10 and all(a[1] == c[0] for a, c in zip(blocks, blocks[1:]))


@pytest.mark.parametrize("world", [2, 3])
def test_tiles_of_a_serial_chain_split_over_ranks(world, tmp_path):
    codes, _ = _run(dist_workers.tiled_serial, world, tmp_path, timeout=120)
    assert codes == [0] * world
    for r in range(world):
        row = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert row["tiles"] > world and row["diff"] <= 1e-5, row
        # 4 steps: one process evaluates every tile each step, each rank its share of them
        assert row["tile_rows_single"] == 4 * row["tiles"], row
        assert row["tile_rows_this_rank"] <= 4 * -(-row["tiles"] // world), row

"""The sliding window with a frozen prefix: exact limits, equal results, fewer denoiser rows."""
import pytest
import torch

from deqir_dist import DeqirError, make_operator, restore
from deqir_dist.models import GaussianMixtureDenoiser
from deqir_dist.parallel.comm import offset_split, reshard_plan
from deqir_dist.quality.metrics import psnr

SHAPE = (3, 8, 8)


@pytest.fixture(scope="module")
def problem():
    model = GaussianMixtureDenoiser(seed=0)
    g = torch.Generator().manual_seed(3)
    op = make_operator("sr_avgpool", SHAPE, scale=2)
    x = model.sample(3, SHAPE, g)
    return model, op, op.A(x), torch.randn((3, *SHAPE), generator=g)


@pytest.mark.parametrize("nw, sigma_y", [(0.0, 0.0), (0.3, 0.0), (0.3, 0.1)])
def test_window_of_one_row_is_the_serial_sampler(problem, nw, sigma_y):
    model, op, y, xi = problem       # sigma_y > 0: the range space has memory, its state is carried too
    z = torch.randn((3, 12, *SHAPE), generator=torch.Generator().manual_seed(1))
    kw = dict(steps=12, noise=xi, nw=nw, step_noise=z, sigma_y=sigma_y)
    ref = restore(model, y, op, solver="serial", **kw).image
    out = restore(model, y, op, solver="picard", window=1, **kw)
    assert out.iterations_per_image == [12, 12, 12]
    assert float((out.image - ref).abs().max()) < 1e-5
    out = restore(model, y, op, solver="picard", window=5, stop_tol=1e-12, **kw)
    assert float((out.image - ref).abs().max()) < 1e-5


@pytest.mark.parametrize("window", [25, 9, 4])
def test_tight_tolerance_reaches_the_serial_result_within_n_sweeps(problem, window):
    model, op, y, xi = problem
    ref = restore(model, y, op, steps=25, solver="serial", noise=xi).image
    out = restore(model, y, op, solver="picard", steps=25, noise=xi, window=window, stop_tol=1e-12)
    assert max(out.iterations_per_image) <= 25
    assert float((out.image - ref).abs().max()) < 1e-5


def test_frozen_prefix_saves_denoiser_rows_at_the_same_accuracy(problem):
    model, op, y, xi = problem
    ref = restore(model, y, op, steps=50, solver="serial", noise=xi).image
    full = restore(model, y, op, solver="picard", steps=50, noise=xi, window=0)
    frozen = restore(model, y, op, solver="picard", steps=50, noise=xi)         # the default for picard + rows
    assert float(psnr(frozen.image, ref).min()) > 50
    assert frozen.iterations_per_image == full.iterations_per_image
    rows_full = sum(t.rows for t in full.timings)
    rows_frozen = sum(t.rows for t in frozen.timings)
    assert rows_full == sum(full.iterations_per_image) * 50
    assert rows_frozen < 0.8 * rows_full


def test_a_looser_freeze_threshold_freezes_earlier(problem):
    model, op, y, xi = problem
    rows = {f: sum(t.rows for t in restore(model, y, op, solver="picard", steps=50, noise=xi, freeze=f).timings)
            for f in (0.01, 0.1, 1.0)}
    assert rows[0.01] > rows[0.1] > rows[1.0]


def test_a_short_window_holds_only_its_rows(problem):
    model, op, y, xi = problem
    out = restore(model, y, op, solver="picard", steps=40, noise=xi, window=10)
    assert out.state_rows == 10
    assert max(t.rows for t in out.timings) <= 3 * 10


def test_window_is_the_default_only_for_picard_with_the_rows_rule(problem):
    model, op, y, xi = problem
    assert restore(model, y, op, solver="picard", steps=20, noise=xi).state_rows == 20
    assert max(t.rows for t in restore(model, y, op, solver="picard", steps=20, noise=xi).timings[1:]) < 3 * 20
    for kw in ({"window": 0}, {"solver": "anderson"}, {"stop": "final"}):
        out = restore(model, y, op, steps=20, noise=xi, **{"solver": "picard", **kw})
        assert all(t.rows == t.active * 20 for t in out.timings)


def test_rows_entering_the_window_start_from_the_given_trajectory(problem):
    model, op, y, xi = problem
    states = []
    ref = restore(model, y, op, steps=20, solver="serial", noise=xi,
                  callback=lambda k, ids, h, q: states.append(h.clone())).image
    exact = torch.stack(states, 1)                                  # (B, N, C, H, W): the serial trajectory
    for window in (20, 5):
        out = restore(model, y, op, solver="picard", steps=20, noise=xi, init=exact, window=window)
        assert max(out.iterations_per_image) <= 20 // window + 1, (window, out.iterations_per_image)
        assert float((out.image - ref).abs().max()) < 1e-5


def test_a_short_window_needs_the_full_sweep_budget(problem):
    model, op, y, xi = problem
    with pytest.raises(DeqirError, match="max_iter"):
        restore(model, y, op, solver="picard", steps=20, noise=xi, window=5, max_iter=10)
    assert restore(model, y, op, solver="picard", steps=20, noise=xi, max_iter=3).iterations == 3    # W = N: any budget


def test_reshard_plan_moves_every_new_row_once_and_copies_forward():
    old, new = offset_split(3, 10, 3), offset_split(6, 13, 3)     # window [3, 10) -> [6, 13)
    moves = reshard_plan(old, new, 10)
    got = {}
    for src, dst, rows in moves:
        got.setdefault(dst, []).extend(old[src][0] + r for r in rows)
    for dst, (a, b) in enumerate(new):
        assert got[dst] == [min(j, 9) for j in range(a, b)]
    assert offset_split(5, 7, 4) == [(5, 6), (6, 7), (7, 7), (7, 7)]


@pytest.mark.parametrize("kw, msg", [({"window": -1}, "rows >= 0"), ({"window": 2.5}, "rows >= 0"),
                                     ({"window": 4, "solver": "anderson"}, "picard"),
                                     ({"window": 4, "stop": "final"}, "rows"),
                                     ({"freeze": 0.0}, "freeze"), ({"freeze": 1.5}, "freeze")])
def test_bad_window_settings(problem, kw, msg):
    model, op, y, xi = problem
    with pytest.raises(DeqirError, match=msg):
        restore(model, y, op, steps=10, noise=xi, **{"solver": "picard", **kw})

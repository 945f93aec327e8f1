"""ParaTAA (solvers/triangular.py): exact after N evaluations, the serial answer at its fixed point,
plain steps where ParaTAA takes them, and the same result sharded."""
import json

import pytest
import torch

from deqir_dist import make_operator, restore
from deqir_dist.models import GaussianMixtureDenoiser

from . import taa_workers
from .test_distributed import _run

SHAPE = (3, 8, 8)


def _problem(task="sr_avgpool", n=2, seed=0):
    model = GaussianMixtureDenoiser(seed=0)
    g = torch.Generator().manual_seed(seed)
    op = make_operator(task, SHAPE, **({"scale": 2} if task == "sr_avgpool" else {}))
    return model, op, op.A(model.sample(n, SHAPE, g)), torch.randn((n, *SHAPE), generator=g)


@pytest.mark.parametrize("task,nw,m", [("sr_avgpool", 0.0, 2), ("inpaint", 0.3, 3)])
def test_exact_after_n_evaluations(task, nw, m):
    model, op, y, xi = _problem(task)
    kw = dict(steps=12, noise=xi, nw=nw, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ref = restore(model, y, op, solver="serial", **kw)
    kw["generator"] = torch.Generator().manual_seed(1)
    got = restore(model, y, op, solver="parataa", m=m, stop="none", max_iter=12, **kw)
    assert float((got.image - ref.image).abs().max()) <= 1e-10
    # one evaluation short of N is not exact: the test can fail
    kw["generator"] = torch.Generator().manual_seed(1)
    short = restore(model, y, op, solver="parataa", m=m, stop="none", max_iter=3, **kw)
    assert float((short.image - ref.image).abs().max()) > 1e-6


def test_stops_near_the_serial_fixed_point():
    model, op, y, xi = _problem("sr_avgpool", n=3, seed=2)
    ref = restore(model, y, op, steps=25, solver="serial", noise=xi, dtype=torch.float64)
    got = restore(model, y, op, steps=25, solver="parataa", m=2, noise=xi, dtype=torch.float64)
    assert max(got.iterations_per_image) < 25
    mse = (got.image - ref.image).pow(2).flatten(1).mean(1)
    assert bool((10 * torch.log10(4 / mse) >= 40).all())


def test_history_of_one_entry_is_plain_picard():
    """m = 1: no difference to fit, so every row takes the plain step: picard without a window."""
    model, op, y, xi = _problem("inpaint", seed=4)
    a = restore(model, y, op, steps=15, solver="parataa", m=1, noise=xi, dtype=torch.float64)
    b = restore(model, y, op, steps=15, solver="picard", window=0, noise=xi, dtype=torch.float64)
    assert a.iterations_per_image == b.iterations_per_image
    assert torch.equal(a.image, b.image)
    c = restore(model, y, op, steps=15, solver="parataa", m=2, noise=xi, dtype=torch.float64)
    assert not torch.equal(c.image, b.image)         # with a history the update does differ


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_single_process(world, tmp_path):
    codes, _ = _run(taa_workers.sharded_equals_single, world, tmp_path)
    assert codes == [0] * world
    for r in range(world):
        row = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert row["diff"] <= 1e-10 and row["k_multi"] == row["k_single"], row


def test_default_history_is_parataas_two():
    model, op, y, xi = _problem("inpaint", seed=5)
    a = restore(model, y, op, steps=12, solver="parataa", noise=xi, dtype=torch.float64)
    b = restore(model, y, op, steps=12, solver="parataa", m=2, noise=xi, dtype=torch.float64)
    c = restore(model, y, op, steps=12, solver="parataa", m=5, noise=xi, dtype=torch.float64)
    assert torch.equal(a.image, b.image) and not torch.equal(a.image, c.image)

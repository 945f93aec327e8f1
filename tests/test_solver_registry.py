"""One table of solvers (solvers.registry) behind every list of choices, and one Comm protocol
with the forward and reverse collectives that LocalComm and DistComm both implement."""
import argparse
import inspect

import pytest
import torch

from deqir_dist import DeqirError, make_operator, restore
from deqir_dist.api import inversion
from deqir_dist.api import restore as restore_mod
from deqir_dist.apps.cli import build_parser
from deqir_dist.models import GaussianMixtureDenoiser
from deqir_dist.parallel.comm import Comm, LocalComm
from deqir_dist.parallel.dist import DistComm
from deqir_dist.sampling.adjoint import ReverseSummary
from deqir_dist.solvers import registry

SHAPE = (3, 8, 8)


def _solver_choices(parser: argparse.ArgumentParser, command: str) -> tuple:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return tuple(next(a for a in sub._actions if "--solver" in a.option_strings).choices)


def test_every_list_of_solver_choices_is_the_registry():
    assert restore_mod.METHODS == registry.names("restore")
    assert _solver_choices(build_parser(), "restore") == registry.names("restore")
    assert inversion.FORWARD_SOLVERS == registry.names("inversion")
    assert inversion.ADJOINT_SOLVERS == registry.names("adjoint")
    assert {"serial", "picard", "anderson", "auto"} <= set(registry.names("restore"))
    for purpose in ("restore", "inversion", "adjoint"):
        for name in registry.names(purpose):
            assert registry.get(name, purpose).name == name
        with pytest.raises(DeqirError, match="choose from " + ", ".join(registry.names(purpose))):
            registry.get("newton", purpose)


def test_restore_runs_the_registered_entry():
    """A solver added to the table is what restore calls (and validates against)."""
    model = GaussianMixtureDenoiser(seed=0)
    g = torch.Generator().manual_seed(1)
    op = make_operator("sr_avgpool", SHAPE, scale=2)
    y, xi = op.A(model.sample(2, SHAPE, g)), torch.randn((2, *SHAPE), generator=g)
    calls = []

    def spy(block, comm, opts, **kw):
        calls.append((opts.solver, block.rows))
        return registry.solve_anderson(block, comm, opts, **kw)

    registry.SOLVERS["spy"] = registry.SolverEntry("spy", "test", spy)
    try:
        got = restore(model, y, op, steps=6, solver="spy", noise=xi, stop="none")
    finally:
        del registry.SOLVERS["spy"]
    want = restore(model, y, op, steps=6, solver="anderson", noise=xi, stop="none")
    assert calls == [("spy", 6)] and torch.equal(got.image, want.image)
    with pytest.raises(DeqirError, match="unknown solver 'spy'"):
        restore(model, y, op, steps=6, solver="spy", noise=xi)


def _members(cls) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def test_comm_protocol_has_the_forward_and_reverse_collectives_and_both_comms_implement_it():
    wanted = {"halo", "carry", "all_sum", "from_last", "from_rank", "reshard",
              "halo_back", "reverse_carry", "from_first", "agree", "is_first", "is_last"}
    assert wanted <= _members(Comm)
    for cls in (LocalComm, DistComm):
        for name in wanted:
            assert name in _members(cls), (cls.__name__, name)
        for name in ("halo", "carry", "halo_back", "reverse_carry", "from_first", "reshard"):
            got = list(inspect.signature(getattr(cls, name)).parameters)[1:]
            want = list(inspect.signature(getattr(Comm, name)).parameters)[1:]
            assert got[:len(want)] == want, (cls.__name__, name, got, want)
    assert LocalComm().block_decays == [(1.0, 1.0)]


def test_local_reverse_collectives_are_identities():
    c = LocalComm()
    row, default = torch.randn(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    assert c.halo_back(row, default) is default          # nothing after the only block
    assert c.from_first(row) is row
    s = ReverseSummary(row, row, 0.5)
    assert c.reverse_carry(s, [0.5], True) is None       # no rows after it: the zero carry

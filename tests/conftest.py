import os
import tempfile

import pytest
import torch

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# solver="auto" caches measured cost profiles (api.profile_cache): never in the user's cache folder
os.environ.setdefault("DEQIR_CACHE_DIR", tempfile.mkdtemp(prefix="deqir-test-cache-"))
# ... and learns K from parallel runs (api.k_observed): off, so one test's runs never change another's
# plan; the tests of that store turn it on in their own cache folder
os.environ.setdefault("DEQIR_LEARN_K", "0")

# One thread: the tests are small, and spawned ranks and Ray workers share the 2 cores;
# oversubscribed OpenMP threads made small convolutions up to 100x slower here.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def gmm():
    from deqir_dist.models import GaussianMixtureDenoiser
    return GaussianMixtureDenoiser(seed=0)


@pytest.fixture
def reference_picard_table(monkeypatch, request):
    """The planner reads picard's K from the picard table of 2026-11-26 (tests/data/picard-k-reference.json,
    etw 0), so planner tests check its logic on fixed K, not whatever the shipped prior's table says today."""
    from pathlib import Path

    from deqir_dist.api import planner
    if request.node.get_closest_marker("shipped_k_tables") is None:
        monkeypatch.setattr(planner, "PICARD_K_FILE", Path(__file__).parent / "data" / "picard-k-reference.json")

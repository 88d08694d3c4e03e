"""mode="search": never worse than the seed, reproducible, independent of the batch around it."""
import numpy as np
import pytest

import kvgpu
from conftest import padded
from kvgpu.generate import adrs_like, cluster, varied

pytest.importorskip("kvgpu.kernels.search", reason="mode 'search' needs numba")


@pytest.fixture(scope="module")
def family():
    rng = np.random.default_rng(31)
    return ([adrs_like(rng) for _ in range(30)] + [varied(rng, g_range=(5, 30)) for _ in range(15)]
            + [cluster(rng, 32, 90, 0.92) for _ in range(3)])


def test_search_is_never_worse_than_seed(family, adrs50):
    seed = kvgpu.solve_batch(**padded(family), mode="seed")
    found = kvgpu.solve_batch(**padded(family), mode="search", effort=30)
    assert (found.max_kvpr <= seed.max_kvpr).all()
    assert (found.max_kvpr < seed.max_kvpr).any()  # and it does find better placements
    assert (found.lower_bound <= found.max_kvpr * (1 + 1e-12)).all()
    for c in adrs50:
        p = kvgpu.solve(c["models"], c["gpu_num"], mode="search", effort=20)
        assert p.max_kvpr <= c["seed_pipeline_max_kvpr"] * (1 + 1e-12)
        assert p.max_kvpr >= c["optimal_max_kvpr"] * (1 - 1e-9)
        assert p.mode == "search" and p.backend == "numba"


def test_search_is_reproducible_and_batch_independent(family):
    a = kvgpu.solve_batch(**padded(family), mode="search", effort=15, seed=3)
    b = kvgpu.solve_batch(**padded(family), mode="search", effort=15, seed=3)
    assert (a.assignment == b.assignment).all()
    for k in (0, 31, len(family) - 1):
        inst = family[k]
        one = kvgpu.solve(np.stack([inst.sizes, inst.demand, np.ones(inst.n_models)], 1), inst.n_gpus,
                          mode="search", effort=15, seed=3)
        assert one.assignment.tolist() == a.assignment[k, :inst.n_models].tolist()


def test_effort_zero_is_the_seed(family):
    a = kvgpu.solve_batch(**padded(family[:10]), mode="search", effort=0)
    b = kvgpu.solve_batch(**padded(family[:10]), mode="seed")
    assert (a.assignment == b.assignment).all()


def test_search_needs_numba_and_a_valid_effort():
    with pytest.raises(kvgpu.BackendUnavailable, match="mode 'search' runs on the numba backend"):
        kvgpu.solve([[10, 1, 1]], 1, mode="search", backend="numpy")
    with pytest.raises(ValueError, match="effort must be a non-negative integer"):
        kvgpu.solve([[10, 1, 1]], 1, mode="search", effort=-1)

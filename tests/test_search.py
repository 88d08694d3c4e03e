"""mode="search": never worse than the seed, reproducible, independent of the batch around it,
and much better where the seed is weak."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kvgpu
from conftest import padded, tiny_instances
from kvgpu.generate import FAMILIES, adrs_like, cluster, uniform, varied

pytest.importorskip("kvgpu.kernels.search", reason="mode 'search' needs numba")


@pytest.fixture(scope="module")
def family():
    rng = np.random.default_rng(31)
    return ([adrs_like(rng) for _ in range(30)] + [varied(rng, g_range=(5, 30)) for _ in range(15)]
            + [cluster(rng, 32, 90, 0.92) for _ in range(3)] + [f(rng, 12) for f in FAMILIES.values()])


def test_search_is_never_worse_than_seed(family, adrs50):
    seed = kvgpu.solve_batch(**padded(family), mode="seed")
    found = kvgpu.solve_batch(**padded(family))  # search mode is the default
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
                          gpu_mem=inst.gpu_mem, mode="search", effort=15, seed=3, exact=False,
                          objective="seed")  # a batch searches in the seed's order
        assert one.assignment.tolist() == a.assignment[k, :inst.n_models].tolist()


def test_effort_zero_is_the_seed(family):
    a = kvgpu.solve_batch(**padded(family[:10]), mode="search", effort=0)
    b = kvgpu.solve_batch(**padded(family[:10]), mode="seed")
    assert (a.assignment == b.assignment).all()


def test_search_after_any_seed_backend_and_a_valid_effort():
    """The backend runs the seed pipeline; search continues from its placement (numba)."""
    models = np.array([[8 + 3 * (i % 7), 1 + i % 5, 1 + i % 3] for i in range(30)], float)
    a = kvgpu.solve(models, 10, backend="numpy", effort=10)
    b = kvgpu.solve(models, 10, backend="numba", effort=10)
    assert a.assignment.tolist() == b.assignment.tolist() and a.backend == "numpy+numba" and b.backend == "numba"
    for bad in (-1, 2.5, True, None, 10**20):
        with pytest.raises(kvgpu.InvalidInstance, match="effort"):
            kvgpu.solve([[10, 1, 1]], 1, mode="search", effort=bad)


def test_search_closes_the_gap_on_nearly_full_clusters():
    """Integer sizes 10-30 GB at 92% memory: the seed ends far above the lower bound, search
    (default effort) within the issue's 3.5% target."""
    rng = np.random.default_rng(8)
    insts = [uniform(rng, 32, 0.92) for _ in range(3)]
    seed = kvgpu.solve_batch(**padded(insts), mode="seed")
    found = kvgpu.solve_batch(**padded(insts))
    assert seed.gap.mean() > 0.10
    assert (found.gap < 0.035).all()


@settings(max_examples=150, deadline=None)
@given(tiny_instances(max_gpus=3, max_models=6), st.floats(0.5, 1.0), st.integers(0, 2**32 - 1))
def test_repair_respects_memory_and_reaches_its_target_when_it_says_so(inst, factor, seed):
    from kvgpu.kernels import search

    s, w, M = inst.sizes, inst.demand, inst.gpu_mem
    n, G = inst.n_models, inst.n_gpus
    try:
        p = kvgpu.solve(np.stack([s, w, np.ones(n)], 1), G, gpu_mem=M, effort=1)
    except kvgpu.NoPlacementFound:
        return  # the models do not fit in memory at all
    if not np.isfinite(p.max_kvpr) or p.max_kvpr == 0:
        return
    T = p.max_kvpr * factor
    a, pos = p.assignment.copy(), np.arange(n, dtype=np.int64)
    state = np.array([seed], np.uint64)
    rules = search.no_rules()
    ok = search.repair(s, w, M, a, pos, T, 200, state, search.new_scratch(n, G), rules, search.new_state(rules, a, G))
    S = np.bincount(a, weights=s, minlength=G)
    W = np.bincount(a, weights=w, minlength=G)
    assert ((0 <= a) & (a < G)).all() and (S <= M + 1e-12).all()  # memory is never broken
    if ok:
        assert (S + W / T <= M + 1e-9).all()
    if factor == 1.0:
        assert ok  # the start already meets its own value

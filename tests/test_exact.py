"""exact=True / kvgpu certify: feasibility checks agree with brute force, proofs are sound."""
import numpy as np
import pytest
from conftest import brute_force_optimum, padded, tiny_instances
from hypothesis import given, settings
from hypothesis import strategies as st

import kvgpu
import kvgpu.kernels.rules
from kvgpu.generate import uniform
from kvgpu.problem import make_instance

exact = pytest.importorskip("kvgpu.kernels.exact", reason="exact=True needs numba")


def _fits_all(inst, assign, T):
    S = np.bincount(assign, weights=inst.sizes, minlength=inst.n_gpus)
    W = np.bincount(assign, weights=inst.demand, minlength=inst.n_gpus)
    return bool((S + W / T <= inst.gpu_mem + 1e-6).all() and (S <= inst.gpu_mem + 1e-9).all())


@settings(max_examples=200, deadline=None)
@given(tiny_instances(), st.floats(0.5, 1.5))
def test_feasible_agrees_with_brute_force(inst, factor):
    """At T around the optimum, the DP (equal GPUs) and the DFS (any GPUs) answer as brute force."""
    opt = brute_force_optimum(inst)
    if not np.isfinite(opt) or opt == 0:
        return
    T = opt * factor
    if abs(factor - 1) < 1e-6:
        return  # at the optimum itself only the slack decides
    s, w, M = inst.sizes, inst.demand, inst.gpu_mem
    out = np.full(inst.n_models, -1, np.int64)
    want = exact.FEASIBLE if T > opt else exact.INFEASIBLE
    no_rules, no_class = kvgpu.kernels.rules.no_rules(), np.empty(0, np.int64)
    status, _ = exact._feasible_dfs(s, w, s + w / T, M, T, 10**7, out, no_rules, no_class)
    assert status == want
    if status == exact.FEASIBLE:
        assert _fits_all(inst, out, T)
    if (M == M[0]).all():
        out[:] = -1
        assert exact._feasible_dp(s + w / T, M[0], inst.n_gpus, out) == want
        if want == exact.FEASIBLE:
            assert _fits_all(inst, out, T)


@settings(max_examples=100, deadline=None)
@given(tiny_instances())
def test_exact_solve_reaches_and_proves_the_optimum(inst):
    """Also where the seed's packings fail: search mode then packs by exact search, and an
    instance whose models cannot fit is reported as proven infeasible."""
    opt = brute_force_optimum(inst)
    m = np.stack([inst.sizes, inst.demand, np.ones(inst.n_models)], 1)
    memory_only = make_instance(np.stack([inst.sizes, np.zeros(inst.n_models), np.ones(inst.n_models)], 1),
                                inst.n_gpus, inst.gpu_mem)
    if brute_force_optimum(memory_only) == np.inf:
        with pytest.raises(kvgpu.NoPlacementFound, match=r"instance\(s\) \[0\]: the models do not fit"):
            kvgpu.solve(m, inst.n_gpus, gpu_mem=inst.gpu_mem, exact=True, effort=2)
        return
    p = kvgpu.solve(m, inst.n_gpus, gpu_mem=inst.gpu_mem, exact=True, effort=2)
    if np.isfinite(opt):
        assert p.max_kvpr == pytest.approx(opt, rel=1e-9, abs=0)
        assert p.proven_optimal and p.status == "optimal (proven)"
        assert p.lower_bound <= opt * (1 + 1e-12)


def test_certify_adrs50_as_one_batch(adrs50):
    insts = [make_instance(c["models"], c["gpu_num"]) for c in adrs50]
    opt = np.array([c["optimal_max_kvpr"] for c in adrs50])
    r = kvgpu.solve_batch(**padded(insts), mode="seed", exact=True)  # the proof starts from the seed's answer
    assert np.allclose(r.max_kvpr, opt, rtol=1e-9, atol=0)
    assert r.proven_optimal.all()
    assert (r.lower_bound <= opt * (1 + 1e-12)).all()


def test_work_limit_gives_an_interval_quickly():
    """A 64-GPU nearly full cluster cannot be proven with a tiny budget: the answer is the best
    placement and a valid interval, not a hang."""
    inst = uniform(np.random.default_rng(2), 64)
    m = np.stack([inst.sizes, inst.demand, np.ones(inst.n_models)], 1)
    plain = kvgpu.solve(m, 64, effort=5)
    p = kvgpu.solve(m, 64, effort=5, exact=True, exact_work=2000)
    assert p.max_kvpr <= plain.max_kvpr
    assert plain.lower_bound <= p.lower_bound <= p.max_kvpr
    assert not p.proven_optimal and p.status.startswith("at most ") and "not proven optimal" in p.status


def test_heterogeneous_gpus_are_certified_by_search():
    rng = np.random.default_rng(4)
    m = np.stack([rng.integers(5, 36, 9), rng.integers(1, 10, 9), rng.integers(5, 10, 9)], 1).astype(float)
    inst = make_instance(m, 3, [40.0, 80.0, 141.0])
    p = kvgpu.solve(m, 3, gpu_mem=inst.gpu_mem, exact=True)
    assert p.proven_optimal
    assert p.max_kvpr == pytest.approx(brute_force_optimum(inst), rel=1e-9, abs=0)


def test_exact_options_are_checked():
    with pytest.raises(kvgpu.InvalidInstance, match="exact_work"):
        kvgpu.solve([[10, 1, 1]], 1, exact=True, exact_work=-5)
    with pytest.raises(kvgpu.InvalidInstance, match="backend: 'gpu' is unknown"):
        kvgpu.solve([[10, 1, 1]], 1, exact=True, backend="gpu")

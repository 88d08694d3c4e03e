"""Proofs in batches and sweeps (``exact=None`` by default, as :func:`kvgpu.solve`): small
instances of a batch are proven in the batch kernels, and every row says which bound its gap
measures."""
import numpy as np
import pytest

import kvgpu
from kvgpu import generate, sweep
from kvgpu.batch.state import batch_from_instances
from kvgpu.engine import AUTO_EXACT_ITEMS
from kvgpu.kernels.params import OPTIMAL_RTOL
from kvgpu.results import BOUND_CLOSED_FORM, BOUND_EXACT


def _batch(insts):
    b = batch_from_instances(insts)
    return dict(sizes=b.sizes, demand=b.demand, gpu_mem=b.gpu_mem, model_mask=b.model_mask, gpu_mask=b.gpu_mask)


def _adrs(k):
    return [generate.adrs_like(np.random.default_rng(s)) for s in range(k)]


def test_a_batch_proves_its_small_instances_by_default_and_matches_one_by_one_solves():
    insts = _adrs(12)
    res = kvgpu.solve_batch(**_batch(insts), backend="numba", effort=5)
    assert res.certified.all() and res.proven.all()
    assert (res.bound_source == BOUND_EXACT).all()
    assert np.allclose(res.gap, 0.0, atol=OPTIMAL_RTOL)
    for k, inst in enumerate(insts):  # the same optimum as solve's proof, instance by instance
        one = kvgpu.solve(np.stack([inst.sizes, inst.demand, np.ones(inst.n_models)], 1), inst.n_gpus, effort=5)
        assert one.proven_optimal
        assert res.max_kvpr[k] == pytest.approx(one.max_kvpr, rel=1e-6)


def test_without_a_proof_the_gap_says_it_measures_the_closed_form_bound():
    insts = _adrs(12)
    off = kvgpu.solve_batch(**_batch(insts), backend="numba", effort=5, exact=False)
    on = kvgpu.solve_batch(**_batch(insts), backend="numba", effort=5)
    assert not off.certified.any() and not off.proven.any()
    assert (off.bound_source == BOUND_CLOSED_FORM).all()
    # the proof only raises the bound and never worsens the answer
    assert (on.lower_bound >= off.lower_bound * (1 - 1e-12)).all()
    assert (on.max_kvpr <= off.max_kvpr * (1 + 1e-12)).all()
    assert (off.gap > 1e-6).any(), "the instances should include one the closed-form bound does not close"


def test_a_mixed_batch_proves_the_small_instances_only():
    small = _adrs(3)
    big = generate.fixed_count(np.random.default_rng(1), 10, AUTO_EXACT_ITEMS + 6, sizes="uniform",
                               popularity="uniform", gpu_mem=80.0, max_fill=0.9)
    res = kvgpu.solve_batch(**_batch([small[0], big, small[1], small[2]]), backend="numba", effort=3)
    assert res.certified.tolist() == [True, False, True, True]
    assert res.bound_source[1] == BOUND_CLOSED_FORM and res.proven[[0, 2, 3]].all()
    assert kvgpu.solve_batch(**_batch([big]), backend="numba", effort=3, exact=True).certified.all()


def test_seed_mode_is_the_seed_pipeline_unless_a_proof_is_asked_for():
    insts = _adrs(6)
    auto = kvgpu.solve_batch(**_batch(insts), backend="numba", mode="seed")
    off = kvgpu.solve_batch(**_batch(insts), backend="numba", mode="seed", exact=False)
    assert (auto.assignment == off.assignment).all() and not auto.certified.any()
    assert kvgpu.solve_batch(**_batch(insts), backend="numba", mode="seed", exact=True).certified.all()


def test_sweep_rows_carry_the_proof_and_the_bound_they_measure(tmp_path):
    spec = {"gpus": [4], "models_per_gpu": [2, 7], "seeds": 2, "mode": ["search"], "effort": 3,
            "exact": ["auto", False], "exact_work": 100_000}
    df = sweep.run(spec, tmp_path / "out", progress=False)
    assert len(df) == 8 and set(df["exact"]) == {"auto", "false"}
    auto, off = df[df["exact"] == "auto"], df[df["exact"] == "false"]
    small = auto["models"] <= AUTO_EXACT_ITEMS
    assert (auto[small]["bound"] == BOUND_EXACT).all() and auto[small]["proven"].all()
    assert (auto[~small]["bound"] == BOUND_CLOSED_FORM).all() and (~small).any()
    assert (off["bound"] == BOUND_CLOSED_FORM).all()
    assert (df["proven"] == (df["gap"] <= OPTIMAL_RTOL)).all()


@pytest.mark.parametrize("bad", ["maybe", 2, [None, "often"]])
def test_sweep_refuses_an_exact_value_it_does_not_know(bad):
    with pytest.raises(kvgpu.InvalidInstance, match=r"exact: must be one of 'auto', true, false"):
        sweep.load_spec({"gpus": 4, "exact": bad})

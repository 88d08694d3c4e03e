"""Reported lower bounds are valid (checked against brute force) and the batch bound equals the scalar one."""
import numpy as np
from conftest import brute_force_optimum, tiny_instances
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgpu import bounds
from kvgpu.batch import bounds as bb
from kvgpu.batch.state import batch_from_instances
from kvgpu.problem import make_instance


@settings(max_examples=300, deadline=None)
@given(tiny_instances())
def test_lower_bound_is_valid(inst):
    opt = brute_force_optimum(inst)
    lb = bounds.lower_bound(*inst.py)
    assert lb <= opt * (1 + 1e-12) or opt == np.inf
    batch = batch_from_instances([inst])
    batch_lb = bb.lower_bound(batch)[0]
    assert batch_lb == lb
    if np.isfinite(opt):
        # the bin-packing bisection only ever raises the bound, and never past the optimum
        l2 = bb.binpacking_bound(batch, np.array([lb]), np.array([opt]))[0]
        assert lb <= l2 <= opt * (1 + 1e-12)


def test_seed_kprefix_term_is_not_a_valid_bound():
    # three 30 GB models of demand 1 on three 80 GB GPUs: optimum 1/50, the seed's k=2 term 3/70
    inst = make_instance([[30, 1, 1]] * 3, 3)
    s, w, M = inst.py
    order = bounds.by_size_desc(s, range(3))
    assert bounds.seed_kprefix(s, w, order, bounds.mem_prefix(M), 3) == 3 / 70
    assert brute_force_optimum(inst) == 1 / 50
    assert bounds.lower_bound(s, w, M) <= 1 / 50


def test_batch_start_bound_equals_scalar(seed_cases):
    insts = [make_instance(c["models"], c["gpu_num"]) for c in seed_cases[:80]]
    b = batch_from_instances(insts)
    got = bb.seed_start_bound(b, bb.mem_prefix(np, b.gpu_mem, b.gpu_mask))
    want = [bounds.seed_start_bound(*i.py) for i in insts]
    assert got.tolist() == want


def test_binpacking_bound_on_adrs50(adrs50):
    """Against the proven optima: never above, and much closer than the simple bounds."""
    b = batch_from_instances([make_instance(c["models"], c["gpu_num"]) for c in adrs50])
    opt = np.array([c["optimal_max_kvpr"] for c in adrs50])
    simple = bb.lower_bound(b)
    l2 = bb.binpacking_bound(b, simple, opt * 1.05)
    assert (l2 <= opt * (1 + 1e-12)).all()
    assert (l2 >= simple).all()
    assert (opt / l2 - 1).mean() < 0.05 < (opt / simple - 1).mean()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1.2), min_size=1, max_size=120), st.lists(st.floats(-0.2, 1.4), min_size=1, max_size=30),
       st.booleans())
def test_count_below_matches_searchsorted(values, thresholds, inclusive):
    ra = np.sort(np.array(values))[None, :]
    t = np.array(thresholds)[None, :]
    want = np.searchsorted(ra[0], t[0], side="right" if inclusive else "left")
    assert bb._count_below(np, ra, t, inclusive)[0].tolist() == want.tolist()

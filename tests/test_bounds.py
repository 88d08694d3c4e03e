"""Reported lower bounds are valid (checked against brute force), also on GPUs of mixed memory,
and the seed's start bound is the same in the array engine and the scalar reference."""
import numpy as np
from conftest import brute_force_optimum, tiny_instances
from hypothesis import given, settings
from hypothesis import strategies as st

from kvgpu import bounds, seed_bound
from kvgpu.batch import bounds as bb
from kvgpu.batch.state import batch_from_instances
from kvgpu.problem import make_instance


@settings(max_examples=300, deadline=None)
@given(tiny_instances(max_gpus=4))
def test_lower_bound_is_valid(inst):
    """Equal or mixed memory: the closed forms and the packing relaxation per memory class
    never exceed brute force's optimum, and the bisection only ever raises the bound."""
    opt = brute_force_optimum(inst)
    batch = batch_from_instances([inst])
    simple = bounds.simple_bound(batch)
    assert simple[0] <= opt * (1 + 1e-12) or opt == np.inf
    if np.isfinite(opt) and opt > 0:
        lb = bounds.lower_bound(batch, np.array([opt]))[0]
        assert simple[0] <= lb <= opt * (1 + 1e-12)


def test_seed_kprefix_term_is_not_a_valid_bound():
    # three 30 GB models of demand 1 on three 80 GB GPUs: optimum 1/50, the seed's k=2 term 3/70
    inst = make_instance([[30, 1, 1]] * 3, 3)
    s, w, M = inst.py
    order = seed_bound.by_size_desc(s, range(3))
    assert seed_bound.seed_kprefix(s, w, order, seed_bound.mem_prefix(M), 3) == 3 / 70
    assert brute_force_optimum(inst) == 1 / 50
    assert bounds.simple_bound(batch_from_instances([inst]))[0] <= 1 / 50


def test_batch_start_bound_equals_scalar(seed_cases):
    insts = [make_instance(c["models"], c["gpu_num"]) for c in seed_cases[:80]]
    b = batch_from_instances(insts)
    got = bb.seed_start_bound(b, bb.mem_prefix(np, b.gpu_mem, b.gpu_mask))
    want = [seed_bound.seed_start_bound(*i.py) for i in insts]
    assert got.tolist() == want


def test_binpacking_bound_on_adrs50(adrs50):
    """Against the proven optima: never above, and much closer than the simple bounds."""
    b = batch_from_instances([make_instance(c["models"], c["gpu_num"]) for c in adrs50])
    opt = np.array([c["optimal_max_kvpr"] for c in adrs50])
    simple = bounds.simple_bound(b)
    l2 = bounds.binpacking_bound(b, simple, opt * 1.05)
    assert (l2 <= opt * (1 + 1e-12)).all()
    assert (l2 >= simple).all()
    assert (opt / l2 - 1).mean() < 0.05 < (opt / simple - 1).mean()


def test_memory_classes_raise_the_bound_of_mixed_clusters():
    """Three 30 GB models of demand 10 on GPUs of 40, 40 and 80 GB: below KVPR 1 each needs more
    than 40 GB (weights plus KV room), so all would need the one 80 GB GPU -- impossible.  The
    closed forms say 0.43; the per-class relaxation finds the optimum 1 (the old bound skipped
    mixed memory altogether)."""
    inst = make_instance([[30, 10, 1]] * 3, 3, [40, 40, 80])
    b = batch_from_instances([inst])
    assert brute_force_optimum(inst) == 1.0
    simple = bounds.simple_bound(b)[0]
    raised = bounds.lower_bound(b, np.array([1.5]))[0]
    assert simple < 0.5 and 0.999 < raised <= 1.0


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0, 1.2), min_size=1, max_size=120), st.lists(st.floats(-0.2, 1.4), min_size=1, max_size=30),
       st.booleans())
def test_count_below_matches_searchsorted(values, thresholds, inclusive):
    ra = np.sort(np.array(values))[None, :]
    t = np.array(thresholds)[None, :]
    want = np.searchsorted(ra[0], t[0], side="right" if inclusive else "left")
    assert bounds._count_below(np, ra, t, inclusive)[0].tolist() == want.tolist()


def _random_batch(rng, B, n_max, g_max, mems=(40.0, 80.0, 141.0)):
    """Padded batch of random instances: mixed memories, masked-out models and GPUs anywhere in
    the rows (not only at the end), sizes up to a whole GPU, demands from 0."""
    from kvgpu.batch.state import make_batch

    N, G = int(rng.integers(1, n_max + 1)), int(rng.integers(1, g_max + 1))
    mem = rng.choice(mems, (B, G))
    gm = rng.random((B, G)) < 0.85
    gm[np.arange(B), rng.integers(0, G, B)] = True  # every instance has a GPU
    mm = rng.random((B, N)) < 0.8
    sizes = np.round(rng.uniform(0.5, 1.0, (B, N)) * rng.choice([10.0, 30.0, 70.0], (B, N)), 1)
    demand = rng.integers(0, 10, (B, N)) / rng.integers(1, 10, (B, N))
    return make_batch(sizes, demand, mem, mm, gm)


def test_compiled_lower_bound_equals_the_array_code():
    """kvgpu.kernels.bound gives bounds.lower_bound's values bit for bit: ADRS-shaped batches,
    mixed memories and masks, one-GPU instances in wide batches, wide rows (the merge sort of
    long item rows), achieved values that are infinite or below the bound."""
    import pytest

    pytest.importorskip("numba")
    from kvgpu import numba_engine
    from kvgpu.generate import adrs_like
    from kvgpu.kernels import bound

    assert (bound.L2_DELTA, bound.VOLUME_RTOL) == (bounds.L2_DELTA, bounds.VOLUME_RTOL)
    rng = np.random.default_rng(2024)
    batches = [batch_from_instances([adrs_like(rng) for _ in range(300)])]
    batches += [_random_batch(rng, 200, n, g) for n, g in [(3, 1), (6, 2), (20, 5), (40, 12), (12, 40)]]
    batches += [_random_batch(rng, 12, 300, 140), _random_batch(rng, 400, 9, 4, mems=(80.0,))]
    checked = 0
    for b in batches:
        simple = bounds.simple_bound(b)
        his = [simple * rng.uniform(1.0, 3.0, simple.shape), np.full(simple.shape, np.inf), simple * 0.5]
        for hi in his:
            want = bounds.lower_bound(b, hi)
            got = numba_engine.lower_bound(b, hi)
            assert got.dtype == np.float64 and got.shape == want.shape
            assert np.array_equal(got, want), np.nonzero(got != want)[0][:5]
            checked += int((want > simple).sum())
        one = b.take(np.array([0]))  # the single-instance kernel
        assert np.array_equal(numba_engine.lower_bound(one, his[0][:1]), bounds.lower_bound(one, his[0][:1]))
    assert checked > 100  # the bisection raised many of them, so it was compared too


def _relayout(b, rng, extra_n, extra_g, shuffle, trim=False):
    """The instances of batch ``b`` in another padded layout: ``extra_n`` / ``extra_g`` more
    padding slots, with ``shuffle`` the padding moved to random places, with ``trim`` the rows
    cut to the most real entries (the real models and GPUs keep their order, as a stable
    compaction keeps it)."""
    from kvgpu.batch.state import make_batch

    def move(xs, mask, extra):
        B, K = mask.shape
        width = max(1, int(mask.sum(axis=1).max())) if trim else K + extra
        outs, out_m = [np.zeros((B, width)) for _ in xs], np.zeros((B, width), bool)
        for i in range(B):
            real = np.nonzero(mask[i])[0]
            slots = np.sort(rng.choice(width, real.size, replace=False)) if shuffle else np.arange(real.size)
            out_m[i, slots] = True
            for x, out in zip(xs, outs):
                out[i, slots] = x[i, real]
        return outs, out_m

    (s, w), mm = move((b.sizes, b.demand), b.model_mask, extra_n)
    (g,), gm = move((b.gpu_mem,), b.gpu_mask, extra_g)
    return make_batch(s, w, g, mm, gm)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 70), st.integers(1, 9), st.integers(0, 40), st.integers(0, 6),
       st.booleans(), st.sampled_from(["compact", "wide"]))
def test_lower_bound_does_not_depend_on_the_padding(seed, n_max, g_max, extra_n, extra_g, shuffle, how):
    """The bound of an instance is the same bit for bit whether its padding is moved, widened or
    trimmed away (real models in their order): the array code and the compiled bound, so the
    device, which solves compacted rows, reports the CPU's value."""
    import pytest

    rng = np.random.default_rng(seed)
    b = _random_batch(rng, 6, n_max, g_max)
    other = _relayout(b, rng, 0, 0, False, trim=True) if how == "compact" else _relayout(b, rng, extra_n, extra_g,
                                                                                          shuffle)
    simple = bounds.simple_bound(b)
    hi = simple * rng.uniform(1.0, 3.0, simple.shape)
    want = bounds.lower_bound(b, hi)
    assert np.array_equal(bounds.simple_bound(other), simple)
    assert np.array_equal(bounds.lower_bound(other, hi), want)
    pytest.importorskip("numba")
    from kvgpu import numba_engine

    assert np.array_equal(numba_engine.lower_bound(other, hi), want)
    assert np.array_equal(numba_engine.lower_bound(b, hi), want)

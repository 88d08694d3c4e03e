"""The batch engine takes the reference's decisions ("batch equals a loop of singles")."""
import numpy as np
import pytest

from conftest import FULL, close
from kvgpu import reference as R
from kvgpu.batch import local
from kvgpu.batch.pipeline import seed_pipeline
from kvgpu.batch.state import batch_from_instances, score
from kvgpu.generate import varied
from kvgpu.problem import make_instance


def _starts(cases):
    insts = [make_instance(c["models"], c["gpu_num"]) for c in cases]
    b = batch_from_instances(insts)
    B, N, _ = b.shape
    assign = np.full((B, N), -1)
    pos = np.full((B, N), -1)
    for k, c in enumerate(cases):
        n = len(c["start"])
        assign[k, :n], pos[k, :n] = c["start"], np.arange(n)
    return b, assign, pos


def test_local_search_matches_seed(seed_functions):
    b, assign, pos = _starts(seed_functions)
    ra, rp = local.refine_peak(b, assign, pos)
    ia, _ = local.improve_local(b, assign, pos, 4000)
    pa, _ = local.improve_local(b, ra, rp, 1500)
    for k, c in enumerate(seed_functions):
        n = len(c["start"])
        assert ra[k, :n].tolist() == c["refine_peak"]["assignment"], k
        assert ia[k, :n].tolist() == c["improve_local"]["assignment"], k
        assert pa[k, :n].tolist() == c["refine_peak_then_polish"]["assignment"], k


def test_local_search_respects_iteration_budget(seed_functions):
    b, assign, pos = _starts(seed_functions[:50])
    a0, _ = local.improve_local(b, assign, pos, 0)
    # with no descent steps only the 12 worst/second-worst swap rounds may run: the number of
    # changed models is bounded by 2 per round
    assert ((a0 != assign).sum(axis=1) <= 24).all()
    a1, _ = local.improve_local(b, assign, pos, 1)
    ref = [R.assignment_of(R.improve_local(R.placement_of(c["start"], c["gpu_num"]),
                                            make_instance(c["models"], c["gpu_num"]), 1), len(c["start"]))
           for c in seed_functions[:50]]
    assert [a1[k, :len(r)].tolist() for k, r in enumerate(ref)] == ref


def test_pipeline_matches_seed_cases(seed_cases):
    b = batch_from_instances([make_instance(c["models"], c["gpu_num"]) for c in seed_cases])
    trace = {}
    seed_pipeline(b, trace)
    for stage in ("selected", "after_refine_peak", "final"):
        for k, c in enumerate(seed_cases):
            assert all(close(trace[stage][j][k], c[stage][j]) for j in range(3)), (k, stage)


def test_pipeline_matches_adrs50_seed(adrs50):
    b = batch_from_instances([make_instance(c["models"], c["gpu_num"]) for c in adrs50])
    assign, pos = seed_pipeline(b)
    mx = score(b, assign, pos)[0]
    for k, c in enumerate(adrs50):
        assert close(mx[k], c["seed_pipeline_max_kvpr"]), k


def _random_instances(n, g_max, seed):
    rng = np.random.default_rng(seed)
    return [varied(rng, g_range=(5, g_max)) for _ in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("n, g_max", [(500, 64)] if FULL else [(40, 20)])
def test_batch_equals_reference_on_random_instances(n, g_max):
    """CI runs a small sample; ``KVGPU_FULL=1`` runs 500 instances of 5..64 GPUs."""
    insts = _random_instances(n, g_max, seed=2024)
    b = batch_from_instances(insts)
    assign, pos = seed_pipeline(b)
    for k, inst in enumerate(insts):
        ref = R.seed_pipeline(inst)
        assert R.assignment_of(ref, inst.n_models) == assign[k, :inst.n_models].tolist(), k


def test_batch_result_does_not_depend_on_batch_company(adrs50):
    """An instance solved alone and inside a padded batch with bigger instances agree."""
    insts = [make_instance(c["models"], c["gpu_num"]) for c in adrs50[:6]]
    big = _random_instances(2, 30, seed=5)
    a_mix, _ = seed_pipeline(batch_from_instances(insts + big))
    for k, inst in enumerate(insts):
        a_one, _ = seed_pipeline(batch_from_instances([inst]))
        assert a_one[0, :inst.n_models].tolist() == a_mix[k, :inst.n_models].tolist()


def test_array_engine_is_passed_down_not_shared_between_threads():
    """Two solves at once, one with its own ``transfers`` step: only that solve's thread calls it
    (a module-level switch would leak it into the other), and both make the plain engine's
    placements."""
    import threading

    from kvgpu.batch.array_engine import NUMPY, ArrayEngine
    from kvgpu.batch.pipeline import solve_seed

    rng = np.random.default_rng(41)
    b = batch_from_instances([varied(rng, g_range=(4, 8), per_gpu=(1, 3)) for _ in range(6)])
    want = solve_seed(b)
    callers, started = set(), threading.Barrier(2)

    def spy(*args):
        callers.add(threading.get_ident())
        return local.array_transfers(*args)

    spied = ArrayEngine(np, transfers=spy)
    out, idents = {}, {}

    def run(name, engine):
        idents[name] = threading.get_ident()
        started.wait()
        out[name] = solve_seed(b, engine)

    threads = [threading.Thread(target=run, args=("spied", spied)), threading.Thread(target=run, args=("plain", NUMPY))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert callers == {idents["spied"]}
    for name in out:
        assert (out[name][0] == want[0]).all() and (out[name][1] == want[1]).all(), name


def test_array_engine_refuses_a_mismatched_namespace():
    from types import SimpleNamespace

    from kvgpu.batch.array_engine import ArrayEngine
    from kvgpu.batch.pipeline import solve_seed

    b = batch_from_instances([make_instance([[10, 1, 1], [20, 2, 1]], 2)])
    with pytest.raises(TypeError, match="the engine computes with fake_xp but the batch holds numpy"):
        solve_seed(b, ArrayEngine(SimpleNamespace(__name__="fake_xp")))
    with pytest.raises(TypeError, match="engine must be a kvgpu.batch.array_engine.ArrayEngine"):
        solve_seed(b, "numpy")
    with pytest.raises(TypeError, match="ArrayEngine.choose must be a function or None"):
        ArrayEngine(np, choose=3)

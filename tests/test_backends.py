"""Backend selection, and the numba CPU backend taking the same decisions as the NumPy engine."""
import subprocess
import sys

import numpy as np
import pytest

import kvgpu
from conftest import FULL, close
from kvgpu import backends
from kvgpu.batch.pipeline import solve_seed as numpy_seed
from kvgpu.batch.state import batch_from_instances
from kvgpu.generate import adrs_like, varied
from kvgpu.problem import make_instance

cpu = pytest.importorskip("kvgpu.kernels.cpu", reason="numba is not installed")


def test_probe_and_resolve():
    avail = backends.probe()
    assert avail["numpy"][0]
    assert backends.resolve("numpy") == "numpy"
    assert backends.resolve("auto") in ("numpy", "numba", "cuda")
    with pytest.raises(ValueError, match="backend 'tpu' is unknown"):
        backends.resolve("tpu")
    if not avail["cuda"][0]:
        with pytest.raises(kvgpu.BackendUnavailable, match="backend 'cuda' is not available: "):
            kvgpu.solve([[10, 1, 1]], 1, backend="cuda")


def test_disable_gpu_and_info_in_a_fresh_process():
    env = {**__import__("os").environ, "KVGPU_DISABLE_GPU": "1"}
    out = subprocess.run([sys.executable, "-m", "kvgpu.cli", "info"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "disabled by KVGPU_DISABLE_GPU=1" in out.stdout
    assert "auto -> " in out.stdout and "cuda" not in out.stdout.split("auto -> ")[1]


def _starts(cases):
    for c in cases:
        inst = make_instance(c["models"], c["gpu_num"])
        a = np.array(c["start"], np.int64)
        yield c, inst, a, np.arange(len(a), dtype=np.int64)


def test_numba_local_search_matches_seed(seed_functions):
    for k, (c, inst, a, p) in enumerate(_starts(seed_functions)):
        args = (inst.sizes, inst.demand, inst.gpu_mem)
        a1, p1 = a.copy(), p.copy()
        cpu.refine_peak(*args, a1, p1, 2, 12, *_no_rules(a1, args[2]))
        assert a1.tolist() == c["refine_peak"]["assignment"], k
        a2, p2 = a.copy(), p.copy()
        cpu.improve_local(*args, a2, p2, 4000, *_no_rules(a2, args[2]))
        assert a2.tolist() == c["improve_local"]["assignment"], k
        cpu.improve_local(*args, a1, p1, 1500, *_no_rules(a1, args[2]))
        assert a1.tolist() == c["refine_peak_then_polish"]["assignment"], k


def test_numba_start_bound_equals_reference(seed_cases):
    from kvgpu import seed_bound as bounds
    for c in seed_cases[:60]:
        inst = make_instance(c["models"], c["gpu_num"])
        assert cpu.start_bound(inst.sizes, inst.demand, inst.gpu_mem) == bounds.seed_start_bound(*inst.py)


def test_numba_pipeline_matches_seed_and_numpy(seed_cases, adrs50):
    insts = [make_instance(c["models"], c["gpu_num"]) for c in seed_cases + adrs50]
    b = batch_from_instances(insts)
    got, _ = backends.solve_seed(b, "numba")
    want, _ = numpy_seed(b)
    assert (got == want).all()
    res = kvgpu.solve_batch(b.sizes, b.demand, b.gpu_mem, model_mask=b.model_mask, gpu_mask=b.gpu_mask,
                            backend="numba", mode="seed")
    assert res.backend == "numba"
    for k, c in enumerate(seed_cases):
        assert close(res.max_kvpr[k], c["final"][0]), k
    for k, c in enumerate(adrs50):
        assert close(res.max_kvpr[len(seed_cases) + k], c["seed_pipeline_max_kvpr"]), k


@pytest.mark.slow
@pytest.mark.parametrize("n, g_max", [(500, 64)] if FULL else [(60, 32)])
def test_numba_equals_numpy_on_random_instances(n, g_max):
    rng = np.random.default_rng(99)
    insts = [varied(rng, g_range=(5, g_max)) for _ in range(n)] + [adrs_like(rng) for _ in range(n)]
    b = batch_from_instances(insts)
    got, _ = backends.solve_seed(b, "numba")
    want, _ = numpy_seed(b)
    assert (got == want).all()


def test_solve_same_placement_on_every_cpu_backend():
    models = [{"name": f"m{i}", "model_size": 8 + 3 * (i % 7), "req_rate": 1 + i % 5, "slo": 1 + i % 3}
              for i in range(30)]
    a = kvgpu.solve(models, 10, gpu_mem=[40, 80] * 5, backend="numpy", mode="seed")
    b = kvgpu.solve(models, 10, gpu_mem=[40, 80] * 5, backend="numba", mode="seed")
    assert a.assignment.tolist() == b.assignment.tolist() and b.backend == "numba"


@pytest.mark.parametrize("family", ["adrs", "varied", "ties"])
def test_incremental_regret_insertion_equals_reference(family):
    """The O(N^2 + NG) regret insertion of the numba kernels makes the reference's decisions."""
    from kvgpu import reference as R

    rng = np.random.default_rng(17)
    if family == "adrs":
        insts = [adrs_like(rng) for _ in range(80)]
    elif family == "varied":
        insts = [varied(rng, g_range=(1, 70), per_gpu=(1, 6)) for _ in range(25)]
    else:  # many identical models and GPUs: every decision is a tie broken by index
        insts = [make_instance([[20, 4, 5]] * 40, 12), make_instance([[20, 4, 5]] * 20 + [[10, 2, 5]] * 20, 10),
                 make_instance([[40, 1, 1]] * 3, 3), make_instance([[30, 1, 1], [30, 2, 1]], 1),
                 make_instance([[10, 0, 1]] * 50, 40)]
    for k, inst in enumerate(insts):
        n = inst.n_models
        a, p = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
        ok = cpu.regret_insertion(inst.sizes, inst.demand, inst.gpu_mem, a, p)
        ref = R.regret_insertion(inst)
        assert ok == (ref is not None), k
        if ok:
            lists = [np.nonzero(a == g)[0][np.argsort(p[a == g])].tolist() for g in range(inst.n_gpus)]
            assert lists == ref, k


def test_heterogeneous_gpus_reference_numpy_numba_agree():
    """Mixed 40/80/141 GB clusters: all three engines take the same decisions."""
    from kvgpu import reference as R

    rng = np.random.default_rng(23)
    from kvgpu.generate import _packs

    insts = []
    while len(insts) < 12:
        g = int(rng.integers(3, 12))
        mem = rng.choice([40.0, 80.0, 141.0], g)
        n = int(rng.integers(g, 3 * g))
        sizes = rng.integers(2, 60, n).astype(float)
        sizes = np.clip(np.floor(sizes * min(1.0, 0.8 * mem.sum() / sizes.sum())), 1, mem.max())
        inst = make_instance(np.stack([sizes, rng.integers(1, 9, n), rng.integers(1, 9, n)], 1), g, mem)
        if _packs(inst):
            insts.append(inst)
    b = batch_from_instances(insts)
    got, _ = backends.solve_seed(b, "numba")
    want, _ = numpy_seed(b)
    assert (got == want).all()
    for k, inst in enumerate(insts):
        assert R.assignment_of(R.seed_pipeline(inst), inst.n_models) == got[k, :inst.n_models].tolist(), k


def _no_rules(assign, M):
    """``(rules, rule state)`` of an instance without rules, for the kernels' local search."""
    from kvgpu.kernels import rules

    r = rules.no_rules()
    return r, rules.new_state(r, assign, M.shape[0])

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


@pytest.fixture
def cuda_usable(monkeypatch):
    """The probe says a device is usable (nothing may actually run there): an H100 (sm_90, full
    rate float64) whose kernels are cached."""
    from kvgpu import cuda_cache

    avail = {"numpy": (True, "numpy"), "numba": (True, "numba"), "cuda": (True, "a test device")}
    monkeypatch.setattr(backends, "probe", lambda: avail)
    monkeypatch.setattr(backends, "cuda_device", lambda: ("H100", (9, 0)))
    monkeypatch.setattr(cuda_cache, "cached", lambda cc: True)
    return avail


def test_auto_takes_a_cold_or_slow_float64_device_only_for_big_jobs(cuda_usable, monkeypatch):
    """Kernels not compiled here yet: the device only from GPU_COLD_MIN_WORK (the compile must
    pay); a device without full-rate float64 (an RTX, sm_89): never by ``auto``, while an
    explicit ``cuda`` request is obeyed; the reasons name the rule."""
    from kvgpu import cuda_cache

    monkeypatch.setattr(cuda_cache, "cached", lambda cc: False)
    cold = backends.GPU_COLD_MIN_WORK
    assert backends.GPU_MIN_WORK < cold
    assert backends.resolve("auto", cold - 1) == "numba"
    assert backends.resolve("auto", cold) == "cuda"
    assert "not compiled yet" in backends.device_policy(("H100", (9, 0)), 10)[1]
    monkeypatch.setattr(backends, "cuda_device", lambda: ("RTX 4090", (8, 9)))
    assert backends.resolve("auto", 10**12) == "numba"
    assert backends.resolve("cuda", 1) == "cuda"
    ok, why = backends.device_policy(("RTX 4090", (8, 9)), 10**12, cached=True)
    assert not ok and "float64" in why and "sm_89" in why
    assert backends.device_policy(None, 10**12) == (False, "no usable device")
    for cc in backends.FULL_RATE_FP64:
        assert backends.device_policy(("x", cc), backends.GPU_MIN_WORK, cached=True)[0]


def test_auto_keeps_small_jobs_on_the_cpu(cuda_usable):
    big = backends.GPU_MIN_WORK
    assert backends.resolve("auto", 0) == "numba"
    assert backends.resolve("auto", big - 1) == "numba"
    assert backends.resolve("auto", big) == "cuda"
    assert backends.resolve("auto") == "cuda"  # size unknown: as before
    assert backends.resolve("cuda", 1) == "cuda"  # an explicit request is obeyed
    cuda_usable["numba"] = (False, "no numba")
    assert backends.resolve("auto", 5) == "numpy"
    assert backends.work_of([14, 3], [7, 2]) == 14 * 7 + 3 * 2
    with pytest.raises(ValueError, match="work must be a non-negative integer"):
        backends.resolve("auto", -1)
    with pytest.raises(ValueError, match="work must be a non-negative integer"):
        backends.resolve("auto", 2.5)
    with pytest.raises(ValueError, match="n_models and n_gpus must have one shape"):
        backends.work_of([1, 2], [3])


def test_auto_solves_a_small_batch_and_one_problem_on_the_cpu(cuda_usable):
    """With a device said usable, ``auto`` still runs a tiny batch and a single problem -- with
    and without rules -- on numba (the cuda backend is never entered: it would need CuPy)."""
    rng = np.random.default_rng(3)
    b = batch_from_instances([adrs_like(rng) for _ in range(3)])
    res = kvgpu.solve_batch(b.sizes, b.demand, b.gpu_mem, model_mask=b.model_mask, gpu_mask=b.gpu_mask, mode="seed")
    assert res.backend == "numba"
    assert kvgpu.solve([[10, 1, 1], [20, 2, 1], [30, 1, 2]], 2).backend == "numba"
    pinned = [{"model_size": 10, "req_rate": 1, "slo": 1, "pin": 0}, {"model_size": 20, "req_rate": 2, "slo": 1}]
    assert kvgpu.solve(pinned, 2).backend == "numba"


def test_cuda_probe_launches_a_kernel(monkeypatch):
    """Device, driver and CuPy answer but numba cannot launch: cuda is unusable, with the reason,
    and auto picks a CPU backend."""
    import types

    fake = types.SimpleNamespace(__version__="13.0", arange=lambda n: np.arange(n), cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDeviceProperties=lambda i: {"name": b"H200"})))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.setitem(sys.modules, "kvgpu.cuda_engine", types.ModuleType("kvgpu.cuda_engine"))
    monkeypatch.delenv("KVGPU_DISABLE_GPU", raising=False)
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    from numba import cuda

    monkeypatch.setattr(cuda, "is_available", lambda: True)

    def no_launch():
        raise RuntimeError("CUDA_ERROR_UNSUPPORTED_PTX_VERSION")

    monkeypatch.setattr(backends, "_launch_probe_kernel", no_launch)
    backends.probe.cache_clear()
    try:
        ok, why = backends.probe()["cuda"]
        assert not ok and "cannot compile or launch a CUDA kernel" in why and "UNSUPPORTED_PTX" in why
        assert backends.resolve("auto", 10**9) in ("numba", "numpy")
        monkeypatch.setattr(backends, "_launch_probe_kernel", lambda: None)
        backends.probe.cache_clear()
        assert backends.probe()["cuda"] == (True, "H200, cupy 13.0")
        monkeypatch.setattr(backends, "cuda_device", lambda: ("H200", (9, 0)))
        assert backends.resolve("auto", 10**9) == "cuda"
    finally:
        backends.probe.cache_clear()


def test_performance_warning_is_numba_cudas_own_class_when_installed(monkeypatch):
    import types

    from numba.core.errors import NumbaPerformanceWarning

    import importlib.util

    if importlib.util.find_spec("numba_cuda") is None:  # numba's built-in CUDA target
        assert backends.performance_warning() is NumbaPerformanceWarning

    class CudaPerformanceWarning(Warning):  # numba-cuda's: not a subclass of numba's
        pass

    for name in ("numba.cuda", "numba.cuda.core"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    errors = types.ModuleType("numba.cuda.core.errors")
    errors.NumbaPerformanceWarning = CudaPerformanceWarning
    monkeypatch.setitem(sys.modules, "numba.cuda.core.errors", errors)
    assert backends.performance_warning() is CudaPerformanceWarning


def test_numba_backend_same_answers_whatever_the_slot_order():
    """Real models and GPUs spread among padding slots (the general compaction) or first in
    every row (the sliced fast path): the same placements, seed and search, in the own slots."""
    from kvgpu import numba_engine
    from kvgpu.batch.state import Batch

    rng = np.random.default_rng(12)
    insts = [varied(rng, g_range=(3, 9), per_gpu=(1, 3)) for _ in range(10)] + [adrs_like(rng) for _ in range(10)]
    b = batch_from_instances(insts)
    B, N, G = b.shape
    N2, G2 = N + 3, G + 2  # extra padding, real entries spread over each row in their order
    pm = np.array([np.sort(rng.choice(N2, N, replace=False)) for _ in range(B)])
    pg = np.array([np.sort(rng.choice(G2, G, replace=False)) for _ in range(B)])

    def scatter(x, perm, width):
        out = np.zeros((B, width), x.dtype)
        out[np.arange(B)[:, None], perm[:, :x.shape[1]]] = x
        return out

    s = Batch(scatter(b.sizes, pm, N2), scatter(b.demand, pm, N2), scatter(b.model_mask, pm, N2),
              scatter(b.gpu_mem, pg, G2), scatter(b.gpu_mask, pg, G2))
    assert numba_engine._front_packed(b) is not None and numba_engine._front_packed(s) is None
    rows = np.arange(B)[:, None]
    a1, p1 = numba_engine.solve_seed(b)
    a2, p2 = numba_engine.solve_seed(s)
    back = lambda a: np.where(a >= 0, pg[np.arange(B)[:, None], np.maximum(a, 0)], -1)  # noqa: E731
    assert (a2[rows, pm[:, :N]] == back(a1)).all() and (p2[rows, pm[:, :N]] == p1).all()
    lb = np.zeros(B)
    i1, _, _ = numba_engine.improve(b, a1, p1, lb, 4, 2, 3)
    i2, _, _ = numba_engine.improve(s, a2, p2, lb, 4, 2, 3)
    assert (i2[rows, pm[:, :N]] == back(i1)).all()


def test_backend_names_the_exact_packing_of_what_the_seed_could_not_pack():
    """An instance no seed candidate packs (nine models that fill three 100 GB GPUs to 98%) is
    packed by the exact search, in numba kernels: the result's backend says so, with the numpy
    seed as with the numba one; seed mode without a proof reports the seed's failure and ran
    nothing else."""
    s = np.array([[11.0, 49.0, 47.0, 53.0, 18.0, 14.0, 54.0, 11.0, 38.0]])
    w = np.array([[1.7, 0.84, 1.65, 0.63, 1.44, 1.14, 0.94, 1.35, 0.13]])
    M = np.full((1, 3), 100.0)
    res = kvgpu.solve_batch(s, w, M, backend="numpy", effort=0)
    assert res.status[0] == "ok" and res.backend == "numpy+numba"
    assert kvgpu.solve_batch(s, w, M, backend="numba", effort=0).backend == "numba"
    marked = kvgpu.solve_batch(s, w, M, backend="numpy", mode="seed", infeasible="mark")
    assert marked.status[0] != "ok" and marked.backend == "numpy"

"""``kvgpu.solve_batch`` with CuPy arrays, on the NumPy stand-in of ``tests/cuda/fake_cupy.py``
(device arrays that refuse implicit host copies and count synchronisations)."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import kvgpu
from kvgpu.batch.state import batch_from_instances
from kvgpu.generate import adrs_like, varied


@pytest.fixture
def cp(monkeypatch):
    spec = importlib.util.spec_from_file_location("fake_cupy", Path(__file__).parent / "cuda" / "fake_cupy.py")
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    monkeypatch.setitem(sys.modules, "cupy", fake._module)
    return fake._module


def _batch():
    rng = np.random.default_rng(8)
    return batch_from_instances([adrs_like(rng) for _ in range(4)] + [varied(rng, g_range=(3, 6)) for _ in range(3)])


@pytest.mark.parametrize("mode", ["seed", "search"])
def test_cupy_in_cupy_out_same_answers(cp, mode):
    b = _batch()
    host = kvgpu.solve_batch(b.sizes, b.demand, b.gpu_mem, model_mask=b.model_mask, gpu_mask=b.gpu_mask,
                             backend="numba", mode=mode)
    cp.reset()
    dev = kvgpu.solve_batch(cp.asarray(b.sizes), cp.asarray(b.demand), cp.asarray(b.gpu_mem),
                            model_mask=cp.asarray(b.model_mask), gpu_mask=cp.asarray(b.gpu_mask), backend="numba",
                            mode=mode)
    assert cp.COUNTS["syncs"] == 5  # each input copied to the host once; results go back without a sync
    for name in ("assignment", "kvpr", "max_kvpr", "lower_bound"):
        got = getattr(dev, name)
        assert isinstance(got, cp.ndarray), name
        np.testing.assert_array_equal(cp.asnumpy(got), getattr(host, name), err_msg=name)
        assert got.dtype == getattr(host, name).dtype
    assert isinstance(dev.gap, cp.ndarray) and isinstance(dev.proven_optimal, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(dev.gap), host.gap)
    np.testing.assert_array_equal(cp.asnumpy(dev.proven_optimal), host.proven_optimal)
    assert dev.backend == host.backend == "numba"
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(dev.assignment)


def test_cupy_masks_default_and_numpy_input_unchanged(cp):
    from kvgpu.generate import cluster

    rng = np.random.default_rng(9)
    b = batch_from_instances([cluster(rng, 6, 14, 0.85) for _ in range(4)])  # one shape: no masks needed
    dev = kvgpu.solve_batch(cp.asarray(b.sizes), cp.asarray(b.demand), cp.asarray(b.gpu_mem), backend="numba",
                            mode="seed")
    host = kvgpu.solve_batch(b.sizes, b.demand, b.gpu_mem, backend="numba", mode="seed")
    assert isinstance(host.assignment, np.ndarray) and isinstance(dev.assignment, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(dev.assignment), host.assignment)


def test_mixed_or_foreign_device_arrays_are_refused(cp):
    b = _batch()
    with pytest.raises(TypeError, match="some arrays are on the GPU"):
        kvgpu.solve_batch(cp.asarray(b.sizes), b.demand, b.gpu_mem, backend="numba", mode="seed")
    with pytest.raises(TypeError, match="some arrays are on the GPU"):
        kvgpu.solve_batch(cp.asarray(b.sizes), cp.asarray(b.demand), cp.asarray(b.gpu_mem), model_mask=b.model_mask,
                          backend="numba", mode="seed")

    class Foreign:  # a device array of another library
        __cuda_array_interface__ = {"shape": (1, 1), "typestr": "<f8", "data": (0, False), "version": 3}

    with pytest.raises(TypeError, match="device arrays must be CuPy arrays, got .*Foreign"):
        kvgpu.solve_batch(Foreign(), Foreign(), Foreign(), backend="numba", mode="seed")


def test_the_stand_in_is_strict_and_counts(cp):
    x = cp.asarray(np.arange(6.0).reshape(2, 3))
    cp.reset()
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(x)
    with pytest.raises(TypeError, match="a NumPy array where a device array is expected"):
        x + np.ones(3)
    with pytest.raises(TypeError, match="a NumPy array where a device array is expected"):
        cp.where(x > 1, x, np.zeros((2, 3)))
    y = (x * 2).sum(axis=1)
    assert isinstance(y, cp.ndarray) and isinstance(x.max(), cp.ndarray) and cp.COUNTS["syncs"] == 0
    assert float(x.max()) == 5.0 and bool((x > 4).any()) and y.get().tolist() == [6.0, 24.0]
    assert cp.COUNTS["syncs"] == 3
    cp.nonzero(x > 2)
    x[x > 2]
    assert cp.COUNTS["syncs"] == 5


@pytest.mark.parametrize("mode, launches", [("seed", 2), ("search", 4)])
def test_cuda_backend_on_cupy_arrays_syncs_a_fixed_number_of_times(tmp_path, mode, launches):
    """backend='cuda' on CuPy arrays (the stand-in, kernels under numba's CUDA simulator, in a
    subprocess: bench/gpu_check.py's parity step): CuPy out, placements and figures equal to the
    numba backend's, and per solve_batch call the same host syncs at 2 and 3 instances -- the
    five inputs copied in, the seed's ok flags, the results back as integers and floats -- and
    one launch per stage (seed, figures; search, figures again)."""
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    out = subprocess.run([sys.executable, str(root / "bench" / "gpu_check.py"), mode, "--work", str(tmp_path),
                          "--simulate", "--instances", "3"], capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    got = json.loads((tmp_path / f"{mode}.json").read_text())
    equal, total = (got["P"], got["Q"]) if mode == "seed" else (got["R"], got["S"])
    assert equal == total == 3
    assert [c["instances"] for c in got["counts"]] == [2, 3]
    assert [c["syncs"] for c in got["counts"]] == [8, 8]
    assert [c["launches"] for c in got["counts"]] == [launches, launches]

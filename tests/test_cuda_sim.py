"""Tier 2 of the backend tests: the numba CUDA kernels under numba's CUDA simulator.

The simulator runs in a subprocess (``NUMBA_ENABLE_CUDASIM=1`` must be set before numba is
imported, and must not leak into the other tests).  Tier 3, a real GPU, is ``bench/gpu_check.sh``.
"""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from kvgpu import backends

SIM_CHECK = Path(__file__).parent / "cuda" / "sim_check.py"


def _sim(*args):
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    return subprocess.run([sys.executable, str(SIM_CHECK), *args], capture_output=True, text=True, env=env,
                          timeout=1200)


def test_cuda_kernels_match_the_numpy_engine_under_the_simulator():
    out = _sim("2", "2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "seed pipeline equal on 4 instances (simulator)" in out.stdout


def test_device_kernels_make_the_numba_backends_placements_under_the_simulator():
    """One thread block per instance (3 threads: the strided scans and their reductions) gives
    the numba CPU backend's placements: the seed pipeline on 8 ADRS-shaped instances, the search
    from a first-fit packing on 8 (every one of them moved); and the cuda engine's ``solve_seed``
    / ``improve`` equal the numba engine's."""
    out = _sim("--kernels", "8", "8", "3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("kernel parity: seed 8/8, search 8/8 (search moved 8; 3 threads a block); "
            "cuda_engine equals numba_engine: True") in out.stdout, out.stdout


def test_simulator_is_never_taken_for_a_device():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    out = subprocess.run([sys.executable, "-m", "kvgpu.cli", "info"], capture_output=True, text=True, env=env)
    assert "NUMBA_ENABLE_CUDASIM=1" in out.stdout and "auto -> numba" in out.stdout


@pytest.mark.parametrize("broken", ["no_device", "raises"])
def test_cuda_probe_is_exception_safe(monkeypatch, broken):
    """CuPy importable but no driver: the probe says why, ``auto`` picks a CPU backend, and an
    explicit ``cuda`` request raises a clear error."""
    def count():
        if broken == "raises":
            raise RuntimeError("cudaErrorInsufficientDriver")
        return 0

    fake = types.SimpleNamespace(__version__="13.0", cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=count)))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    monkeypatch.delenv("KVGPU_DISABLE_GPU", raising=False)
    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    backends.probe.cache_clear()
    try:
        ok, why = backends.probe()["cuda"]
        assert not ok and ("no CUDA device" in why or "cudaErrorInsufficientDriver" in why)
        assert backends.resolve("auto") in ("numba", "numpy")
        with pytest.raises(backends.BackendUnavailable, match="backend 'cuda' is not available"):
            backends.resolve("cuda")
    finally:
        backends.probe.cache_clear()


@pytest.mark.skipif(not backends.probe()["cuda"][0], reason="no usable CUDA device here: "
                    + backends.probe()["cuda"][1])
def test_cuda_backend_on_a_device_equals_numpy():
    import numpy as np

    import kvgpu
    from kvgpu.generate import adrs_like

    rng = np.random.default_rng(5)
    insts = [adrs_like(rng) for _ in range(200)]
    from conftest import padded
    a = kvgpu.solve_batch(**padded(insts), backend="cuda", mode="seed")
    b = kvgpu.solve_batch(**padded(insts), backend="numpy", mode="seed")
    assert (a.assignment == b.assignment).all() and a.backend == "cuda"

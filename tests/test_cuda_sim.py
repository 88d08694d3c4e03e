"""Tier 2 of the backend tests: the cuda backend under numba's CUDA simulator.

The simulator runs in subprocesses (``NUMBA_ENABLE_CUDASIM=1`` must be set before numba is
imported, and must not leak into the other tests): the CUDA tier, ``tests/cuda/test_*.py`` (the
kernels against the numba backend, one check a test, barrier call sites and garbage-filled
working memory checked on every launch: ``tests/cuda/tier.py``), is a pytest run of its
own; ``bash bench/gpu_check.sh --simulate`` checks ``solve_batch`` on CuPy arrays of the NumPy
stand-in (``tests/cuda/fake_cupy.py``) against the numba backend.  Tier 3, a real GPU, is
``bash bench/gpu_check.sh``.
"""
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from kvgpu import backends

ROOT = Path(__file__).resolve().parent.parent
LAST = re.compile(r"gpu-check: seed parity (\d+)/(\d+), search parity (\d+)/(\d+), host syncs per solve_batch call "
                  r"(\d+), kernel launches per call (\d+)")
#: Tests of the CUDA tier (``tests/cuda/test_sim_kernels.py``): all must run under the simulator.
TIER_TESTS = 17


def test_cuda_tier_passes_under_the_simulator():
    """Every test of ``tests/cuda`` passes under the simulator, none skipped: the seed and search
    kernels, ``refine_peak`` and ``polish_second`` at 1, 4 and 32 threads a block equal the
    numba backend, whole solves equal it, the barrier checker names a skipped barrier and
    finds none in the kernels.  The sub-run's own report is the failure message."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": str(ROOT)}
    env.pop("KVGPU_CUDA_TIER", None)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/cuda"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=3000)
    report = out.stdout[-6000:] + out.stderr[-3000:]
    assert out.returncode == 0, report
    assert re.search(rf"\b{TIER_TESTS} passed\b", out.stdout) and "skipped" not in out.stdout, report


def test_gpu_check_simulated_end_to_end(tmp_path):
    """The simulated check on 2 instances (the CUDA tier left to the test above): every step
    ok, the cuda path's placements equal the numba backend's, syncs and launches counted, and
    the summary line last, in its format."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the script sets it for its own steps
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--simulate", "--instances", "2",
                          "--skip-tier"], capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    text = out.stdout
    assert out.returncode == 0, text[-3000:] + out.stderr[-3000:]
    assert "FAILED" not in text and "TIMEOUT" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    m = LAST.fullmatch(last)
    assert m, last
    P, Q, R, S, H, L = map(int, m.groups())
    assert (P, Q) == (2, 2)
    assert R == S  # 0/0 until the cuda engine has improve(), then every instance equal
    assert H > 0 and L > 0  # the stand-in saw the path's syncs and the simulator its launches
    assert (tmp_path / "gpu_check_simulated.txt").read_text().strip().splitlines()[-1] == last


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

"""Tier 2 of the backend tests: the cuda backend under numba's CUDA simulator.

The simulator runs in a subprocess (``NUMBA_ENABLE_CUDASIM=1`` must be set before numba is
imported, and must not leak into the other tests): ``bash bench/gpu_check.sh --simulate`` on a
tiny setting -- the kernels against the array engine (``tests/cuda/sim_check.py``), and
``solve_batch`` on CuPy arrays of the NumPy stand-in (``tests/cuda/fake_cupy.py``) against the
numba backend.  Tier 3, a real GPU, is ``bash bench/gpu_check.sh``.
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
SIM_CHECK = ROOT / "tests" / "cuda" / "sim_check.py"
LAST = re.compile(r"gpu-check: seed parity (\d+)/(\d+), search parity (\d+)/(\d+), host syncs per solve_batch call "
                  r"(\d+), kernel launches per call (\d+)")


def _sim(*args):
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    return subprocess.run([sys.executable, str(SIM_CHECK), *args], capture_output=True, text=True, env=env,
                          timeout=1200)


def test_gpu_check_simulated_end_to_end(tmp_path):
    """The simulated check on 2 instances: every step ok, the cuda path's placements equal the
    numba backend's, syncs and launches counted, and the summary line last, in its format."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    env.pop("NUMBA_ENABLE_CUDASIM", None)  # the script sets it for its own steps
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--simulate", "--instances", "2"],
                         capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    text = out.stdout
    assert out.returncode == 0, text[-3000:] + out.stderr[-3000:]
    assert "FAILED" not in text and "TIMEOUT" not in text, text[-3000:]
    assert "seed pipeline equal on 4 instances (simulator)" in text  # kernels vs array engine
    last = text.strip().splitlines()[-1]
    m = LAST.fullmatch(last)
    assert m, last
    P, Q, R, S, H, L = map(int, m.groups())
    assert (P, Q) == (2, 2)
    assert R == S  # 0/0 until the cuda engine has improve(), then every instance equal
    assert H > 0 and L > 0  # the stand-in saw the path's syncs and the simulator its launches
    assert (tmp_path / "gpu_check_simulated.txt").read_text().strip().splitlines()[-1] == last


def test_device_kernels_make_the_numba_backends_placements_under_the_simulator():
    """One thread block per instance (3 threads: the strided scans and their reductions) gives
    the numba CPU backend's placements: the seed pipeline on 8 ADRS-shaped instances, the search
    from a first-fit packing on 8 (every one of them moved); the cuda engine's ``solve_seed``
    / ``improve`` equal the numba engine's; and whole solves on the device (figures and lower
    bounds from the finish kernel) equal the numba backend's bit for bit, statuses too, in seed
    mode, search mode and search with a proof, on a permuted-padding batch with an instance the
    seed cannot pack and an infeasible one."""
    out = _sim("--kernels", "8", "8", "3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("kernel parity: seed 8/8, search 8/8 (search moved 8; 3 threads a block); "
            "cuda_engine equals numba_engine: True") in out.stdout, out.stdout
    assert ("solve_batch parity (assignment, kvpr, max_kvpr, lower_bound, status; cuda vs numba): seed True, "
            "search True, search+proof True") in out.stdout, out.stdout
    assert "overflow encountered" not in out.stderr, out.stderr[-3000:]


def test_refine_and_polish_by_blocks_of_1_to_4_threads_equal_the_cpu_under_the_simulator():
    """refine_peak's donations and polish_second's rows, evaluated by the threads of a block and
    walked by thread 0, make the CPU's placements for 1, 2, 3 and 4 threads, from first-fit
    packings both steps improve; the simulated search warns of no 64-bit overflow."""
    out = _sim("--steps", "6", "1", "2", "3", "4")
    assert out.returncode == 0, out.stderr[-3000:]
    for nt in (1, 2, 3, 4):
        assert f"step parity, {nt} threads a block: refine_peak 6/6, polish_second 6/6" in out.stdout, out.stdout
    moved = re.search(r"steps moved: refine_peak (\d+), polish_second (\d+)", out.stdout)
    assert moved and int(moved[1]) >= 3 and int(moved[2]) >= 3, out.stdout
    assert "overflow encountered" not in out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize("nt, memory", [(1, "shared"), (2, "global"), (4, "shared")])
def test_seed_and_search_kernels_are_the_same_for_any_threads_a_block(nt, memory):
    """The whole seed pipeline and search by blocks of 1, 2 and 4 threads (3: above) give the
    numba CPU backend's placements, with the blocks' working memory in shared memory or in
    global rows, without overflow warnings from the search's hashes."""
    out = _sim("--kernels", "3", "3", str(nt), *(["--global"] if memory == "global" else []))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"kernel parity: seed 3/3, search 3/3 (search moved 3; {nt} threads a block)" in out.stdout, out.stdout
    assert f"working memory: {memory}" in out.stdout, out.stdout
    assert "overflow encountered" not in out.stderr, out.stderr[-3000:]


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

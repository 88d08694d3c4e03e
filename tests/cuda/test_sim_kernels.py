"""The device kernels of the ``cuda`` backend (:mod:`kvgpu.kernels.device`) against the numba CPU
backend, one check a test, under numba's CUDA simulator (see ``tier.py``: collected only
there or on a device; barrier call sites and garbage-filled working memory checked on every
simulated launch).  Batches are small: the simulator runs each GPU thread as a Python thread."""

import os

import numpy as np
import pytest
from numba import cuda, float64

import parity  # tests/cuda/parity.py (tests/conftest.py puts this folder on the path)

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

#: Threads a block of the parametrised checks: one thread (every strided scan is serial), a
#: few, a warp.
THREADS = (1, 4, 32)


@pytest.fixture
def memory(request, monkeypatch):
    """``shared`` (the blocks' working memory in shared memory where it fits, the default) or
    ``global`` (every block's in its global rows)."""
    from kvgpu.kernels import device

    if request.param == "global":
        monkeypatch.setattr(device, "SHARED_BYTES", 0)
    return request.param


@pytest.mark.parametrize("nt", THREADS)
def test_seed_kernel_places_as_the_numba_backend(nt):
    """The whole seed pipeline, one block of ``nt`` threads an instance, on 3 ADRS-shaped
    instances: the numba CPU kernel's placements, instance for instance (the seed keeps its
    candidates in global rows, garbage-filled)."""
    assert parity.seed_parity(3, nt) == 3


@pytest.mark.parametrize("nt, memory", [(1, "shared"), (4, "shared"), (4, "global"), (32, "shared")],
                         indirect=["memory"])
def test_search_kernel_places_as_the_numba_backend(nt, memory):
    """Two search rounds from first-fit packings of 3 ADRS-shaped instances (every one moves),
    one block of ``nt`` threads an instance, working memory in shared memory or global rows:
    the numba CPU search's placements."""
    equal, moved = parity.search_parity(3, nt)
    assert moved == 3
    assert equal == 3


@pytest.mark.parametrize("nt", THREADS)
def test_refine_peak_and_polish_second_by_a_block_equal_the_cpu(nt):
    """``refine_peak``'s donations and ``polish_second``'s rows, evaluated by the threads of a
    block and walked by thread 0, from first-fit packings of 6 instances that both CPU steps
    improve (at least 3 each): the CPU's placements."""
    res, moved = parity.step_parity(6, [nt])
    assert moved[0] >= 3 and moved[1] >= 3
    assert res == [(nt, 6, 6)]


def test_cuda_engine_equals_numba_engine():
    """:mod:`kvgpu.cuda_engine`'s ``solve_seed`` / ``improve`` equal :mod:`kvgpu.numba_engine`'s
    through their common contract (batch slots, padding)."""
    assert parity.engine_parity()


@pytest.mark.parametrize("kw", [dict(mode="seed"), dict(mode="search", effort=3),
                                dict(mode="search", effort=2, exact=True, exact_work=20_000)],
                         ids=["seed", "search", "search+proof"])
def test_solve_batch_on_the_device_equals_numba(kw):
    """Whole solves with backend 'cuda' (figures and lower bounds from the finish kernel) equal
    backend 'numba' bit for bit -- assignment, kvpr, max_kvpr, lower_bound, statuses -- on a
    permuted-padding batch with an instance the seed cannot pack and an infeasible one."""
    assert parity.solve_parity(**kw)


pytestmark_sim = pytest.mark.skipif(not SIMULATED, reason="checks the simulator's own instrumentation")


def _skipping_kernel():
    """A kernel whose thread 0 passes one barrier call site more than the others do."""
    from kvgpu.kernels import jit

    bar = jit.device(jit.barrier)

    @cuda.jit
    def kern(out):
        t = cuda.threadIdx.x
        if t == 0:
            bar()  # only thread 0: a device deadlocks or pairs the wrong barriers here
        bar()
        out[t] = t
    return kern


@pytestmark_sim
def test_barrier_checker_names_a_call_site_one_thread_skips():
    """The simulator completes the kernel (it releases a barrier once every running thread waits
    at any one), but the checker names the call site that thread 0 alone reached."""
    from kvgpu.kernels import cuda_prims

    out = np.zeros(4, np.int64)
    _skipping_kernel()[1, 4](out)
    assert out.tolist() == [0, 1, 2, 3]  # the simulator saw nothing wrong
    rep = cuda_prims.barrier_report()  # (resets: the autouse check after this test sees none)
    assert len(rep["mismatches"]) == 1
    fname, line, counts = rep["mismatches"][0]
    assert fname == __file__ and counts == {0: 1, 1: 0, 2: 0, 3: 0}


@pytestmark_sim
def test_barrier_checker_counts_every_pass_of_the_device_kernels():
    """A seed launch of 2 instances at 4 threads: barrier passes counted at several call sites
    of the cores, every thread of each block at each of them equally often."""
    from kvgpu.kernels import cuda_prims

    assert parity.seed_parity(2, 4) == 2
    rep = cuda_prims.barrier_report(reset=False)
    assert rep["mismatches"] == []
    assert rep["blocks"] == 2 and rep["sites"] >= 5 and rep["passes"] >= 4 * rep["sites"]


@pytestmark_sim
def test_working_memory_starts_as_garbage():
    """The global working rows and the blocks' dynamic shared memory start with random bytes,
    not zeros (``tier.py``), so that reading memory before writing it shows up."""
    from kvgpu.kernels import device

    fw, iw = device.work_arrays(np, 2, (64, 64))
    assert np.isnan(fw).any() or (np.abs(fw) > 1e100).any()
    assert (iw < 0).any() and not (iw == 0).any()

    @cuda.jit
    def peek(out):
        sh = cuda.shared.array(0, float64)
        if cuda.threadIdx.x == 0:
            for i in range(out.shape[0]):
                out[i] = sh[i]

    out = np.zeros(16)
    peek[1, 1, 0, 16 * 8](out)
    assert (out != 0).all()

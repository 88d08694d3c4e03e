"""The CUDA tier's pytest plugin: these tests run the device kernels, so they are collected only
where numba's CUDA target is set up for them before numba is imported -- under the CUDA
simulator (``NUMBA_ENABLE_CUDASIM=1``: ``tests/test_cuda_sim.py`` runs this folder so in a
subprocess, and ``bash bench/gpu_check.sh --simulate``) or on a device
(``KVGPU_CUDA_TIER=device``, set by ``bash bench/gpu_check.sh``).  Elsewhere the main test run
skips the folder.  ``tests/conftest.py`` loads this module as a plugin in those runs: a second
``conftest.py`` here would be imported under the same module name as the root one and hide it
from the tests that import its helpers.

Under the simulator every launch is checked beyond its results:

* **barriers**: every barrier pass is counted by call site and thread
  (:func:`kvgpu.kernels.cuda_prims.barrier_report`); after each test, every call site must have
  been reached the same number of times by every thread of each block (the simulator itself
  releases a barrier once the threads still running wait at *any* barrier).
* **garbage-filled working memory**: the blocks' dynamic shared memory and the global working
  rows (:func:`kvgpu.kernels.device.work_arrays`) start filled with random bytes (NaNs, huge
  and negative numbers), not the simulator's zeros, so a kernel that reads working memory
  before writing it gives other placements than the CPU.
"""

import os
import sys

import numpy as np
import pytest

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

#: Seed of the garbage that working memory starts with.
GARBAGE_SEED = 20


def garbage(nbytes: int, rng=np.random.default_rng(GARBAGE_SEED)) -> np.ndarray:
    """``nbytes`` random bytes (int8): as float64 they are NaNs, infinities, huge and tiny
    numbers of both signs; as int64 huge and negative ids."""
    return rng.integers(-128, 128, nbytes, dtype=np.int8)


def _fill_working_memory():
    """Start every simulated block's dynamic shared memory, and every global working row, with
    :func:`garbage` (module doc)."""
    from numba.cuda.simulator import kernelapi

    from kvgpu.kernels import device

    shared_init = kernelapi.FakeCUDAShared.__init__

    def init(self, dynshared_size):
        shared_init(self, dynshared_size)
        self._dynshared[:] = garbage(dynshared_size)

    kernelapi.FakeCUDAShared.__init__ = init
    work_arrays = device.work_arrays

    def filled(xp, B, sizes):
        fw, iw = work_arrays(xp, B, sizes)
        for x in (fw, iw):
            x.view(np.int8).reshape(-1)[:] = garbage(x.nbytes)
        return fw, iw

    device.work_arrays = filled


if SIMULATED:
    # the simulator runs every thread of a block as a Python thread and polls them: a short
    # switch interval makes its barriers fast
    sys.setswitchinterval(1e-4)
    _fill_working_memory()

    @pytest.fixture(autouse=True)
    def barriers_match():
        """After each test: no barrier call site reached a different number of times by the
        threads of one block (:func:`kvgpu.kernels.cuda_prims.barrier_report`)."""
        from kvgpu.kernels import cuda_prims

        cuda_prims.barrier_report()  # reset
        yield
        rep = cuda_prims.barrier_report()
        assert not rep["mismatches"], f"barrier call sites reached unequally by a block's threads: " \
                                      f"{rep['mismatches'][:3]}"

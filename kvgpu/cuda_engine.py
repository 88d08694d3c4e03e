"""The ``cuda`` backend: the batch engine on CuPy arrays, its hot steps in numba CUDA kernels.

The batch is copied to the device once; the whole seed pipeline then runs there -- the same
array code as the NumPy engine (:mod:`kvgpu.batch`, written against ``xp``), with the transfer
scans and the packing choice handed to the kernels of :mod:`kvgpu.kernels.gpu` -- and only the
placements come back.  Importing this module imports CuPy; :mod:`kvgpu.backends` decides
whether it can run.
"""

from __future__ import annotations

import cupy as cp

from kvgpu.batch.pipeline import solve_seed as array_seed
from kvgpu.batch.state import Batch
from kvgpu.kernels import gpu


def to_device(batch: Batch) -> Batch:
    return Batch(*(cp.asarray(x) for x in (batch.sizes, batch.demand, batch.model_mask, batch.gpu_mem,
                                            batch.gpu_mask)))


def solve_seed(batch: Batch):
    """Same contract as :func:`kvgpu.batch.pipeline.solve_seed`; NumPy arrays in and out."""
    assign, pos = array_seed(to_device(batch), gpu.engine(cp))
    return cp.asnumpy(assign), cp.asnumpy(pos)

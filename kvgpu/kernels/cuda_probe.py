"""The tiny numba CUDA kernel :mod:`kvgpu.backends` compiles and launches before it calls the
``cuda`` backend usable: a device, a driver and CuPy can all answer while numba still cannot
compile for the device (NVVM missing, a PTX version the driver does not take, a numba /
numba-cuda pair that does not fit) -- and that must show up in the probe, not on a first solve.
Importing this module needs numba's CUDA target, nothing else."""

from __future__ import annotations

import numpy as np
from numba import cuda

#: What :func:`run` returns on a working device.
EXPECTED = [0, 2, 4, 6, 8, 10, 12, 14]


@cuda.jit
def fill(out):
    """``out[i] = 2 * i``, one thread per element."""
    i = cuda.grid(1)
    if i < out.shape[0]:
        out[i] = 2 * i


def run() -> list[int]:
    """Compile :func:`fill`, launch it on a device array of 8 int64 and copy the answer back."""
    out = cuda.device_array(len(EXPECTED), dtype=np.int64)
    fill[1, 32](out)
    return out.copy_to_host().tolist()

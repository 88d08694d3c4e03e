"""The CUDA side of the primitives whose two targets differ (:mod:`kvgpu.kernels.jit`).

Imported only when a device function is built; ``cuda`` is a module global here so that the
CUDA simulator, which swaps that global for its own per-kernel module, runs them too.
"""

from numba import cuda
from numba.core import config

if not config.ENABLE_CUDASIM:
    from numba.cuda import libdevice


def barrier():
    """Every thread of the block waits for the others."""
    cuda.syncthreads()


def fmul(a, b):
    """``a * b`` rounded on its own: ``__nv_dmul_rn`` is never contracted into an FMA."""
    return libdevice.dmul_rn(a, b)


#: The simulator runs Python, where ``a * b`` already rounds once (and has no libdevice).
FMUL = None if config.ENABLE_CUDASIM else fmul

"""The CUDA side of the primitives whose two targets differ (:mod:`kvgpu.kernels.jit`).

Imported only when a device function is built.
"""

from numba import cuda
from numba.core import config

if not config.ENABLE_CUDASIM:
    from numba.cuda import libdevice


if config.ENABLE_CUDASIM:
    import threading

    def barrier():
        """Every thread of the block waits for the others.  The simulator runs a block's threads as
        Python threads and swaps a device function's ``cuda`` global for its own module during
        each call -- which races when threads call the same function at once -- so this calls
        the simulated thread's barrier itself, as the simulator's ``cuda.syncthreads`` does."""
        threading.current_thread().syncthreads()
else:
    def barrier():
        """Every thread of the block waits for the others."""
        cuda.syncthreads()


def fmul(a, b):
    """``a * b`` rounded on its own: ``__nv_dmul_rn`` is never contracted into an FMA."""
    return libdevice.dmul_rn(a, b)


#: The simulator runs Python, where ``a * b`` already rounds once (and has no libdevice).
FMUL = None if config.ENABLE_CUDASIM else fmul


def wrap_mul(a, b):
    """The ``uint64`` product: wraps modulo ``2^64`` on a device."""
    return a * b


def wrap_add(a, b):
    """The ``uint64`` sum: wraps modulo ``2^64`` on a device."""
    return a + b


#: The simulator runs the Python forms of :mod:`kvgpu.kernels.u64` (exact integers, no warning).
WRAP_MUL = None if config.ENABLE_CUDASIM else wrap_mul
WRAP_ADD = None if config.ENABLE_CUDASIM else wrap_add

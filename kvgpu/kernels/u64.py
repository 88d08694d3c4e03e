"""Unsigned 64-bit arithmetic that wraps modulo ``2^64`` silently, with the same values on every
target: the search's random stream (:func:`kvgpu.kernels.search.rand_uniform`) and tie keys
(:func:`kvgpu.kernels.search._tie_key`) are built from it.

Compiled code -- numba on the CPU, a CUDA device -- wraps a ``uint64`` product or sum as it
is, silently.  NumPy scalars wrap too, but warn ("overflow encountered in scalar multiply"),
and NumPy scalars are what a kernel computes with where it runs as Python: under numba's CUDA
simulator (``NUMBA_ENABLE_CUDASIM=1``) or with ``NUMBA_DISABLE_JIT=1``.  The functions here
are that Python form, computed on exact Python integers and reduced modulo ``2^64``: the value
the machine's wrapping operation gives, without a warning.  Compiled kernels call them as that
machine operation (:mod:`kvgpu.kernels.jit` registers the CPU overloads and the CUDA device
versions), so the compiled code is what it was.
"""

from __future__ import annotations

import numpy as np

#: ``2^64 - 1``: the low 64 bits.
MASK = (1 << 64) - 1


def wrap_mul(a, b):
    """``a * b`` modulo ``2^64`` (``uint64`` in, ``uint64`` out)."""
    return np.uint64((int(a) * int(b)) & MASK)


def wrap_add(a, b):
    """``a + b`` modulo ``2^64`` (``uint64`` in, ``uint64`` out)."""
    return np.uint64((int(a) + int(b)) & MASK)

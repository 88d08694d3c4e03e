"""Where the batch engine hands its two hot steps to compiled kernels.

``transfers``: the move / swap / donation scans of a local-search step
(:meth:`kvgpu.batch.local.LaneState.eval_transfers`); ``choose``: the per-step GPU choice of the
candidate packs (:func:`kvgpu.batch.pack._choose`).  Both default to the engine's own array
expressions; the ``cuda`` backend -- and the tests, under the CUDA simulator -- install the numba
CUDA kernels of :mod:`kvgpu.kernels.gpu` with :func:`use`, which take the same arguments and
return the same values.
"""

from __future__ import annotations

import contextlib

KERNELS: dict = {"transfers": None, "choose": None}


@contextlib.contextmanager
def use(**fns):
    """Within the block, the named steps call the given functions (``None``: the array code)."""
    unknown = set(fns) - set(KERNELS)
    if unknown:
        raise ValueError(f"unknown batch-engine steps {sorted(unknown)}; known: {sorted(KERNELS)}")
    prev = dict(KERNELS)
    KERNELS.update(fns)
    try:
        yield
    finally:
        KERNELS.update(prev)

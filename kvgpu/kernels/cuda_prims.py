"""The CUDA side of the primitives whose two targets differ (:mod:`kvgpu.kernels.jit`).

Imported only when a device function is built.
"""

from numba import cuda
from numba.core import config

if not config.ENABLE_CUDASIM:
    from numba.cuda import libdevice


if config.ENABLE_CUDASIM:
    import sys
    import threading
    from collections import Counter

    #: Under the simulator, every barrier pass: ``(block run, file, line, thread) -> passes``
    #: (:func:`barrier_report`).  A dict object that :func:`barrier` mutates: the device build
    #: of a kernel copies the globals it names (:func:`kvgpu.kernels.jit.device`).
    _PASSES = Counter()

    def barrier():
        """Every thread of the block waits for the others.  The simulator runs a block's threads as
        Python threads and swaps a device function's ``cuda`` global for its own module during
        each call -- which races when threads call the same function at once -- so this calls
        the simulated thread's barrier itself, as the simulator's ``cuda.syncthreads`` does.

        The simulator releases a barrier once every thread still *running* waits at one --
        whichever -- so a thread that left early or waits at another call site goes unnoticed
        there; each pass is counted by call site (:func:`barrier_report` compares the threads)."""
        t = threading.current_thread()
        f = sys._getframe(1)
        _PASSES[(t._manager, f.f_code.co_filename, f.f_lineno, t.thread_id)] += 1  # keys differ by thread
        t.syncthreads()

    def barrier_report(reset: bool = True) -> dict:
        """The barrier passes since the last reset, checked: ``{"passes": total, "sites": call
        sites reached, "blocks": block runs, "mismatches": [(file, line, {thread: passes})]}``
        -- a mismatch is a call site that the threads of one block run reached a different
        number of times (a thread of the block that never reached it counts 0), which on a
        device deadlocks or pairs the wrong barriers."""
        by_site: dict = {}
        for (mgr, fname, line, tid), n in list(_PASSES.items()):
            by_site.setdefault((mgr, fname, line), {})[tid] = n
        mismatches = []
        for (mgr, fname, line), counts in by_site.items():
            nt = 1
            for d in mgr._block_dim:
                nt *= d
            full = {tid: counts.get(tid, 0) for tid in range(nt)}
            if len(set(full.values())) > 1:
                mismatches.append((fname, line, full))
        out = {"passes": sum(_PASSES.values()), "sites": len({k[1:] for k in by_site}),
               "blocks": len({k[0] for k in by_site}), "mismatches": mismatches}
        if reset:
            _PASSES.clear()
        return out
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

"""Stable argsort for the kernels: one compiled merge sort, cached on disk like every kernel.

``np.argsort`` / ``np.sort`` inside a numba kernel are compiled again in every process that
compiles a kernel using them (numba caches kvgpu's kernels, not its own NumPy overloads):
about 4 s of each first run per process.  This merge sort is a kvgpu kernel, so it is
compiled once and loaded from the cache by every other process; it is also plain scalar code
with its working memory passed in (:func:`argsort_into`), as a CUDA device function needs.

Order: ascending, and stable -- equal keys keep their index order -- exactly as
``np.argsort(key, kind="stable")`` for keys without NaN.
"""

from __future__ import annotations

import numpy as np

from kvgpu.kernels.jit import kernel

#: Runs this short are insertion-sorted before merging (fewer passes over short lists).
RUN = 16


@kernel
def insertion_sort(x):
    """Sort ``x`` (n,) ascending in place (values, not indices): for short rows, where it beats
    a merge sort; equal values keep their order."""
    for i in range(1, x.shape[0]):
        v = x[i]
        j = i
        while j > 0 and x[j - 1] > v:
            x[j] = x[j - 1]
            j -= 1
        x[j] = v


@kernel
def argsort_into(key, out, tmp):
    """``out`` (n,) int64 = the stable ascending argsort of ``key`` (n,); ``tmp`` (n,) int64 is
    working memory.  Insertion sort on runs of :data:`RUN`, then bottom-up merges."""
    n = key.shape[0]
    for i in range(n):
        out[i] = i
    for lo in range(0, n, RUN):
        hi = min(lo + RUN, n)
        for a in range(lo + 1, hi):
            x = out[a]
            b = a
            while b > lo and key[out[b - 1]] > key[x]:  # strict: equal keys keep their order
                out[b] = out[b - 1]
                b -= 1
            out[b] = x
    width = RUN
    in_tmp = False
    while width < n:
        src, dst = (tmp, out) if in_tmp else (out, tmp)
        for lo in range(0, n, 2 * width):
            mid = min(lo + width, n)
            hi = min(lo + 2 * width, n)
            i, j = lo, mid
            for k in range(lo, hi):
                if j >= hi or (i < mid and not key[src[j]] < key[src[i]]):  # ties: the left run first
                    dst[k] = src[i]
                    i += 1
                else:
                    dst[k] = src[j]
                    j += 1
        in_tmp = not in_tmp
        width *= 2
    if in_tmp:
        for k in range(n):  # a loop, not a slice assignment: the CUDA target compiles this too
            out[k] = tmp[k]


@kernel
def argsort_stable(key):
    """(n,) int64: the stable ascending argsort of ``key`` (n,) (allocates; see module doc)."""
    n = key.shape[0]
    out = np.empty(n, np.int64)
    argsort_into(key, out, np.empty(n, np.int64))
    return out


@kernel
def sorted_desc(x):
    """(n,) float64: the values of ``x`` (n,), largest first."""
    idx = argsort_stable(x)
    n = x.shape[0]
    out = np.empty(n)
    for k in range(n):
        out[k] = x[idx[n - 1 - k]]
    return out

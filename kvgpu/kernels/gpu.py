"""numba CUDA kernels of the batch engine (the ``cuda`` backend).

* :func:`eval_transfers` evaluates every candidate transfer of a local-search step -- moves
  (models of the worst GPU x all GPUs), swaps (x all other models) and donations -- one CUDA
  thread per candidate.  Each thread calls the same scalar functions as the numba CPU kernels
  (:mod:`kvgpu.kernels.deltas` and the O(1) "max over the other GPUs" of
  :func:`kvgpu.kernels.cpu.max_excluding` from the top-3 KVPRs, compiled as device functions), so it performs
  the same floating-point operations as the NumPy/CuPy evaluator and returns identical values.
* :func:`choose` makes the per-step GPU choice of the candidate packs, one thread per lane,
  with :func:`kvgpu.kernels.cpu.choose_gpu` -- the source the CPU packs run, compiled again for
  the device (:func:`kvgpu.kernels.jit.device`).

Arrays stay where they are: CuPy arrays on the device (numba reads them through
``__cuda_array_interface__``, no host round trip), NumPy arrays under the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``), which is how the tests run these kernels on machines without a GPU.
Importing this module needs numba's CUDA target (``numba.cuda``), nothing else.
"""

from __future__ import annotations

import warnings

import numpy as np
from numba import cuda

from kvgpu.batch.array_engine import ArrayEngine
from kvgpu.kernels import cpu
from kvgpu.kernels.jit import device
from kvgpu.kernels.params import MOST_FREE

# the CPU kernels' own source, compiled for the device (kvgpu.kernels.jit.device)
safe_div = device(cpu.safe_div)
transfer_loads = device(cpu.transfer_loads)
fits = device(cpu.fits)
transfer_new_max = device(cpu.transfer_new_max)
max_excluding = device(cpu.max_excluding)
choose_gpu = device(cpu.choose_gpu)

#: Threads per block of the element-wise kernels.
THREADS = 128


@cuda.jit
def _eval_kernel(S, W, M, sizes, demand, lanes, t3v, t3i, row, src, dst, a, b, new, ok):
    """Element ``k``: transfer model ``a[k]`` GPU ``src[k]`` -> ``dst[k]`` (and model ``b[k]``
    back when ``b[k] >= 0``) in lane ``lanes[row[k]]``; writes the new global max KVPR and the
    memory fit.  ``S``, ``W`` (L, G); ``M`` (L, G); ``sizes``, ``demand`` (L, N); ``t3v``,
    ``t3i`` (L', 3) top-3 KVPR values / GPU ids of the lanes ``lanes`` (L',)."""
    k = cuda.grid(1)
    if k >= new.shape[0]:
        return
    r = row[k]
    ln = lanes[r]
    s, d, i, j = src[k], dst[k], a[k], b[k]
    s_in = sizes[ln, j] if j >= 0 else 0.0
    w_in = demand[ln, j] if j >= 0 else 0.0
    Ss, Ws, Sd, Wd = transfer_loads(S[ln, s], W[ln, s], S[ln, d], W[ln, d], sizes[ln, i], demand[ln, i], s_in, w_in)
    t3 = (t3v[r, 0], t3i[r, 0], t3v[r, 1], t3i[r, 1], t3v[r, 2], t3i[r, 2])
    ok[k] = fits(Ss, M[ln, s]) and fits(Sd, M[ln, d])
    new[k] = transfer_new_max(safe_div(Ws, M[ln, s] - Ss), safe_div(Wd, M[ln, d] - Sd), max_excluding(t3, s, d))


def eval_transfers(xp, S, W, M, sizes, demand, lanes, t3, src, dst, a, b):
    """Same contract as :meth:`kvgpu.batch.local.LaneState.eval_transfers`: ``src``, ``dst``,
    ``a``, ``b`` are GPU / model ids broadcastable to one shape (L', ...) over the lanes
    ``lanes`` (L',); returns ``(new max KVPR, fits)`` of that shape."""
    vals, ids = t3
    nd = max(x.ndim for x in (src, dst, a, b))
    row = xp.arange(lanes.shape[0]).reshape((-1,) + (1,) * (nd - 1))
    shape = np.broadcast_shapes(row.shape, src.shape, dst.shape, a.shape, b.shape)
    flat = [xp.ascontiguousarray(xp.broadcast_to(x, shape)).ravel().astype(xp.int64) for x in (row, src, dst, a, b)]
    E = flat[0].shape[0]
    new = xp.empty(E)
    ok = xp.empty(E, dtype=xp.uint8)
    if E:
        with warnings.catch_warnings():
            # small batches leave most of a GPU idle; numba says so on every launch
            warnings.simplefilter("ignore", _performance_warning())
            _eval_kernel[(E + THREADS - 1) // THREADS, THREADS](
                S, W, M, sizes, demand, xp.ascontiguousarray(lanes.astype(xp.int64)),
                xp.ascontiguousarray(vals), xp.ascontiguousarray(ids.astype(xp.int64)), *flat, new, ok)
    return new.reshape(shape), ok.astype(bool).reshape(shape)


@cuda.jit
def _choose_kernel(St, Wt, loadt, kvt, Mt, M_total, n_gpus, T, policy, nmf, k, s, w, out_g, out_any):
    """Lane ``l``: the GPU for its next model ``(s[l], w[l])``.  Per-GPU state is laid out
    (G, L) as in :class:`kvgpu.batch.pack._Lanes`; a lane's real GPUs come first (compacted
    batches), so its column up to ``n_gpus[l]`` is its cluster."""
    l = cuda.grid(1)
    if l >= out_g.shape[0]:
        return
    G = n_gpus[l]
    pol = MOST_FREE if k < nmf[l] else policy[l]
    key = cuda.local.array(5, np.float64)
    best = cuda.local.array(5, np.float64)
    g = choose_gpu(St[:G, l], Wt[:G, l], loadt[:G, l], kvt[:G, l], Mt[:G, l], M_total[l], s[l], w[l], T[l], pol,
                   policy[l] < MOST_FREE, key, best)
    out_any[l] = g >= 0
    out_g[l] = g if g >= 0 else 0


def choose(xp, St, Wt, loadt, kvt, Mt, M_total, n_gpus, T, policy, nmf, k, s, w):
    """Same contract as :func:`kvgpu.batch.pack._choose`: ``(g (L,), any fits (L,))``."""
    L = s.shape[0]
    g = xp.empty(L, dtype=xp.int64)
    anyfit = xp.empty(L, dtype=xp.uint8)
    if L:
        c = xp.ascontiguousarray
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", _performance_warning())
            _choose_kernel[(L + THREADS - 1) // THREADS, THREADS](
                St, Wt, loadt, kvt, Mt, c(M_total), c(n_gpus.astype(xp.int64)), c(T), c(policy.astype(xp.int64)),
                c(nmf.astype(xp.int64)), int(k), c(s), c(w), g, anyfit)
    return g, anyfit.astype(bool)


def engine(xp) -> ArrayEngine:
    """The batch engine on ``xp`` arrays (CuPy on a device, NumPy under the simulator) with both
    hot steps in these kernels; pass it to :func:`kvgpu.batch.pipeline.solve_seed`."""
    return ArrayEngine(xp, transfers=eval_transfers, choose=choose)


def _performance_warning():
    from kvgpu.backends import performance_warning

    return performance_warning()

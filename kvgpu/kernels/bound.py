"""The reported lower bound of :func:`kvgpu.bounds.lower_bound`, compiled: the same
floating-point operations in the same order, so the same values bit for bit.

:func:`kvgpu.bounds.lower_bound` is array code over a padded batch: the closed forms of
:func:`kvgpu.bounds.simple_bound`, then a bisection on ``T`` with the bin-packing relaxation of
:func:`kvgpu.bounds.lanes_impossible` per memory class.  On ADRS-shaped batches that array code
costs about a third of a numba seed solve (each of its 24 bisection steps sorts and counts every
lane again); here each instance runs the same steps on its own rows.

One source, two targets, as :mod:`kvgpu.kernels.cpu`: :func:`instance_bound_core` allocates
nothing -- its working memory is ``fw`` (float64) and ``iw`` (int64) of :func:`bound_work`
entries -- and sorts with kvgpu's own sorts, so :func:`kvgpu.kernels.jit.device` compiles it as
a CUDA device function (the ``cuda`` backend's finish kernel, :mod:`kvgpu.kernels.device`);
:func:`instance_bound` and :func:`lower_bound_batch` are the CPU entries.

What makes the values equal and not merely close:

* the bound does not depend on the padded layout (:mod:`kvgpu.bounds`' module doc): every sum
  runs left to right, padding adds exact zeros, sorts are stable, and the pair and triplet
  terms are gated by the instance's own GPU count -- so a row may be passed padded (the CPU
  batch entry) or trimmed to its real models and GPUs (the device);
* counts below a threshold are exact whichever way they are taken (binary search here);
* numba does not contract ``a * b + c`` into a fused multiply-add on the CPU; the one product
  that is summed here, L2's margin ``d * (n + 1)``, is written with
  :func:`kvgpu.kernels.deltas.fmul`, which the device never fuses either.

``tests/test_bounds.py`` checks the equality on random batches (mixed memories, masks, wide
rows) and the layout invariance.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from kvgpu.kernels.cpu import objective_core
from kvgpu.kernels.deltas import fmul
from kvgpu.kernels.jit import kernel
from kvgpu.kernels.params import DEN_FLOOR, N_PAIR, N_TRIPLET, WINDOW
from kvgpu.kernels.sorting import argsort_into, insertion_sort

#: As :data:`kvgpu.bounds.L2_DELTA`, :data:`kvgpu.bounds.VOLUME_RTOL` (asserted equal in the tests).
L2_DELTA = 1e-9
VOLUME_RTOL = 1e-9
#: Bisection steps of :func:`kvgpu.bounds.binpacking_bound`.
BISECT_ITERS = 24
#: Rows up to this long are sorted by insertion (fewer operations on short rows), longer ones by
#: the merge argsort of :mod:`kvgpu.kernels.sorting`.
SHORT_ROW = 64
INF = math.inf


@kernel
def _div(a, den):
    """:func:`kvgpu.bounds.bounded_div`."""
    return a / max(den, DEN_FLOOR)


@kernel
def sort_values(x, tmp, idx, itmp):
    """Sort ``x`` (n,) float64 ascending in place, values only (so stability is irrelevant):
    insertion sort up to :data:`SHORT_ROW` values, else the merge argsort and a gather.
    ``tmp`` (n,) float64, ``idx``, ``itmp`` (n,) int64 are working memory."""
    n = x.shape[0]
    if n <= SHORT_ROW:
        insertion_sort(x)
        return
    argsort_into(x, idx[:n], itmp[:n])
    for k in range(n):
        tmp[k] = x[idx[k]]
    for k in range(n):
        x[k] = tmp[k]


@kernel
def bound_work(N, G):
    """``(floats, ints)``: the working memory :func:`instance_bound_core` needs for rows of
    ``N`` model and ``G`` GPU slots."""
    W = max(N, G)
    return 3 * G + 2 + 8 * N + 1 + W, 2 * N + 2 * W


@kernel
def _simple(s, w, v, srt, n_gpus, P, key, ss, ws, perm, tmp):
    """:func:`kvgpu.bounds.simple_bound` of one instance, from its memories sorted ascending
    ``srt`` (G,) (padding as 0); fills ``P`` (G+1,) with the prefix sums of the memories,
    largest first.  ``key``, ``ss``, ``ws`` (N,) float64, ``perm``, ``tmp`` (N,) int64 scratch."""
    N, G = s.shape[0], srt.shape[0]
    P[0] = 0.0
    for g in range(G):
        P[g + 1] = P[g] + srt[G - 1 - g]
    # individual and global terms, models in index order
    best = 0.0
    tw, ts = 0.0, 0.0
    for j in range(N):
        if v[j]:
            best = max(best, _div(w[j], P[1] - s[j]))
            tw += w[j]
            ts += s[j]
    best = max(best, _div(tw, P[n_gpus] - 0.0 - ts))
    # models re-gathered largest first, stable, invalid last (kvgpu.batch.arrays.sort_desc): the
    # first nv of them are the valid ones
    nv = 0
    for j in range(N):
        key[j] = -s[j] if v[j] else INF
        nv += 1 if v[j] else 0
    argsort_into(key, perm, tmp)
    for j in range(N):
        ss[j], ws[j] = s[perm[j]], w[perm[j]]
    # pairs among the largest that cannot share a GPU; sizes descend, so unless the two largest
    # exceed one GPU no pair does (the array code's shortcut, and most instances' case)
    k = min(N_PAIR, nv)
    if k >= 2 and n_gpus >= 2 and ss[0] + ss[1] > P[1]:
        for i in range(k):
            for j in range(i + 1, k):
                if ss[i] + ss[j] > P[1]:
                    best = max(best, _div(ws[i] + ws[j], P[2] - ss[i] - ss[j]))
    # windowed triplets whose size exceeds two GPUs (likewise: only if the three largest do)
    k = min(N_TRIPLET, nv)
    if k >= 3 and n_gpus >= 3 and ss[0] + ss[1] + ss[2] > P[2]:
        for a in range(k):
            for b in range(a + 1, min(k, a + WINDOW + 1)):
                for c in range(b + 1, min(k, b + WINDOW + 1)):
                    tot = ss[a] + ss[b] + ss[c]
                    if tot > P[2]:
                        best = max(best, _div(ws[a] + ws[b] + ws[c], P[3] - tot))
    # size-descending prefixes spread over at most min(|X|, G) GPUs
    cs, cw = 0.0, 0.0
    for j in range(nv):
        cs += ss[j]
        cw += ws[j]
        best = max(best, _div(cw, P[min(j + 1, n_gpus)] - cs))
    return best


@kernel
def _count_le(ra, t):
    """How many of the ascending ``ra`` (n,) are ``<= t`` (a binary search)."""
    lo, hi = 0, ra.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if ra[mid] <= t:
            lo = mid + 1
        else:
            hi = mid
    return lo


@kernel
def _l2_exceeds(r, valid, n_bins, ra, cs, tmp, idx, itmp):
    """:func:`kvgpu.bounds.l2_exceeds` of one lane; ``ra`` (N,), ``cs`` (N+1,), ``tmp`` (N,)
    float64 and ``idx``, ``itmp`` (N,) int64 are scratch."""
    N = r.shape[0]
    d = L2_DELTA
    too_big = False
    n_valid = 0
    for j in range(N):
        x = r[j] if valid[j] else 0.0
        too_big = too_big or x > 1 + d
        n_valid += 1 if valid[j] else 0
        ra[j] = min(max(x, 0.0), 1.0 + d)
    if too_big:  # an item larger than every bin: impossible, whatever the counts say
        return True
    sort_values(ra, tmp, idx, itmp)
    cs[0] = 0.0
    for j in range(N):
        cs[j + 1] = cs[j] + ra[N - 1 - j]
    nb = N - _count_le(ra, 0.5 + d)
    # k runs over 0 and the item sizes, ascending; the thresholds 1 - k + d then descend, so the
    # two counts below move one way and are kept by pointers.  A k above 1/2 counts as 0 (the
    # array code's ``where(k <= 0.5, k, 0)``), already evaluated first, and so does a repeated k.
    p1, pm = N, 0  # items <= 1 - k + d; items < k
    need_max = -INF
    prev = -1.0
    margin = fmul(d, float(n_valid + 1))  # the array code's ``d * (count + 1)``, never fused
    for q in range(N + 1):
        k = 0.0 if q == 0 else ra[q - 1]
        if k > 0.5:
            break
        if k == prev:
            continue
        prev = k
        t1 = 1.0 - k + d
        while p1 > 0 and ra[p1 - 1] > t1:
            p1 -= 1
        while pm < N and ra[pm] < k:
            pm += 1
        n1 = N - p1
        n2 = nb - n1
        sum2 = cs[nb] - cs[n1]
        m = N - pm
        sum3 = cs[m] - cs[nb] if m > nb else 0.0
        extra = float(math.ceil(sum3 - (n2 - sum2) - margin))
        need = n1 + n2 + max(extra, 0.0)
        need_max = max(need_max, need)
    return need_max > n_bins


@kernel
def _impossible(a, v, M, gm, c, it, ra, cs, r, tmp, idx, itmp):
    """:func:`kvgpu.bounds.lanes_impossible` of one lane: item loads ``a`` (N,), class ``c``;
    ``it`` (N,) int64 and ``ra``, ``r``, ``tmp`` (N,), ``cs`` (N+1,) float64, ``idx``, ``itmp``
    (N,) int64 are scratch."""
    N, G = a.shape[0], M.shape[0]
    capmax = 0.0
    n_bins = 0
    volume = 0.0
    for g in range(G):  # left to right, as the array code's seq_sum
        on = gm[g] and M[g] > c
        x = M[g] if on else 0.0
        n_bins += 1 if on else 0
        if g == 0 or x > capmax:
            capmax = x
        volume += x
    some = False
    load = 0.0
    for j in range(N):
        inside = v[j] and a[j] > c
        it[j] = 1 if inside else 0
        some = some or inside
        load += a[j] if inside else 0.0
    if some and capmax <= 0:
        return True
    if load > volume * (1.0 + VOLUME_RTOL):
        return True
    if not some:
        return False
    den = capmax if capmax > 0 else 1.0
    for j in range(N):
        r[j] = a[j] / den
    return _l2_exceeds(r, it, n_bins, ra, cs, tmp, idx, itmp)


@kernel
def instance_bound_core(s, w, v, M, gm, hi, fw, iw):
    """:func:`kvgpu.bounds.lower_bound` of one instance: rows ``s``, ``w`` (N,) float64 (GB,
    demand), ``v`` (N,) bool real models, ``M`` (G,) float64 GB, ``gm`` (G,) bool real GPUs --
    padded or not, anywhere (the value is the same) -- and the achieved max KVPR ``hi``.
    ``fw``, ``iw``: :func:`bound_work` entries.  Returns the bound (float)."""
    N, G = s.shape[0], M.shape[0]
    W = max(N, G)
    P, srt, th = fw[:G + 1], fw[G + 1:2 * G + 1], fw[2 * G + 1:3 * G + 2]
    o = 3 * G + 2
    key, ss, ws, a = fw[o:o + N], fw[o + N:o + 2 * N], fw[o + 2 * N:o + 3 * N], fw[o + 3 * N:o + 4 * N]
    ra, r, tmp = fw[o + 4 * N:o + 5 * N], fw[o + 5 * N:o + 6 * N], fw[o + 6 * N:o + 7 * N]
    cs, gtmp = fw[o + 7 * N:o + 8 * N + 1], fw[o + 8 * N + 1:o + 8 * N + 1 + W]
    it, perm, idx, itmp = iw[:N], iw[N:2 * N], iw[2 * N:2 * N + W], iw[2 * N + W:2 * N + 2 * W]
    # the memories sorted ascending, padding as 0 (the prefixes and the memory classes read them)
    n_gpus = 0
    for g in range(G):
        srt[g] = M[g] if gm[g] else 0.0
        n_gpus += 1 if gm[g] else 0
    sort_values(srt, gtmp, idx, itmp)
    lo = _simple(s, w, v, srt, n_gpus, P, key, ss, ws, perm, itmp[:N])
    if not (math.isfinite(hi) and hi > lo and lo > 0):
        return lo
    # memory classes: 0 and every memory size below the largest (kvgpu.bounds._memory_classes)
    th[0] = 0.0
    n_th = 1
    for g in range(G):
        prev = srt[g - 1] if g > 0 else -1.0
        if srt[g] > 0 and srt[g] < srt[G - 1] and srt[g] != prev:
            th[n_th] = srt[g]
            n_th += 1
    x, y = lo, hi
    for _ in range(BISECT_ITERS):
        mid = (x + y) / 2
        for j in range(N):
            a[j] = s[j] + w[j] / mid
        bad = False
        for q in range(n_th):
            if _impossible(a, v, M, gm, th[q], it, ra, cs, r, tmp, idx, itmp):
                bad = True
                break
        if bad:
            x = mid
        else:
            y = mid
    return x


@kernel
def finish_core(s, w, M, real, assign, pos, kv, lo, with_bound, fw, iw):
    """The figures the engine reports for one placed instance (its real models and GPUs):
    ``kv`` (G,) float64 each GPU's KVPR and the max ``m`` (:func:`kvgpu.kernels.cpu.
    objective_core`); with ``with_bound``, the lower bound ``lo`` recomputed below ``m``
    (:func:`instance_bound_core`; ``real`` (max(n, G),) bool all True, its masks), else ``lo``
    kept (the bound before a search).  Returns ``(m, lo)``; the engine reports ``min(lo, m)``.
    fw, iw: :func:`bound_work` entries (the objective's share comes first and is done before)."""
    m = objective_core(s, w, M, assign, pos, kv, fw, iw)
    if with_bound:
        lo = instance_bound_core(s, w, real[:s.shape[0]], M, real[:M.shape[0]], m, fw, iw)
    return m, lo


@kernel
def instance_bound(s, w, v, M, gm, hi):
    """:func:`kvgpu.bounds.lower_bound` of one instance of a padded batch (rows ``s``, ``w``,
    ``v`` (N,), ``M``, ``gm`` (G,), achieved max KVPR ``hi``; CPU entry of
    :func:`instance_bound_core`)."""
    nf, ni = bound_work(s.shape[0], M.shape[0])
    return instance_bound_core(s, w, v, M, gm, hi, np.empty(nf), np.empty(ni, np.int64))


@kernel(parallel=True)
def lower_bound_batch(sizes, demand, model_mask, gpu_mem, gpu_mask, hi, out):
    """:func:`kvgpu.bounds.lower_bound` of a padded batch, one instance per thread.

    sizes, demand (B, N) float64; model_mask (B, N) bool; gpu_mem (B, G) float64; gpu_mask
    (B, G) bool; hi (B,) float64 achieved max KVPR; writes out (B,) float64."""
    for b in prange(sizes.shape[0]):
        out[b] = instance_bound(sizes[b], demand[b], model_mask[b], gpu_mem[b], gpu_mask[b], hi[b])

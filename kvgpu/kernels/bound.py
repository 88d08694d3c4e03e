"""The reported lower bound of :func:`kvgpu.bounds.lower_bound`, compiled: one instance per
thread, the same floating-point operations in the same order, so the same values bit for bit.

:func:`kvgpu.bounds.lower_bound` is array code over a padded batch: the closed forms of
:func:`kvgpu.bounds.simple_bound`, then a bisection on ``T`` with the bin-packing relaxation of
:func:`kvgpu.bounds.lanes_impossible` per memory class.  On ADRS-shaped batches that array code
costs about a third of a numba seed solve (each of its 24 bisection steps sorts and counts every
lane again); here each instance runs the same steps on its own rows.

What makes the values equal and not merely close:

* every row keeps the batch's padded width (``N`` model slots, ``G`` GPU slots): the array code's
  sums, sorts and ``k``-prefix memories run over the padded rows, and e.g. a one-GPU instance in
  a wider batch sees ``P[2] = P[1]``;
* running sums (``cumsum``) add left to right, as here; whole-row sums (``.sum(axis=1)``) use
  NumPy's pairwise summation, reproduced by :func:`pairwise_sum`;
* counts below a threshold are exact whichever way they are taken (binary search here);
* numba does not contract ``a * b + c`` into a fused multiply-add without ``fastmath``.

``tests/test_bounds.py`` checks the equality on random batches (mixed memories, masks, wide
rows that reach the pairwise recursion).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from kvgpu.kernels.jit import kernel
from kvgpu.kernels.params import DEN_FLOOR, N_PAIR, N_TRIPLET, WINDOW

#: As :data:`kvgpu.bounds.L2_DELTA`, :data:`kvgpu.bounds.VOLUME_RTOL` (asserted equal in the tests).
L2_DELTA = 1e-9
VOLUME_RTOL = 1e-9
#: Bisection steps of :func:`kvgpu.bounds.binpacking_bound`.
BISECT_ITERS = 24
#: NumPy's pairwise-summation block (``PW_BLOCKSIZE`` in numpy/_core/src/umath/loops_utils.h.src).
PW_BLOCKSIZE = 128


@kernel
def pairwise_sum(x, lo, n):
    """``x[lo:lo + n].sum()`` as NumPy adds a contiguous float64 row: sequentially below 8
    values, with 8 interleaved partial sums up to :data:`PW_BLOCKSIZE`, halves (cut at a multiple
    of 8) beyond."""
    if n < 8:
        res = 0.0
        for i in range(lo, lo + n):
            res += x[i]
        return res
    if n <= PW_BLOCKSIZE:
        r0, r1, r2, r3 = x[lo], x[lo + 1], x[lo + 2], x[lo + 3]
        r4, r5, r6, r7 = x[lo + 4], x[lo + 5], x[lo + 6], x[lo + 7]
        i = 8
        while i < n - n % 8:
            r0 += x[lo + i]
            r1 += x[lo + i + 1]
            r2 += x[lo + i + 2]
            r3 += x[lo + i + 3]
            r4 += x[lo + i + 4]
            r5 += x[lo + i + 5]
            r6 += x[lo + i + 6]
            r7 += x[lo + i + 7]
            i += 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            res += x[lo + i]
            i += 1
        return res
    n2 = n // 2
    n2 -= n2 % 8
    return pairwise_sum(x, lo, n2) + pairwise_sum(x, lo + n2, n - n2)


@kernel
def _div(a, den):
    """:func:`kvgpu.bounds.bounded_div`."""
    return a / max(den, DEN_FLOOR)


@kernel
def _simple(s, w, v, M, gm, P):
    """:func:`kvgpu.bounds.simple_bound` of one padded instance; fills ``P`` (G+1,) with the
    prefix sums of the memories, largest first."""
    N, G = s.shape[0], M.shape[0]
    mem = np.empty(G)
    n_gpus = 0
    for g in range(G):
        mem[g] = M[g] if gm[g] else 0.0
        n_gpus += 1 if gm[g] else 0
    mem = np.sort(mem)
    P[0] = 0.0
    for g in range(G):
        P[g + 1] = P[g] + mem[G - 1 - g]
    # individual and global terms, models in index order
    best = 0.0
    tw, ts = 0.0, 0.0
    for j in range(N):
        if v[j]:
            best = max(best, _div(w[j], P[1] - s[j]))
            tw += w[j]
            ts += s[j]
        else:
            tw += 0.0
            ts += 0.0
    best = max(best, _div(tw, P[n_gpus] - 0.0 - ts))
    # models re-gathered largest first, stable, invalid last (kvgpu.batch.arrays.sort_desc)
    key = np.empty(N)
    for j in range(N):
        key[j] = -s[j] if v[j] else np.inf
    perm = np.argsort(key, kind="mergesort")
    ss, ws = np.empty(N), np.empty(N)
    vs = np.empty(N, np.bool_)
    for j in range(N):
        ss[j], ws[j], vs[j] = s[perm[j]], w[perm[j]], v[perm[j]]
    # pairs among the largest that cannot share a GPU; sizes descend, so unless the two largest
    # exceed one GPU no pair does (the array code's shortcut, and most instances' case)
    k = min(N_PAIR, N)
    if k >= 2 and G >= 2 and vs[1] and ss[0] + ss[1] > P[1]:
        for i in range(k):
            for j in range(i + 1, k):
                if vs[i] and vs[j] and ss[i] + ss[j] > P[1]:
                    best = max(best, _div(ws[i] + ws[j], P[2] - ss[i] - ss[j]))
    # windowed triplets whose size exceeds two GPUs (likewise: only if the three largest do)
    k = min(N_TRIPLET, N)
    if k >= 3 and G >= 3 and n_gpus >= 3 and vs[2] and ss[0] + ss[1] + ss[2] > P[2]:
        for a in range(k):
            for b in range(a + 1, min(k, a + WINDOW + 1)):
                for c in range(b + 1, min(k, b + WINDOW + 1)):
                    tot = ss[a] + ss[b] + ss[c]
                    if vs[a] and vs[b] and vs[c] and tot > P[2]:
                        best = max(best, _div(ws[a] + ws[b] + ws[c], P[3] - tot))
    # size-descending prefixes spread over at most min(|X|, G) GPUs
    cs, cw = 0.0, 0.0
    for j in range(N):
        cs += ss[j]
        cw += ws[j]
        if vs[j]:
            best = max(best, _div(cw, P[min(j + 1, n_gpus)] - cs))
    return best


@kernel
def _insertion_sort(x, n):
    """Sort ``x[:n]`` ascending in place: on short rows (up to a few dozen items) this beats a
    general sort; only the values matter, so stability is irrelevant."""
    for i in range(1, n):
        v = x[i]
        j = i - 1
        while j >= 0 and x[j] > v:
            x[j + 1] = x[j]
            j -= 1
        x[j + 1] = v


@kernel
def _l2_exceeds(r, valid, n_bins, ra, cs):
    """:func:`kvgpu.bounds.l2_exceeds` of one lane; ``ra`` (N,) and ``cs`` (N+1,) are scratch."""
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
    if N <= 64:
        _insertion_sort(ra, N)
    else:  # quadratic no more
        ra.sort()
    cs[0] = 0.0
    for j in range(N):
        cs[j + 1] = cs[j] + ra[N - 1 - j]
    nb = N - np.searchsorted(ra, 0.5 + d, side="right")
    # k runs over 0 and the item sizes, ascending; the thresholds 1 - k + d then descend, so the
    # two counts below move one way and are kept by pointers.  A k above 1/2 counts as 0 (the
    # array code's ``where(k <= 0.5, k, 0)``), already evaluated first, and so does a repeated k.
    p1, pm = N, 0  # items <= 1 - k + d; items < k
    need_max = -np.inf
    prev = -1.0
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
        extra = np.ceil(sum3 - (n2 - sum2) - d * (n_valid + 1))
        need = n1 + n2 + max(extra, 0.0)
        need_max = max(need_max, need)
    return too_big or need_max > n_bins


@kernel
def _impossible(a, v, M, gm, c, it, buf, ra, cs, r):
    """:func:`kvgpu.bounds.lanes_impossible` of one lane: item loads ``a`` (N,), class ``c``;
    ``it`` (N,) bool and ``buf``, ``ra``, ``r`` (max(N, G),) / ``cs`` (N+1,) are scratch."""
    N, G = a.shape[0], M.shape[0]
    capmax = 0.0
    n_bins = 0
    for g in range(G):
        on = gm[g] and M[g] > c
        buf[g] = M[g] if on else 0.0
        n_bins += 1 if on else 0
        if g == 0 or buf[g] > capmax:
            capmax = buf[g]
    volume = pairwise_sum(buf, 0, G)
    some = False
    for j in range(N):
        it[j] = v[j] and a[j] > c
        some = some or it[j]
        buf[j] = a[j] if it[j] else 0.0
    load = pairwise_sum(buf, 0, N)
    if some and capmax <= 0:
        return True
    if load > volume * (1.0 + VOLUME_RTOL):
        return True
    if not some:
        return False
    den = capmax if capmax > 0 else 1.0
    for j in range(N):
        r[j] = a[j] / den
    return _l2_exceeds(r[:N], it, n_bins, ra, cs)


@kernel
def instance_bound(s, w, v, M, gm, hi):
    """:func:`kvgpu.bounds.lower_bound` of one instance of a padded batch (rows ``s``, ``w``,
    ``v`` (N,), ``M``, ``gm`` (G,), achieved max KVPR ``hi``)."""
    N, G = s.shape[0], M.shape[0]
    P = np.empty(G + 1)
    lo = _simple(s, w, v, M, gm, P)
    if not (np.isfinite(hi) and hi > lo and lo > 0):
        return lo
    # memory classes: 0 and every memory size below the largest (kvgpu.bounds._memory_classes)
    srt = np.empty(G)
    for g in range(G):
        srt[g] = M[g] if gm[g] else 0.0
    srt.sort()
    th = np.empty(G + 1)
    th[0] = 0.0
    n_th = 1
    for g in range(G):
        prev = srt[g - 1] if g > 0 else -1.0
        if srt[g] > 0 and srt[g] < srt[G - 1] and srt[g] != prev:
            th[n_th] = srt[g]
            n_th += 1
    W = max(N, G)
    a = np.empty(N)
    it = np.empty(N, np.bool_)
    buf, ra, r = np.empty(W), np.empty(N), np.empty(W)
    cs = np.empty(N + 1)
    x, y = lo, hi
    for _ in range(BISECT_ITERS):
        mid = (x + y) / 2
        for j in range(N):
            a[j] = s[j] + w[j] / mid
        bad = False
        for q in range(n_th):
            if _impossible(a, v, M, gm, th[q], it, buf, ra, cs, r):
                bad = True
                break
        if bad:
            x = mid
        else:
            y = mid
    return x


@kernel(parallel=True)
def lower_bound_batch(sizes, demand, model_mask, gpu_mem, gpu_mask, hi, out):
    """:func:`kvgpu.bounds.lower_bound` of a padded batch, one instance per thread.

    sizes, demand (B, N) float64; model_mask (B, N) bool; gpu_mem (B, G) float64; gpu_mask
    (B, G) bool; hi (B,) float64 achieved max KVPR; writes out (B,) float64."""
    for b in prange(sizes.shape[0]):
        out[b] = instance_bound(sizes[b], demand[b], model_mask[b], gpu_mem[b], gpu_mask[b], hi[b])

"""Lower bounds for many lanes at once (array twin of :mod:`kvgpu.bounds`).

Every function takes models already gathered *in the order the reference
iterates them* (``so``/``wo`` (L, N) with ``valid`` (L, N)), so that running sums
round exactly as the reference's loops do, and ``P`` (L, G+1), the prefix sums
of each lane's memories sorted largest first (``P[:, k]`` = ``k`` largest).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from kvgpu.batch.arrays import seq_sum, sort_desc
from kvgpu.kernels.params import DEN_FLOOR, K_PREFIX_START, N_PAIR, N_TRIPLET, WINDOW


def _div(xp, a, den):
    return a / xp.maximum(den, DEN_FLOOR)


def mem_prefix(xp, gpu_mem, gpu_mask):
    """``P`` (L, G+1): sums of the ``k`` largest memories, accumulated left to right."""
    srt = -xp.sort(-xp.where(gpu_mask, gpu_mem, 0.0), axis=1)
    return xp.concatenate([xp.zeros((srt.shape[0], 1)), xp.cumsum(srt, axis=1)], axis=1)


def _col(xp, P, k):
    """``P[l, k[l]]`` for per-lane ``k``."""
    return xp.take_along_axis(P, k[:, None], axis=1)[:, 0]


def individual(xp, so, wo, valid, P):
    return xp.where(valid, _div(xp, wo, P[:, 1:2] - so), 0.0).max(axis=1)


def glob(xp, so, wo, valid, P, n_gpus, placed_size):
    """``sum w / (sum M - S_placed - sum s)`` over the valid models, sums in the given order."""
    tw = seq_sum(xp, xp.where(valid, wo, 0.0))
    ts = seq_sum(xp, xp.where(valid, so, 0.0))
    return _div(xp, tw, _col(xp, P, n_gpus) - placed_size - ts)


def size_desc(xp, so, wo, valid):
    """Models re-gathered largest first (stable in the given order): ``(s, w, valid)``."""
    perm = sort_desc(xp, [so], valid)
    take = lambda a: xp.take_along_axis(a, perm, axis=1)  # noqa: E731
    return take(so), take(wo), take(valid)


def pair(xp, ss, ws, vs, P):
    """Pairs among the 120 largest (``ss`` already size-descending) that cannot share a GPU."""
    k = min(N_PAIR, ss.shape[1])
    s, w, v = ss[:, :k], ws[:, :k], vs[:, :k]
    i, j = (xp.asarray(t) for t in np.triu_indices(k, 1))
    # sizes are descending: unless the two largest exceed one GPU, no pair does
    if i.size == 0 or not bool(((s[:, 0] + s[:, 1] > P[:, 1]) & v[:, 1]).any()):
        return xp.zeros(s.shape[0])
    ok = (s[:, i] + s[:, j] > P[:, 1:2]) & v[:, i] & v[:, j]
    return xp.where(ok, _div(xp, w[:, i] + w[:, j], P[:, 2:3] - s[:, i] - s[:, j]), 0.0).max(axis=1)


@lru_cache(maxsize=None)
def _triples(n: int):
    out = [(a, b, c) for a in range(n) for b in range(a + 1, min(n, a + WINDOW + 1))
           for c in range(b + 1, min(n, b + WINDOW + 1))]
    return np.array(out, dtype=np.int64).reshape(-1, 3).T


def triplet(xp, ss, ws, vs, P, n_gpus):
    """Windowed triplets among the 60 largest whose size exceeds two GPUs (lanes with >= 3 GPUs)."""
    L = ss.shape[0]
    if P.shape[1] < 4:
        return xp.zeros(L)
    a, b, c = (xp.asarray(t) for t in _triples(min(N_TRIPLET, ss.shape[1])))
    # sizes are descending: unless the three largest exceed two GPUs, no windowed triple does
    if a.size == 0 or not bool(((ss[:, 0] + ss[:, 1] + ss[:, 2] > P[:, 2]) & vs[:, 2]).any()):
        return xp.zeros(L)
    tot = ss[:, a] + ss[:, b] + ss[:, c]
    ok = (tot > P[:, 2:3]) & vs[:, a] & vs[:, b] & vs[:, c] & (n_gpus >= 3)[:, None]
    val = _div(xp, ws[:, a] + ws[:, b] + ws[:, c], P[:, 3:4] - tot)
    return xp.where(ok, val, 0.0).max(axis=1)


def seed_kprefix(xp, ss, ws, vs, P, k_max):
    """The seed's k-prefix term for ``k = 1 .. k_max`` (per-lane array); not a valid bound."""
    L, N = ss.shape
    ts = xp.cumsum(xp.where(vs, ss, 0.0), axis=1)
    tw = xp.cumsum(xp.where(vs, ws, 0.0), axis=1)
    last = xp.maximum(vs.sum(axis=1) - 1, 0)
    best = xp.zeros(L)
    for k in range(1, int(k_max.max()) + 1 if k_max.size else 1):
        cross = vs & (ts > P[:, k - 1:k])
        idx = xp.where(cross.any(axis=1), xp.argmax(cross, axis=1), last)
        val = _div(xp, _col(xp, tw, idx), P[:, k] - _col(xp, ts, idx))
        best = xp.where((k <= k_max) & vs.any(axis=1), xp.maximum(best, val), best)
    return best


def seed_bounds(xp, so, wo, valid, P, n_gpus, placed_size, k_max, with_pair, with_triplet):
    """Max of the seed's bound terms over the given models (see :mod:`kvgpu.bounds`)."""
    terms = [individual(xp, so, wo, valid, P), glob(xp, so, wo, valid, P, n_gpus, placed_size)]
    if with_pair:
        ss, ws, vs = size_desc(xp, so, wo, valid)
        terms += [pair(xp, ss, ws, vs, P), seed_kprefix(xp, ss, ws, vs, P, k_max)]
        if with_triplet:
            terms.append(triplet(xp, ss, ws, vs, P, n_gpus))
    out = terms[0]
    for t in terms[1:]:
        out = xp.maximum(out, t)
    return out


def seed_start_bound(batch, P):
    """``low_T`` of the seed for every lane (models in index order)."""
    xp = batch.xp
    n_gpus = batch.n_gpus
    return seed_bounds(xp, batch.sizes, batch.demand, batch.model_mask, P, n_gpus, 0.0,
                       xp.minimum(n_gpus, K_PREFIX_START), True, True)


def lower_bound(batch):
    """Best valid lower bound per lane (array twin of :func:`kvgpu.bounds.lower_bound`)."""
    xp = batch.xp
    P = mem_prefix(xp, batch.gpu_mem, batch.gpu_mask)
    n_gpus = batch.n_gpus
    so, wo, v = batch.sizes, batch.demand, batch.model_mask
    ss, ws, vs = size_desc(xp, so, wo, v)
    out = xp.maximum(individual(xp, so, wo, v, P), glob(xp, so, wo, v, P, n_gpus, 0.0))
    out = xp.maximum(out, pair(xp, ss, ws, vs, P))
    out = xp.maximum(out, triplet(xp, ss, ws, vs, P, n_gpus))
    ts, tw = xp.cumsum(ss, axis=1), xp.cumsum(ws, axis=1)
    n = xp.arange(1, ss.shape[1] + 1)[None, :]
    m = xp.take_along_axis(P, xp.minimum(n, n_gpus[:, None]), axis=1)
    out = xp.maximum(out, xp.where(vs, _div(xp, tw, m - ts), 0.0).max(axis=1))
    return out


# ----------------------------------------------------------------------------- bin-packing bound

#: Safety margin of the bin-packing bound: an item counts as "larger than x" only if it exceeds
#: x by this much, and volumes are rounded down by it (times N), so rounding never overstates.
L2_DELTA = 1e-9


def _count_below(xp, ra, t, inclusive):
    """Per row, how many of the sorted values ``ra`` (L, N) are below each threshold ``t`` (L, K)
    (``<=`` if ``inclusive`` else ``<``).  One stable argsort of each row's values and thresholds
    together: exact and independent of the other rows (no offsets that would round)."""
    L, N = ra.shape
    K = t.shape[1]
    if N <= 64:  # small rows: a direct comparison is cheaper than sorting
        below = ra[:, None, :] <= t[:, :, None] if inclusive else ra[:, None, :] < t[:, :, None]
        return below.sum(axis=2)
    # equal values: values first counts them as below (<=), thresholds first does not (<)
    both = xp.concatenate([ra, t] if inclusive else [t, ra], axis=1)
    is_t = xp.zeros(N + K, bool)
    if inclusive:
        is_t[N:] = True
    else:
        is_t[:K] = True
    perm = xp.argsort(both, axis=1, kind="stable")
    tag = is_t[perm]
    values_before = xp.cumsum(~tag, axis=1)  # values at or before each sorted position
    t_slot = perm - (N if inclusive else 0)   # which threshold sits there (where tag)
    out = xp.zeros((L, K), dtype=xp.int64)
    rows, cols = xp.nonzero(tag)
    out[rows, t_slot[rows, cols]] = values_before[rows, cols]
    return out


def l2_exceeds(xp, r, valid, n_bins):
    """Does the Martello-Toth bound L2 prove that items of relative sizes ``r`` (L, N) (bin
    capacity 1, ``valid`` (L, N)) need more than ``n_bins`` (L,) bins?  Returns (L,) bool.

    For any ``k`` in [0, 1/2]: items above ``1 - k`` (J1) and items in (1/2, 1 - k] (J2) each need
    their own bin; items in [k, 1/2] (J3) fit neither with J1 items nor elsewhere than in the J2
    bins' free space or new bins, so ``L(k) = |J1| + |J2| + ceil(vol(J3) - free(J2))``.
    ``k`` runs over 0 and every item size."""
    L, N = r.shape
    d = L2_DELTA
    r = xp.where(valid, r, 0.0)
    too_big = (r > 1 + d).any(axis=1)
    ra = xp.sort(xp.clip(r, 0.0, 1.0 + d), axis=1)
    cs = xp.concatenate([xp.zeros((L, 1)), xp.cumsum(ra[:, ::-1], axis=1)], axis=1)  # sums of the j largest

    def count_gt(t):  # items > t per row, for thresholds t (L, K)
        return N - _count_below(xp, ra, t, inclusive=True)

    def count_ge(t):
        return N - _count_below(xp, ra, t, inclusive=False)

    k = xp.concatenate([xp.zeros((L, 1)), ra], axis=1)
    k = xp.where(k <= 0.5, k, 0.0)
    n1 = count_gt(1.0 - k + d)
    nb = count_gt(xp.full((L, 1), 0.5 + d))
    n2 = nb - n1
    take = lambda j: xp.take_along_axis(cs, j, axis=1)  # noqa: E731
    sum2 = take(nb) - take(n1)
    m = count_ge(k)
    sum3 = xp.where(m > nb, take(m) - take(nb), 0.0)
    extra = xp.ceil(sum3 - (n2 - sum2) - d * (valid.sum(axis=1, keepdims=True) + 1))  # margin: real items only
    need = n1 + n2 + xp.maximum(extra, 0.0)
    return too_big | (need.max(axis=1) > n_bins)


def binpacking_bound(batch, lo, hi, iters: int = 24):
    """Raise the lower bounds ``lo`` (B,) by bisection on ``T``: "max KVPR <= T" means items
    ``w + T*s`` packing into bins ``T*M``, i.e. relative sizes ``w/(T*M) + s/M`` into unit bins;
    where L2 proves that impossible, ``T`` is a lower bound.  ``hi`` (B,) is any achieved max KVPR.
    Instances whose GPUs differ in memory keep ``lo`` (L2 needs equal bins)."""
    xp = batch.xp
    M = xp.where(batch.gpu_mask, batch.gpu_mem, 0.0).max(axis=1)
    uniform = (xp.where(batch.gpu_mask, batch.gpu_mem, M[:, None]) == M[:, None]).all(axis=1)
    go = uniform & xp.isfinite(hi) & (hi > lo) & (lo > 0)
    idx = xp.nonzero(go)[0]
    if idx.shape[0] == 0:
        return lo
    s, w, v = batch.sizes[idx], batch.demand[idx], batch.model_mask[idx]
    Mi, n = M[idx][:, None], batch.n_gpus[idx]
    a, b = lo[idx].copy(), hi[idx].copy()
    for _ in range(iters):
        mid = (a + b) / 2
        T = mid[:, None]
        bad = l2_exceeds(xp, (w + T * s) / (T * Mi), v, n)
        a = xp.where(bad, mid, a)
        b = xp.where(bad, b, mid)
    out = lo.copy()
    out[idx] = a
    return out

"""The lower bounds kvgpu reports, in one place (array code, NumPy or CuPy ``xp``).

A lower bound ``lb`` proves that no placement has a max KVPR below it, so ``max_kvpr / lb - 1``
is an upper limit on how far an answer can be from the optimum.  Three layers:

* :func:`simple_bound` -- closed forms over a batch (padded arrays, masks): individual
  ``max w_i / (M_max - s_i)``; global ``sum w / (sum M - sum s)``; pairs that cannot share a GPU;
  windowed triplets; and the prefix-set bound: any set ``X`` of models spans at most
  ``min(|X|, G)`` GPUs, so by the mediant inequality ``max KVPR >= sum_X w / (sum of the
  min(|X|, G) largest memories - sum_X s)``, for every size-descending prefix.
* :func:`binpacking_bound` -- "max KVPR <= T" is a bin packing of items ``s + w / T`` into GPUs
  of memory ``M``; where a relaxation of that packing is impossible, ``T`` is below the optimum,
  and a bisection on ``T`` finds the largest such ``T``.  The relaxation (:func:`lanes_impossible`)
  is, per memory class: the items larger than ``c`` must go to the GPUs with more than ``c``
  (volume test, and the Martello-Toth bound L2 with every such GPU enlarged to the largest),
  for ``c = 0`` and every memory size -- which covers GPUs of mixed memory.
* :func:`problem_bound` -- the same with a cluster's rules seen: items pinned to one GPU fill
  it before anything else; items allowed only on a set of GPUs must fit there (closed forms and
  the packing relaxation per set).  Anti-affinity and nodes only remove placements, so a bound
  that ignores them stays valid.  The migration budget of a re-placement is not seen: such a
  bound is one on the best placement without the budget (the exact search of
  :mod:`kvgpu.kernels.exact` proves bounds with it).

Every bound is validated against brute force in the tests; classification and volumes carry a
1e-9 safety margin so rounding never overstates.

The bound of an instance does not depend on the padded layout of its batch -- how wide the rows
are, where the padding sits -- as long as its real models keep their order (a stable
compaction does), bit for bit, so a device that solves compacted rows reports the same value:
every sum runs left to right (padding adds exact zeros), sorts are stable and put padding last
(size-descending models) or first (ascending memories and item loads, padding being 0 there
and never counted above a positive threshold), prefixes of memories are only read at indices up
to the lane's own GPU count, and the pair and triplet terms are gated by that count, not by the
padded width.  ``tests/test_bounds.py`` checks it against moved, widened and compacted padding.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from kvgpu.batch.arrays import seq_sum, sort_desc
from kvgpu.kernels.params import DEN_FLOOR, N_PAIR, N_TRIPLET, WINDOW


def bounded_div(xp, a, den):
    """``a / max(den, DEN_FLOOR)``: the bounds' division, finite where a denominator vanishes."""
    return a / xp.maximum(den, DEN_FLOOR)


def mem_prefix(xp, gpu_mem, gpu_mask):
    """``P`` (L, G+1): sums of the ``k`` largest memories, accumulated left to right."""
    srt = -xp.sort(-xp.where(gpu_mask, gpu_mem, 0.0), axis=1)
    return xp.concatenate([xp.zeros((srt.shape[0], 1)), xp.cumsum(srt, axis=1)], axis=1)


def per_lane(xp, P, k):
    """``P[l, k[l]]`` for per-lane ``k``."""
    return xp.take_along_axis(P, k[:, None], axis=1)[:, 0]


def individual(xp, so, wo, valid, P):
    return xp.where(valid, bounded_div(xp, wo, P[:, 1:2] - so), 0.0).max(axis=1)


def glob(xp, so, wo, valid, P, n_gpus, placed_size):
    """``sum w / (sum M - S_placed - sum s)`` over the valid models, sums in the given order."""
    tw = seq_sum(xp, xp.where(valid, wo, 0.0))
    ts = seq_sum(xp, xp.where(valid, so, 0.0))
    return bounded_div(xp, tw, per_lane(xp, P, n_gpus) - placed_size - ts)


def size_desc(xp, so, wo, valid):
    """Models re-gathered largest first (stable in the given order): ``(s, w, valid)``."""
    perm = sort_desc(xp, [so], valid)
    take = lambda a: xp.take_along_axis(a, perm, axis=1)  # noqa: E731
    return take(so), take(wo), take(valid)


def pair(xp, ss, ws, vs, P, n_gpus=None):
    """Pairs among the 120 largest (``ss`` already size-descending) that cannot share a GPU.

    With ``n_gpus`` (L,), only lanes of at least 2 GPUs: on one GPU the global term is at least
    as large, and the lane's own GPU count rather than the padded width decides, so padding
    never changes the reported bound.  Without (the seed's start bound, as the reference
    computes it), every lane of a batch at least 2 GPUs wide."""
    k = min(N_PAIR, ss.shape[1])
    s, w, v = ss[:, :k], ws[:, :k], vs[:, :k]
    i, j = (xp.asarray(t) for t in np.triu_indices(k, 1))
    # sizes are descending: unless the two largest exceed one GPU, no pair does (and one GPU
    # holds every pair, or nothing)
    if i.size == 0 or P.shape[1] < 3 or not bool(((s[:, 0] + s[:, 1] > P[:, 1]) & v[:, 1]).any()):
        return xp.zeros(s.shape[0])
    ok = (s[:, i] + s[:, j] > P[:, 1:2]) & v[:, i] & v[:, j]
    if n_gpus is not None:
        ok = ok & (n_gpus >= 2)[:, None]
    return xp.where(ok, bounded_div(xp, w[:, i] + w[:, j], P[:, 2:3] - s[:, i] - s[:, j]), 0.0).max(axis=1)


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
    val = bounded_div(xp, ws[:, a] + ws[:, b] + ws[:, c], P[:, 3:4] - tot)
    return xp.where(ok, val, 0.0).max(axis=1)


def simple_bound(batch):
    """Best closed-form lower bound per instance of a batch (see the module doc): (B,)."""
    xp = batch.xp
    P = mem_prefix(xp, batch.gpu_mem, batch.gpu_mask)
    n_gpus = batch.n_gpus
    so, wo, v = batch.sizes, batch.demand, batch.model_mask
    ss, ws, vs = size_desc(xp, so, wo, v)
    out = xp.maximum(individual(xp, so, wo, v, P), glob(xp, so, wo, v, P, n_gpus, 0.0))
    out = xp.maximum(out, pair(xp, ss, ws, vs, P, n_gpus))
    out = xp.maximum(out, triplet(xp, ss, ws, vs, P, n_gpus))
    ts, tw = xp.cumsum(ss, axis=1), xp.cumsum(ws, axis=1)
    n = xp.arange(1, ss.shape[1] + 1)[None, :]
    m = xp.take_along_axis(P, xp.minimum(n, n_gpus[:, None]), axis=1)
    out = xp.maximum(out, xp.where(vs, bounded_div(xp, tw, m - ts), 0.0).max(axis=1))
    return out


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


#: Relative margin of the volume test (sums of many loads round).
VOLUME_RTOL = 1e-9


def lanes_impossible(xp, a, items, cap, bins, c):
    """Per lane, is the packing relaxation impossible?  Lane ``l`` asks: can the items of
    ``items[l]`` with load above ``c[l]`` go into the GPUs of ``bins[l]`` with capacity above
    ``c[l]``?  (An item of load ``a > c`` only fits GPUs of capacity ``>= a > c``.)  Impossible
    when their volume exceeds those GPUs' total capacity, or when L2 proves they need more bins
    even if every one of those GPUs had the largest capacity among them.

    Parameters
    ----------
    a : (L, N) float64 -- item loads ``s + w / T`` at the target, GB.
    items : (L, N) bool; cap : (L, G) float64, GB; bins : (L, G) bool; c : (L,) float64, GB.

    Returns
    -------
    (L,) bool -- True where no placement fits (so the target is below the optimum).
    """
    it = items & (a > c[:, None])
    bn = bins & (cap > c[:, None])
    capmax = xp.where(bn, cap, 0.0).max(axis=1) if cap.shape[1] else xp.zeros(a.shape[0])
    # left-to-right sums (not NumPy's pairwise ``.sum``, whose blocks shift with the padding):
    # padding adds exact zeros, so a lane's sums are the same whatever its padded layout
    volume = seq_sum(xp, xp.where(bn, cap, 0.0)) if cap.shape[1] else xp.zeros(a.shape[0])
    load = seq_sum(xp, xp.where(it, a, 0.0)) if a.shape[1] else xp.zeros(a.shape[0])
    some = it.any(axis=1)
    none_room = some & (capmax <= 0)
    over_volume = load > volume * (1.0 + VOLUME_RTOL)
    r = a / xp.where(capmax > 0, capmax, 1.0)[:, None]
    return none_room | over_volume | (some & l2_exceeds(xp, r, it, bn.sum(axis=1)))


def _bisect(xp, lo, hi, impossible, iters):
    """Raise ``lo`` (B,) towards ``hi`` (B,): ``impossible(T)`` -> (B,) bool says which targets
    ``T`` (B,) are proven below the optimum."""
    a, b = lo.copy(), hi.copy()
    for _ in range(iters):
        mid = (a + b) / 2
        bad = impossible(mid)
        a = xp.where(bad, mid, a)
        b = xp.where(bad, b, mid)
    return a


def _memory_classes(xp, gpu_mem, gpu_mask):
    """``(thresholds (B, K), valid (B, K))``: 0 and every memory size below the largest of each
    instance (the memory classes an item may be too big for)."""
    mem = xp.where(gpu_mask, gpu_mem, 0.0)
    srt = xp.sort(mem, axis=1)
    top = srt[:, -1:]
    prev = xp.concatenate([xp.full((srt.shape[0], 1), -1.0), srt[:, :-1]], axis=1)
    valid = (srt > 0) & (srt < top) & (srt != prev)
    th = xp.concatenate([xp.zeros((srt.shape[0], 1)), srt], axis=1)
    ok = xp.concatenate([xp.ones((srt.shape[0], 1), bool), valid], axis=1)
    return th, ok


def binpacking_bound(batch, lo, hi, iters: int = 24):
    """Raise the lower bounds ``lo`` (B,) by bisection on ``T`` with the packing relaxation of
    :func:`lanes_impossible`, one lane per instance and memory class; ``hi`` (B,) is any achieved
    max KVPR.  Returns (B,) float64."""
    xp = batch.xp
    go = xp.isfinite(hi) & (hi > lo) & (lo > 0)
    idx = xp.nonzero(go)[0]
    if idx.shape[0] == 0:
        return lo
    s, w, v = batch.sizes[idx], batch.demand[idx], batch.model_mask[idx]
    M, gm = batch.gpu_mem[idx], batch.gpu_mask[idx]
    th, ok = _memory_classes(xp, M, gm)
    lane_b, lane_k = xp.nonzero(ok)  # one lane per (instance, class)
    items, cap, bins, c = v[lane_b], M[lane_b], gm[lane_b], th[lane_b, lane_k]

    def impossible(T):
        a = s[lane_b] + w[lane_b] / T[lane_b][:, None]
        bad = lanes_impossible(xp, a, items, cap, bins, c)
        out = xp.zeros(T.shape[0], bool)
        out[lane_b[bad]] = True
        return out

    out = lo.copy()
    out[idx] = _bisect(xp, lo[idx], hi[idx], impossible, iters)
    return out


def lower_bound(batch, hi):
    """The bound reported for each instance of a plain batch: :func:`simple_bound` raised by
    :func:`binpacking_bound` below the achieved max KVPR ``hi`` (B,).  (B,) float64."""
    return binpacking_bound(batch, simple_bound(batch), hi)


# ----------------------------------------------------------------------------- rules


def _restricted_sets(p):
    """GPU sets the rules confine items to: every distinct allowed row (fewest GPUs first, at
    most 63 of them) and all GPUs.  (H, G) bool."""
    G = p.n_gpus
    rows = [np.ones(G, bool)]
    if p.allowed.shape[0]:
        uniq = np.unique(p.allowed.astype(bool), axis=0)
        uniq = uniq[np.argsort(uniq.sum(axis=1), kind="stable")]
        rows += [r for r in uniq if 0 < r.sum() < G][:63]
    return np.array(rows)


def problem_bound(p, hi: float, iters: int = 24) -> float:
    """A lower bound for a :class:`kvgpu.problem.Problem` that sees its rules (module doc);
    ``hi`` is any achieved max KVPR.  Returns a float (the plain items' bound when the problem
    has no pins or forbidden GPUs)."""
    from kvgpu.batch.state import batch_from_instances

    b = batch_from_instances([p.items])
    plain = float(lower_bound(b, np.array([hi]))[0])
    if not p.allowed.shape[0]:
        return plain
    s, w, M = p.items.sizes, p.items.demand, p.items.gpu_mem
    allowed = p.allowed.astype(bool)
    fixed = allowed.sum(axis=1) == 1
    fix_gpu = np.where(fixed, allowed.argmax(axis=1), -1)
    Sf = np.bincount(fix_gpu[fixed], weights=s[fixed], minlength=M.shape[0])
    Wf = np.bincount(fix_gpu[fixed], weights=w[fixed], minlength=M.shape[0])
    terms = [plain, float(bounded_div(np, Wf, M - Sf).max())]
    free = np.nonzero(~fixed)[0]
    if free.size:  # each free item on the allowed GPU where it would weigh least
        per = bounded_div(np, Wf[None, :] + w[free, None], M[None, :] - Sf[None, :] - s[free, None])
        terms.append(float(np.where(allowed[free], per, np.inf).min(axis=1).max()))
    sets = _restricted_sets(p)
    inside = (allowed[None, :, :] <= sets[:, None, :]).all(axis=2)  # (H, n): item confined to the set
    for H, mine in zip(sets, inside):  # the set's GPUs hold at least its confined items: mediants
        if not mine.any():
            continue
        order = np.argsort(-s[mine], kind="stable")
        ss, ws = s[mine][order], w[mine][order]
        mem = np.sort(M[H])[::-1]
        k = np.minimum(np.arange(1, ss.size + 1), mem.size)
        terms.append(float(bounded_div(np, np.cumsum(ws), np.cumsum(mem)[k - 1] - np.cumsum(ss)).max()))
    lo = max(terms)
    if not (np.isfinite(hi) and hi > lo > 0):
        return lo
    c_vals = np.concatenate([[0.0], np.unique(M)[:-1]])
    lane_h = np.repeat(np.arange(len(sets)), c_vals.size)
    c = np.tile(c_vals, len(sets))
    items = inside[lane_h] & ~fixed[None, :]
    bins = sets[lane_h]

    def impossible(T):
        t = float(T[0])
        a = s + w / t
        cap = M - np.bincount(fix_gpu[fixed], weights=a[fixed], minlength=M.shape[0])
        if (cap < -VOLUME_RTOL * M).any():
            return np.ones(1, bool)
        bad = lanes_impossible(np, np.broadcast_to(a, items.shape), items, np.broadcast_to(cap, bins.shape), bins, c)
        return np.array([bool(bad.any())])

    return float(_bisect(np, np.array([lo]), np.array([hi]), impossible, iters)[0])

"""numba CPU kernels: the whole seed pipeline per instance, compiled, instances in parallel.

Each instance runs the steps of :mod:`kvgpu.reference` as compiled scalar loops (one
``prange`` iteration per instance), calling the transfer arithmetic of
:mod:`kvgpu.kernels.deltas` compiled with ``numba.njit`` -- the same Python functions the
reference and the NumPy engine use, so every engine rounds identically and takes the same
decisions.  Compiled code is cached on disk (``cache=True``).

Conventions inside the kernels (one instance): ``s``, ``w`` (n,) sizes and demands, ``M`` (G,)
memories; a placement is ``assign`` (n,) GPU ids and ``pos`` (n,) insertion stamps (a GPU's list
order is its models sorted by stamp); ``S``, ``W`` (G,) per-GPU size and demand.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from kvgpu.kernels.jit import kernel
from kvgpu.kernels import deltas, params
from kvgpu.kernels.sorting import argsort_into, argsort_stable, sorted_desc
from kvgpu.kernels.rules import new_state, no_rules, restricted, transfer_apply, transfer_check

_jit = kernel(inline=True)
safe_div = _jit(deltas.safe_div)
transfer_loads = _jit(deltas.transfer_loads)
fits = _jit(deltas.fits)
transfer_new_max = _jit(deltas.transfer_new_max)

EPS = deltas.EPS
INF = math.inf
DEN_FLOOR = params.DEN_FLOOR
RESID, MINMAX, HYBRID = params.RESID, params.MINMAX, params.HYBRID
MOST_FREE, BEST_FIT, FIRST_FIT = params.MOST_FREE, params.BEST_FIT, params.FIRST_FIT
SIZE_ORDER = params.SIZE_ORDER
N_PAIR, N_TRIPLET, WINDOW = params.N_PAIR, params.N_TRIPLET, params.WINDOW
FEAS_ORDERING = np.array(params.FEAS_ORDERING)
FEAS_POLICY = np.array(params.FEAS_POLICY)
T_FACTORS = np.array(params.T_FACTORS)
R1, R2 = params.RETUNE_FRACTIONS
DUAL = params.DUAL_MOST_FREE_SHARE

njit = kernel()


# ----------------------------------------------------------------------------- small helpers

@njit
def _div(a, den):
    return a / max(den, DEN_FLOOR)


@njit
def _before(k0, k1, k2, i, j):
    """Does model ``i`` sort strictly before ``j`` in descending ``(k0, k1, k2)`` order?"""
    if k0[i] != k0[j]:
        return k0[i] > k0[j]
    if k1[i] != k1[j]:
        return k1[i] > k1[j]
    return k2[i] > k2[j]


@njit
def sort_desc(idx, k0, k1, k2):
    """``idx`` sorted by ``(k0, k1, k2)[idx]`` descending, stable (keys indexed by model).
    Short lists use an allocation-free insertion sort, long ones three stable argsorts."""
    out = idx.copy()
    n = out.shape[0]
    if n <= 48:
        for a in range(1, n):
            x = out[a]
            b = a
            while b > 0 and _before(k0, k1, k2, x, out[b - 1]):
                out[b] = out[b - 1]
                b -= 1
            out[b] = x
        return out
    for key in (k2, k1, k0):
        vals = np.empty(n)
        for j in range(n):
            vals[j] = -key[out[j]]
        out = out[argsort_stable(vals)]
    return out


@njit
def mem_prefix(M):
    """(G + 1,) sums of the ``k`` largest GPU memories, ``k = 0..G`` (GB)."""
    srt = sorted_desc(M)
    P = np.zeros(M.shape[0] + 1)
    for k in range(M.shape[0]):
        P[k + 1] = P[k] + srt[k]
    return P


@njit
def kvprs(S, W, M):
    """(G,) KVPR of each GPU from its size ``S``, demand ``W`` and memory ``M`` (G,)."""
    kv = np.empty(S.shape[0])
    for g in range(S.shape[0]):
        kv[g] = safe_div(W[g], M[g] - S[g])
    return kv


@njit
def top3(kv):
    """The three largest ``(v0, i0, v1, i1, v2, i2)`` (first id among equals), padded with
    ``(-inf, -1)``; scalars, so the hot loops allocate nothing."""
    v0 = v1 = v2 = -INF
    i0 = i1 = i2 = -1
    for g in range(kv.shape[0]):
        v = kv[g]
        if i0 < 0 or v > v0:
            v2, i2, v1, i1, v0, i0 = v1, i1, v0, i0, v, g
        elif i1 < 0 or v > v1:
            v2, i2, v1, i1 = v1, i1, v, g
        elif i2 < 0 or v > v2:
            v2, i2 = v, g
    return v0, i0, v1, i1, v2, i2


@njit
def max_excluding(t3, a, b):
    """Max KVPR over the GPUs other than ``a`` and ``b``, from :func:`top3` in O(1)."""
    v0, i0, v1, i1, v2, i2 = t3
    if i0 >= 0 and i0 != a and i0 != b:
        return v0
    if i1 >= 0 and i1 != a and i1 != b:
        return v1
    if i2 >= 0 and i2 != a and i2 != b:
        return v2
    return -INF


@njit
def argmax_first(v, skip):
    """The first index of the largest value of ``v``, skipping index ``skip`` (-1: none)."""
    best = -1
    for g in range(v.shape[0]):
        if g != skip and (best < 0 or v[g] > v[best]):
            best = g
    return best


@njit
def lex_less(a, b, n):
    """``a[:n] < b[:n]`` lexicographically, exactly (the seed's own candidate selection)."""
    for k in range(n):
        if a[k] < b[k]:
            return True
        if a[k] > b[k]:
            return False
    return False


@njit
def list_loads(assign, pos, s, w, G):
    """S, W summed in each GPU's list order (stamp order), as the reference sums its lists."""
    S = np.zeros(G)
    W = np.zeros(G)
    for i in argsort_stable(pos):
        if assign[i] >= 0:
            S[assign[i]] += s[i]
            W[assign[i]] += w[i]
    return S, W


@njit
def gpu_lists_into(assign, order, members, start):
    """Models grouped by GPU, into working memory (a counting sort, O(n + G)): GPU g's models are
    ``members[start[g]:start[g + 1]]`` in the sequence of ``order`` (n,) -- the index order, or
    the list order (models by insertion stamp) the seed's lists keep.  ``members`` (n,) and
    ``start`` (G + 1,) int64."""
    n = assign.shape[0]
    G = start.shape[0] - 1
    start[:] = 0
    for i in range(n):
        start[assign[i] + 1] += 1
    for g in range(G):
        start[g + 1] += start[g]
    for k in range(n - 1, -1, -1):  # from the back: start[g + 1] ends at g's first slot
        i = order[k]
        g = assign[i]
        start[g + 1] -= 1
        members[start[g + 1]] = i
    for g in range(G):
        start[g] = start[g + 1]
    start[G] = n


@njit
def _to_back(order, a, b):
    """``a`` then ``b`` (-1: none) to the end of the list order ``order`` (n,): they were just
    given the newest stamps."""
    k = 0
    for j in range(order.shape[0]):
        x = order[j]
        if x != a and x != b:
            order[k] = x
            k += 1
    order[k] = a
    if b >= 0:
        order[k + 1] = b


@njit
def _top_into(members, lo, hi, key, out):
    """The ``k = out.shape[0]`` (or fewer) of ``members[lo:hi]`` with the largest ``key``, largest
    first, equal keys in list order (a stable sort's first ``k``); returns how many."""
    k = 0
    for p in range(lo, hi):
        x = members[p]
        b = min(k, out.shape[0] - 1)
        if k == out.shape[0] and not key[x] > key[out[b]]:
            continue
        while b > 0 and key[x] > key[out[b - 1]]:
            out[b] = out[b - 1]
            b -= 1
        out[b] = x
        k = min(k + 1, out.shape[0])
    return k


@njit
def _two_lowest(kv, skip):
    """The two GPUs other than ``skip`` with the lowest KVPR, the first id among equals (a stable
    ascending sort's first two); -1 where there are fewer."""
    g1, g2 = -1, -1
    for g in range(kv.shape[0]):
        if g == skip:
            continue
        if g1 < 0 or kv[g] < kv[g1]:
            g1, g2 = g, g1
        elif g2 < 0 or kv[g] < kv[g2]:
            g2 = g
    return g1, g2


# ----------------------------------------------------------------------------- bounds

@njit
def _pair(s, w, order, P, n_top):
    best = 0.0
    k = min(order.shape[0], n_top)
    for a in range(k):
        i = order[a]
        for b in range(a + 1, k):
            j = order[b]
            if s[i] + s[j] > P[1]:
                best = max(best, _div(w[i] + w[j], P[2] - s[i] - s[j]))
    return best


@njit
def _triplet(s, w, order, P):
    n = min(order.shape[0], N_TRIPLET)
    best = 0.0
    for a in range(n):
        for b in range(a + 1, min(n, a + WINDOW + 1)):
            for c in range(b + 1, min(n, b + WINDOW + 1)):
                i, j, k = order[a], order[b], order[c]
                tot = s[i] + s[j] + s[k]
                if tot > P[2]:
                    best = max(best, _div(w[i] + w[j] + w[k], P[3] - tot))
    return best


@njit
def _kprefix(s, w, order, P, k_max):
    best = 0.0
    first = True
    for k in range(1, k_max + 1):
        ts = 0.0
        tw = 0.0
        for i in order:
            ts += s[i]
            tw += w[i]
            if ts > P[k - 1]:
                break
        v = _div(tw, P[k] - ts)
        if first or v > best:
            best = v
            first = False
    return best


@njit
def _individual(s, w, idx, m_max):
    best = 0.0
    for i in idx:
        best = max(best, _div(w[i], m_max - s[i]))
    return best


@njit
def start_bound(s, w, M):
    """The seed's ``low_T`` (see :func:`kvgpu.bounds.seed_start_bound`)."""
    G = M.shape[0]
    n = s.shape[0]
    P = mem_prefix(M)
    idx = np.arange(n)
    order = argsort_stable(-s)
    tw = 0.0
    ts = 0.0
    for i in range(n):
        tw += w[i]
        ts += s[i]
    b = max(_individual(s, w, idx, P[1]), _div(tw, P[G] - ts))
    b = max(b, _pair(s, w, order, P, N_PAIR))
    b = max(b, _kprefix(s, w, order, P, min(G, params.K_PREFIX_START)))
    if G >= 3:
        b = max(b, _triplet(s, w, order, P))
    return b


@njit
def _retune_bound(s, w, P, G, remaining, placed_size, first):
    tw = 0.0
    ts = 0.0
    for i in remaining:
        tw += w[i]
        ts += s[i]
    b = max(_individual(s, w, remaining, P[1]), _div(tw, P[G] - placed_size - ts))
    if first:
        order = sort_desc(remaining, s, s, s)  # by size, largest first, stable
        b = max(b, _pair(s, w, order, P, N_PAIR))
        b = max(b, _kprefix(s, w, order, P, min(G, params.K_PREFIX_RETUNE)))
    return b


# ----------------------------------------------------------------------------- packing

@njit
def _order_keys(s, w, T, m_max, ordering):
    n = s.shape[0]
    k0 = np.empty(n)
    k1 = np.empty(n)
    k2 = np.zeros(n)
    for i in range(n):
        if ordering == 0:
            k0[i], k1[i], k2[i] = w[i] + T * s[i], w[i], s[i]
        elif ordering == 1:
            k0[i], k1[i] = safe_div(w[i], m_max - s[i]), s[i]
        elif ordering == 2:
            k0[i], k1[i] = safe_div(w[i], s[i]), w[i]
        else:
            k0[i], k1[i] = s[i], w[i]
    return k0, k1, k2


@njit
def model_orders(s, w, P):
    """The T-independent model orderings 1, 2, 3 (row 0 is filled per pack, it depends on T)."""
    n = s.shape[0]
    out = np.empty((4, n), np.int64)
    for o in range(1, 4):
        k0, k1, k2 = _order_keys(s, w, 0.0, P[1], o)
        out[o] = sort_desc(np.arange(n), k0, k1, k2)
    return out


@njit
def _sum(x):
    tot = 0.0
    for v in x:
        tot += v
    return tot


@kernel(inline=True)
def choose_gpu(S, W, load, kv, M, M_total, si, wi, T, pol, parametric, key, best):
    """The GPU a pack puts the next model ``(si, wi)`` on, or -1 if it fits nowhere: the
    lexicographically least key of policy ``pol`` over the GPUs that fit (memory, and the
    transformed capacity ``T * M`` for parametric packs).  ``S``, ``W``, ``load``
    (``W + T S``), ``kv`` (G,) are the pack's running state; ``key``, ``best`` (5,) scratch.
    Plain scalar code: the CPU packs and the CUDA packing kernel both call it."""
    G = M.shape[0]
    t3 = top3(kv) if pol == MINMAX or pol == HYBRID else (0.0, -1, 0.0, -1, 0.0, -1)
    Tf = a = mean_frac = 0.0
    if pol == HYBRID:
        Tf = max(T, 1e-12)
        mean_kv = 0.0
        for g in range(G):
            mean_kv += kv[g]
        mean_kv /= G
        var = 0.0
        for g in range(G):
            var += (kv[g] - mean_kv) ** 2
        var /= G
        a = 0.25 if var < 0.02 * Tf * Tf else 0.15
        sumS = 0.0
        for g in range(G):
            sumS += S[g]
        mean_frac = (sumS + si) / M_total
    nk = 0
    best_g = -1
    for g in range(G):
        if not fits(S[g] + si, M[g]):
            continue
        resid = T * M[g] - (load[g] + wi + T * si)
        if parametric and resid < -EPS:
            continue
        free_after = M[g] - (S[g] + si)
        if pol == RESID:
            key[0], key[1] = resid, -free_after
            nk = 2
        elif pol == FIRST_FIT:
            nk = 0
        else:
            newlocal = safe_div(W[g] + wi, free_after)
            if pol == MOST_FREE or pol == BEST_FIT:
                key[0] = -free_after if pol == MOST_FREE else free_after
                key[1] = newlocal
                nk = 2
            else:
                newmax = max(newlocal, max_excluding(t3, g, g))
                if pol == MINMAX:
                    key[0], key[1], key[2], key[3] = newmax, newlocal, resid, -free_after
                    nk = 4
                else:
                    J = newmax / Tf + a * newlocal / Tf + 0.05 * abs((S[g] + si) / M[g] - mean_frac)
                    key[0], key[1], key[2], key[3], key[4] = J, newmax, newlocal, resid, -free_after
                    nk = 5
        if best_g < 0 or lex_less(key, best, nk):
            best_g = g
            for q in range(nk):
                best[q] = key[q]
    return best_g


@njit
def pack(s, w, M, P, orders, T, ordering, policy, n_most_free, assign, pos):
    """One pack (see :func:`kvgpu.reference.pack` and ``memory_pack``); fills ``assign``/``pos``
    and returns whether every model found a GPU.  ``P`` is :func:`mem_prefix` of ``M`` and
    ``orders`` comes from :func:`model_orders` (both computed once per instance)."""
    n = s.shape[0]
    G = M.shape[0]
    m_max = P[1]
    M_total = _sum(M)
    if ordering == 0:
        k0, k1, k2 = _order_keys(s, w, T, m_max, 0)
        order = sort_desc(np.arange(n), k0, k1, k2)
    else:
        order = orders[ordering]  # only ordering 0 is re-sorted in place
    S = np.zeros(G)
    W = np.zeros(G)
    load = np.zeros(G)
    kv = np.zeros(G)
    key = np.empty(5)
    best = np.empty(5)
    parametric = policy < MOST_FREE
    r1 = max(1, int(R1 * n))
    r2 = max(1, int(R2 * n))
    for k in range(n):
        i = order[k]
        si, wi = s[i], w[i]
        pol = MOST_FREE if k < n_most_free else policy
        best_g = choose_gpu(S, W, load, kv, M, M_total, si, wi, T, pol, parametric, key, best)
        if best_g < 0:
            return False
        g = best_g
        assign[i] = g
        pos[i] = k
        S[g] += si
        W[g] += wi
        load[g] += wi + T * si
        kv[g] = safe_div(W[g], M[g] - S[g])
        if parametric and k + 1 < n:
            for r in range(2):
                if k + 1 == (r1 if r == 0 else r2):
                    placed = 0.0
                    for h in range(G):
                        placed += S[h]
                    rem = order[k + 1:]
                    new_T = max(T, _retune_bound(s, w, P, G, rem, placed, r == 0))
                    if new_T > T + EPS:
                        T = new_T
                        for h in range(G):
                            load[h] = W[h] + T * S[h]
                        if ordering == 0 and r == 0:
                            q0, q1, q2 = _order_keys(s, w, T, m_max, 0)
                            order[k + 1:] = sort_desc(rem, q0, q1, q2)
    return True


@njit
def _feasible(s, w, M, P, orders, T, assign, pos):
    for v in range(7):
        if pack(s, w, M, P, orders, T, FEAS_ORDERING[v], FEAS_POLICY[v], np.int64(0), assign, pos):
            return True
    return False


@njit
def search_T(s, w, M, P, orders):
    """``T_high`` of the seed (``-1`` if no T packs): doubling then 40 bisection steps."""
    n = s.shape[0]
    assign = np.empty(n, np.int64)
    pos = np.empty(n, np.int64)
    lo = start_bound(s, w, M)
    T = max(lo, 1e-9)
    lo_known = T == lo
    hi = -1.0
    for _ in range(50):
        if _feasible(s, w, M, P, orders, T, assign, pos):
            hi = T
            break
        T *= 2
    if hi < 0:
        return -1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if mid == hi or (mid == lo and lo_known):
            continue  # the interval is one float wide: the answer is already known
        if _feasible(s, w, M, P, orders, mid, assign, pos):
            hi = mid
        else:
            lo = mid
            lo_known = True
    return hi


REGRET_KEEP = 32  # GPUs remembered per model by regret insertion (>= 3: one may be the argmax GPU)


@njit
def _newlocal(s, w, M, S, W, i, g):
    """KVPR of GPU ``g`` if model ``i`` joined it, or NaN if it does not fit."""
    if not fits(S[g] + s[i], M[g]):
        return np.nan
    return safe_div(W[g] + w[i], M[g] - (S[g] + s[i]))


@njit
def _keep_insert(lg, lv, i, cnt, g, nl):
    """Insert ``(nl, g)`` into model ``i``'s ascending list (ties: smaller g first) of length
    ``cnt``, dropping the last entry when full; returns the new length."""
    K = lg.shape[1]
    p = cnt
    while p > 0 and (lv[i, p - 1] > nl or (lv[i, p - 1] == nl and lg[i, p - 1] > g)):
        p -= 1
    if p >= K:
        return cnt
    last = min(cnt, K - 1)
    for q in range(last, p, -1):
        lg[i, q] = lg[i, q - 1]
        lv[i, q] = lv[i, q - 1]
    lg[i, p] = g
    lv[i, p] = nl
    return min(cnt + 1, K)


@njit
def _rescan(s, w, M, S, W, lg, lv, i):
    """Refill model ``i``'s list with its smallest ``(newlocal, g)`` over the GPUs it fits on;
    returns ``(length, holds_every_fitting_gpu)``."""
    cnt = 0
    n_fit = 0
    for g in range(M.shape[0]):
        nl = _newlocal(s, w, M, S, W, i, g)
        if nl == nl:  # fits
            n_fit += 1
            cnt = _keep_insert(lg, lv, i, cnt, g, nl)
    return cnt, n_fit <= lg.shape[1]


@njit
def regret_insertion(s, w, M, assign, pos):
    """Regret insertion (see :func:`kvgpu.reference.regret_insertion`) in O(N^2 + N G) rather than
    O(N^2 G): a GPU's resulting max KVPR is ``max(newlocal, max over the other GPUs)``, so for
    every GPU except the current argmax the order by (newmax, newlocal, id) is the order by
    (newlocal, id).  Each model therefore remembers its few smallest ``(newlocal, g)``; a placement
    changes only the receiving GPU's entries (O(1) per model) and a model's list is rebuilt only
    when fewer than three entries remain known.  Decisions equal the reference's."""
    n = s.shape[0]
    G = M.shape[0]
    S = np.zeros(G)
    W = np.zeros(G)
    kv = np.zeros(G)
    placed = np.zeros(n, np.bool_)
    lg = np.empty((n, REGRET_KEEP), np.int64)
    lv = np.empty((n, REGRET_KEEP))
    cnt = np.zeros(n, np.int64)
    all_in = np.zeros(n, np.bool_)
    for i in range(n):
        cnt[i], all_in[i] = _rescan(s, w, M, S, W, lg, lv, i)
    for k in range(n):
        v0, i0, v1, i1, v2, i2 = top3(kv)
        other_top = v1 if i1 >= 0 else -INF  # max over GPUs other than i0
        pick, pick_g = -1, -1
        best_regret, best_newmax = -INF, INF
        for i in range(n):
            if placed[i]:
                continue
            # up to three options: the two best GPUs other than i0, and i0 itself
            g1 = g2 = -1
            m1 = l1 = m2 = l2 = INF
            taken = 0
            for q in range(cnt[i] + 1):
                if q < cnt[i]:
                    g, nl = lg[i, q], lv[i, q]
                    if g == i0:
                        continue
                    if taken == 2:
                        continue
                    taken += 1
                    nm = max(nl, v0)
                else:
                    g = i0
                    nl = _newlocal(s, w, M, S, W, i, i0) if i0 >= 0 else np.nan
                    if nl != nl:
                        continue
                    nm = max(nl, other_top)
                if g1 < 0 or nm < m1 or (nm == m1 and (nl < l1 or (nl == l1 and g < g1))):
                    g2, m2, l2 = g1, m1, l1
                    g1, m1, l1 = g, nm, nl
                elif g2 < 0 or nm < m2 or (nm == m2 and (nl < l2 or (nl == l2 and g < g2))):
                    g2, m2, l2 = g, nm, nl
            if g1 < 0:
                continue
            second = m2 if g2 >= 0 else INF
            regret = second - m1  # inf - inf is NaN, and NaN never wins below
            if regret > best_regret or (regret == best_regret and m1 < best_newmax):
                pick, pick_g, best_regret, best_newmax = i, g1, regret, m1
        if pick < 0:
            return False
        placed[pick] = True
        assign[pick] = pick_g
        pos[pick] = k
        gp = pick_g
        S[gp] += s[pick]
        W[gp] += w[pick]
        kv[gp] = safe_div(W[gp], M[gp] - S[gp])
        for i in range(n):  # only GPU gp changed: update each model's remembered entry for it
            if placed[i]:
                continue
            at = -1
            for q in range(cnt[i]):
                if lg[i, q] == gp:
                    at = q
            if at < 0:
                continue  # gp's key only grew: it stays behind every remembered entry
            for q in range(at, cnt[i] - 1):
                lg[i, q] = lg[i, q + 1]
                lv[i, q] = lv[i, q + 1]
            cnt[i] -= 1
            nl = _newlocal(s, w, M, S, W, i, gp)
            last = cnt[i] - 1
            if nl == nl and (all_in[i] or (last >= 0 and (nl < lv[i, last] or (nl == lv[i, last] and gp < lg[i, last])))):
                cnt[i] = _keep_insert(lg, lv, i, cnt[i], gp, nl)
            if cnt[i] < 3 and not all_in[i]:
                cnt[i], all_in[i] = _rescan(s, w, M, S, W, lg, lv, i)
    return True


# ----------------------------------------------------------------------------- local search

@njit
def _eval(S, W, M, s, w, src, dst, a, b, others):
    """New global max of moving ``a`` src -> dst (and ``b`` back when ``b >= 0``); NaN flags a
    transfer that does not fit (``NaN + EPS < x`` is False, so it is never accepted)."""
    s_in = s[b] if b >= 0 else 0.0
    w_in = w[b] if b >= 0 else 0.0
    Ss, Ws, Sd, Wd = transfer_loads(S[src], W[src], S[dst], W[dst], s[a], w[a], s_in, w_in)
    if not (fits(Ss, M[src]) and fits(Sd, M[dst])):
        return np.nan
    return transfer_new_max(safe_div(Ws, M[src] - Ss), safe_div(Wd, M[dst] - Sd), others)


@njit
def _apply(S, W, kv, M, s, w, assign, pos, stamp, src, dst, a, b):
    s_in = s[b] if b >= 0 else 0.0
    w_in = w[b] if b >= 0 else 0.0
    S[src], W[src], S[dst], W[dst] = transfer_loads(S[src], W[src], S[dst], W[dst], s[a], w[a], s_in, w_in)
    assign[a] = dst
    pos[a] = stamp
    if b >= 0:
        assign[b] = src
        pos[b] = stamp + 1
    kv[src] = safe_div(W[src], M[src] - S[src])
    kv[dst] = safe_div(W[dst], M[dst] - S[dst])
    return stamp + 2


@njit
def _state(s, w, M, assign, pos):
    """Per-GPU ``S``, ``W`` (list-order sums), KVPR, and the next insertion stamp."""
    S, W = list_loads(assign, pos, s, w, M.shape[0])
    stamp = pos.max() + 1 if pos.shape[0] else 0
    return S, W, kvprs(S, W, M), stamp


@kernel(inline=True)
def _allowed(rules, rstate, src, dst, a, b):
    """Does the transfer of ``a`` src -> dst (and ``b`` back, -1: none) keep the cluster's rules
    and migration budget (:mod:`kvgpu.kernels.rules`)?  Always True without rules, so the seed
    pipeline takes its own decisions."""
    if not restricted(rules):
        return True
    return transfer_check(rules, rstate, src, dst, a, np.int64(-1), b, np.int64(-1))[0]


@njit
def _apply_ruled(S, W, kv, M, s, w, assign, pos, order, stamp, src, dst, a, b, rules, rstate):
    transfer_apply(rules, rstate, src, dst, a, np.int64(-1), b, np.int64(-1))
    _to_back(order, a, b)
    return _apply(S, W, kv, M, s, w, assign, pos, stamp, src, dst, a, b)


#: :func:`best_swap` scans every pair below this many (the window's sort is not worth it).
SWAP_WINDOW_PAIRS = 4096


@njit
def _swap_row(S, W, M, s, w, src, dst, a, others, best, mem, q_lo, q_hi, rules, rstate):
    """The seed's record scan of one row: model ``a`` of ``src`` against ``dst``'s list
    positions ``mem[q]`` for ``q`` in ``[q_lo, q_hi)`` in list order.  ``(best, b)``, ``b = -1``
    where no pair beats ``best``."""
    bb = -1
    for q in range(q_lo, q_hi):
        new = _eval(S, W, M, s, w, src, dst, a, mem[q], others)
        if new + EPS < best and _allowed(rules, rstate, src, dst, a, mem[q]):
            best, bb = new, mem[q]
    return best, bb


@njit
def best_swap(S, W, M, s, w, src, dst, others, best, mem, start, keys, idx, tmp, rules, rstate):
    """The best swap of a model of GPU ``src`` with one of ``dst`` -- the seed's scan of every pair
    in list order (rows: ``src``'s models), keeping each pair whose new max KVPR beats the best so
    far by ``EPS``: ``(a, b)``, or ``(-1, -1)``.

    The same decision in far fewer evaluations on long lists: a pair beats ``B0 = best`` only if
    both GPUs end below ``B0``, which (all demands positive, so a GPU's KVPR is finite exactly when
    it has room left) reads ``key(a) + W_dst - B0 F_dst < key(b) < key(a) + B0 F_src - W_src`` with
    ``key(x) = w_x + B0 s_x`` and ``F`` the free GB.  ``dst``'s models sorted by ``key`` give each
    row's candidates as one range, widened by a relative 1e-7 against rounding; they are scanned in
    list order with the exact test, and every other pair fails it.  A row whose range holds more
    than an eighth of the list is scanned whole.  ``keys`` (n,) float64, ``idx``, ``tmp`` (n,) int64
    working memory; ``mem``/``start`` the GPU lists (:func:`gpu_lists_into`)."""
    p_lo, p_hi = start[src], start[src + 1]
    q_lo, q_hi = start[dst], start[dst + 1]
    m = q_hi - q_lo
    ba, bb = -1, -1
    if others + EPS >= best:  # the new max is at least the other GPUs' max: nothing can beat best
        return ba, bb
    positive = True
    for p in range(p_lo, p_hi):
        positive = positive and w[mem[p]] > 0.0
    for q in range(q_lo, q_hi):
        positive = positive and w[mem[q]] > 0.0
    if (p_hi - p_lo) * m < SWAP_WINDOW_PAIRS or not positive:
        for p in range(p_lo, p_hi):
            best, b = _swap_row(S, W, M, s, w, src, dst, mem[p], others, best, mem, q_lo, q_hi, rules, rstate)
            if b >= 0:
                ba, bb = mem[p], b
        return ba, bb
    B0 = best
    k, order, work = keys[:m], idx[:m], tmp[:m]
    for q in range(m):
        j = mem[q_lo + q]
        k[q] = w[j] + B0 * s[j]
    argsort_into(k, order, work)
    lo_off = W[dst] - B0 * (M[dst] - S[dst])
    hi_off = B0 * (M[src] - S[src]) - W[src]
    slack = 1e-7 * (1.0 + abs(W[src]) + abs(W[dst]) + B0 * (abs(M[src]) + abs(M[dst]) + abs(S[src]) + abs(S[dst])))
    for p in range(p_lo, p_hi):
        a = mem[p]
        ka = w[a] + B0 * s[a]
        lo = _first_above(k, order, ka + lo_off - slack - 1e-7 * abs(ka))
        hi = _first_above(k, order, ka + hi_off + slack + 1e-7 * abs(ka))
        if hi <= lo:
            continue
        if 8 * (hi - lo) > m:
            best, b = _swap_row(S, W, M, s, w, src, dst, a, others, best, mem, q_lo, q_hi, rules, rstate)
        else:
            cand = work[:hi - lo]
            for c in range(hi - lo):
                cand[c] = order[lo + c]
            _insertion_sort(cand)  # list order
            b = -1
            for c in range(hi - lo):
                q = q_lo + cand[c]
                new = _eval(S, W, M, s, w, src, dst, a, mem[q], others)
                if new + EPS < best and _allowed(rules, rstate, src, dst, a, mem[q]):
                    best, b = new, mem[q]
        if b >= 0:
            ba, bb = a, b
    return ba, bb


@njit
def _first_above(k, order, x):
    """The first position ``i`` of the ascending ``k[order]`` with ``k[order[i]] > x``."""
    lo, hi = 0, order.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if k[order[mid]] > x:
            hi = mid
        else:
            lo = mid + 1
    return lo


@njit
def _insertion_sort(x):
    for i in range(1, x.shape[0]):
        v = x[i]
        j = i
        while j > 0 and x[j - 1] > v:
            x[j] = x[j - 1]
            j -= 1
        x[j] = v


@njit
def improve_local(s, w, M, assign, pos, max_iters, rules, rstate):
    """In place; see :func:`kvgpu.reference.improve_local`.  Only transfers that keep ``rules``
    (pins, anti-affinity, nodes, the migration budget; ``rstate`` their bookkeeping, updated)
    are considered; without rules this is the seed's step exactly."""
    G = M.shape[0]
    S, W, kv, stamp = _state(s, w, M, assign, pos)
    mem, start, order = np.empty(s.shape[0], np.int64), np.empty(G + 1, np.int64), argsort_stable(pos)
    for _ in range(max_iters):
        worst = argmax_first(kv, np.int64(-1))
        t3 = top3(kv)
        gpu_lists_into(assign, order, mem, start)
        best = kv[worst]
        ba, bd = -1, -1
        for p in range(start[worst], start[worst + 1]):
            a = mem[p]
            for d in range(G):
                if d == worst:
                    continue
                new = _eval(S, W, M, s, w, worst, d, a, np.int64(-1), max_excluding(t3, worst, d))
                if new + EPS < best and _allowed(rules, rstate, worst, d, a, np.int64(-1)):
                    best, ba, bd = new, a, d
        bb = -1
        if ba < 0:
            cur = kv[worst]
            for p in range(start[worst], start[worst + 1]):
                a = mem[p]
                for d in range(G):
                    if d == worst:
                        continue
                    others = max_excluding(t3, worst, d)
                    for q in range(start[d], start[d + 1]):
                        new = _eval(S, W, M, s, w, worst, d, a, mem[q], others)
                        if new + EPS < cur and _allowed(rules, rstate, worst, d, a, mem[q]):
                            ba, bd, bb = a, d, mem[q]
                            break
                    if ba >= 0:
                        break
                if ba >= 0:
                    break
        if ba < 0:
            break
        stamp = _apply_ruled(S, W, kv, M, s, w, assign, pos, order, stamp, worst, bd, ba, bb, rules, rstate)
    if G > 1:
        keys, idx, tmp = np.empty(s.shape[0]), np.empty(s.shape[0], np.int64), np.empty(s.shape[0], np.int64)
        for _ in range(12):
            worst = argmax_first(kv, np.int64(-1))
            second = argmax_first(kv, worst)
            t3 = top3(kv)
            gpu_lists_into(assign, order, mem, start)
            ba, bb = best_swap(S, W, M, s, w, worst, second, max_excluding(t3, worst, second), kv[worst], mem, start,
                               keys, idx, tmp, rules, rstate)
            if ba < 0:
                break
            stamp = _apply_ruled(S, W, kv, M, s, w, assign, pos, order, stamp, worst, second, ba, bb, rules, rstate)


@njit
def refine_peak(s, w, M, assign, pos, passes, top_k, rules, rstate):
    """In place; see :func:`kvgpu.reference.refine_peak`.  Donations that break ``rules`` are
    skipped (see :func:`improve_local`)."""
    G = M.shape[0]
    S, W, kv, stamp = _state(s, w, M, assign, pos)
    mem, start, order = np.empty(s.shape[0], np.int64), np.empty(G + 1, np.int64), argsort_stable(pos)
    by_w = np.empty(max(1, top_k // 2), np.int64)
    by_s = np.empty(max(1, top_k), np.int64)
    targets = np.empty(2, np.int64)
    for _ in range(passes):
        worst = argmax_first(kv, np.int64(-1))
        targets[0], targets[1] = _two_lowest(kv, worst)
        nt = 0 if targets[0] < 0 else (1 if targets[1] < 0 else 2)
        gpu_lists_into(assign, order, mem, start)
        lo, hi = start[worst], start[worst + 1]
        if nt == 0 or hi == lo:
            break
        nw = _top_into(mem, lo, hi, w, by_w)
        ns = _top_into(mem, lo, hi, s, by_s[:max(1, top_k - nw)])
        t3 = top3(kv)
        best = kv[worst]
        ba, bd = -1, -1
        for j in range(nw + ns):
            a = by_w[j] if j < nw else by_s[j - nw]
            if j >= nw and (by_w[:nw] == a).any():
                continue
            for t in range(nt):
                d = targets[t]
                new = _eval(S, W, M, s, w, worst, d, a, np.int64(-1), max_excluding(t3, worst, d))
                if new + EPS < best and _allowed(rules, rstate, worst, d, a, np.int64(-1)):
                    best, ba, bd = new, a, d
        if ba < 0:
            break
        stamp = _apply_ruled(S, W, kv, M, s, w, assign, pos, order, stamp, worst, bd, ba, np.int64(-1), rules, rstate)


# ----------------------------------------------------------------------------- pipeline

@njit
def score_of(s, w, M, assign, pos, out):
    """The score ``(max, second, mean KVPR)`` of a placement into ``out`` (3,)."""
    S, W = list_loads(assign, pos, s, w, M.shape[0])
    kv = kvprs(S, W, M)
    G = kv.shape[0]
    srt = sorted_desc(kv)
    tot = 0.0
    for g in range(G):
        tot += kv[g]
    out[0] = srt[0]
    out[1] = srt[1] if G > 1 else 0.0
    out[2] = tot / G


@njit
def seed_instance(s, w, M, assign, pos):
    """The seed pipeline on one instance; fills ``assign``/``pos``; False if nothing packed."""
    n = s.shape[0]
    if n == 0:
        return True
    C = 60
    ca = np.empty((C, n), np.int64)
    cp = np.empty((C, n), np.int64)
    nc = 0
    P = mem_prefix(M)
    orders = model_orders(s, w, P)
    T_high = search_T(s, w, M, P, orders)
    if T_high > 0:
        for f in range(6):
            for policy in range(3):
                for ordering in range(3):
                    if pack(s, w, M, P, orders, T_high * T_FACTORS[f], np.int64(ordering), np.int64(policy), np.int64(0),
                            ca[nc], cp[nc]):
                        nc += 1
    if regret_insertion(s, w, M, ca[nc], cp[nc]):
        nc += 1
    if pack(s, w, M, P, orders, 0.0, np.int64(SIZE_ORDER), np.int64(BEST_FIT), np.int64(DUAL * n), ca[nc], cp[nc]):
        nc += 1
    if pack(s, w, M, P, orders, 0.0, np.int64(2), np.int64(BEST_FIT), np.int64(0), ca[nc], cp[nc]):
        nc += 1
    if nc == 0:
        for policy in (BEST_FIT, MOST_FREE, FIRST_FIT):
            if pack(s, w, M, P, orders, 0.0, np.int64(SIZE_ORDER), np.int64(policy), np.int64(0), ca[0], cp[0]):
                nc = 1
                break
    if nc == 0:
        return False
    rules = no_rules()
    rstate = new_state(rules, assign, M.shape[0])
    sc = np.empty((nc, 3))
    starts_a = ca[:nc].copy()
    starts_p = cp[:nc].copy()
    pick = -1
    for c in range(nc):
        dup = -1  # improve_local is deterministic: an identical start gives the identical result
        for e in range(c):
            if (starts_a[e] == starts_a[c]).all() and (starts_p[e] == starts_p[c]).all():
                dup = e
                break
        if dup >= 0:
            ca[c] = ca[dup]
            cp[c] = cp[dup]
            sc[c] = sc[dup]
        else:
            improve_local(s, w, M, ca[c], cp[c], 4000, rules, rstate)
            score_of(s, w, M, ca[c], cp[c], sc[c])
        if pick < 0 or lex_less(sc[c], sc[pick], 3):
            pick = c
    assign[:] = ca[pick]
    pos[:] = cp[pick]
    refine_peak(s, w, M, assign, pos, 2, 12, rules, rstate)
    improve_local(s, w, M, assign, pos, 1500, rules, rstate)
    return True


@kernel(parallel=True)
def seed_batch(sizes, demand, gpu_mem, n_models, n_gpus, assign, pos, ok):
    """The seed pipeline for every instance of a compacted batch (real entries first), in parallel.

    sizes, demand (B, N) float64; gpu_mem (B, G) float64; n_models, n_gpus (B,) int64;
    outputs assign, pos (B, N) int64 (-1 for padding) and ok (B,) bool."""
    for b in prange(sizes.shape[0]):
        n, G = n_models[b], n_gpus[b]
        ok[b] = seed_instance(sizes[b, :n], demand[b, :n], gpu_mem[b, :G], assign[b, :n], pos[b, :n])

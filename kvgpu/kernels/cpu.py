"""numba CPU kernels: the whole seed pipeline per instance, compiled, instances in parallel.

Each instance runs the steps of :mod:`kvgpu.reference` as compiled scalar loops (one
``prange`` iteration per instance), calling the transfer arithmetic of
:mod:`kvgpu.kernels.deltas` compiled with ``numba.njit`` -- the same Python functions the
reference and the NumPy engine use, so every engine rounds identically and takes the same
decisions.  Compiled code is cached on disk (``cache=True``).

Conventions inside the kernels (one instance): ``s``, ``w`` (n,) sizes and demands, ``M`` (G,)
memories; a placement is ``assign`` (n,) GPU ids and ``pos`` (n,) insertion stamps (a GPU's list
order is its models sorted by stamp); ``S``, ``W`` (G,) per-GPU size and demand.

One source, two targets: the ``*_core`` functions allocate nothing -- their working memory is
``fw`` (float64) and ``iw`` (int64), flat arrays of at least :func:`seed_work` entries, each
function taking a prefix for itself and handing the rest to its callees -- and use no NumPy
sorts, no exceptions and no recursion, so :func:`kvgpu.kernels.jit.device` compiles them as CUDA
device functions too.  A core run by the ``nt`` threads of a CUDA block is called by every
thread with its index ``tid``: the threads share the scans of :func:`improve_local_core` and
:func:`refine_peak_core` and thread 0 takes every other step, between barriers; the CPU calls
it with ``(0, 1)``.  Where the serial loop's rule is a chain ("beats the best so far"), the
threads write the values and thread 0 walks them in the serial order with that rule.  The
functions without ``_core`` are the CPU entry points: they allocate and call the core.  Those
called only from Python (tests, the engine for one instance, :mod:`kvgpu.warmup`) are plain
Python functions: numba optimises a compiled function together with everything it calls, so a
compiled entry would optimise its core once more on a first run (1-3 CPU-seconds each) for no
speed; compiled callers call the cores.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from kvgpu.kernels.jit import barrier, kernel
from kvgpu.kernels import deltas, params
from kvgpu.kernels.deltas import fmul
from kvgpu.kernels.sorting import argsort_into, insertion_sort
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
def sort_desc_inplace(out, k0, k1, k2, fw, iw):
    """Sort the model ids ``out`` (m,) in place by ``(k0, k1, k2)[out]`` descending, stable
    (keys indexed by model).  Short lists by an insertion sort, long ones by three stable
    merge sorts.  ``out`` may be a view of the list being reordered; fw (m,), iw (3m,)."""
    n = out.shape[0]
    if n <= 48:
        for a in range(1, n):
            x = out[a]
            b = a
            while b > 0 and _before(k0, k1, k2, x, out[b - 1]):
                out[b] = out[b - 1]
                b -= 1
            out[b] = x
        return
    vals = fw[:n]
    perm, tmp, cp = iw[:n], iw[n:2 * n], iw[2 * n:3 * n]
    for r in range(3):  # least significant key first: stable sorts compose
        key = k2 if r == 0 else (k1 if r == 1 else k0)
        for j in range(n):
            vals[j] = -key[out[j]]
        argsort_into(vals, perm, tmp)
        for j in range(n):
            cp[j] = out[perm[j]]
        for j in range(n):
            out[j] = cp[j]


@njit
def sort_desc(idx, k0, k1, k2):
    """``idx`` sorted by ``(k0, k1, k2)[idx]`` descending, stable (a new array; CPU entry of
    :func:`sort_desc_inplace`)."""
    n = idx.shape[0]
    out = idx.copy()
    sort_desc_inplace(out, k0, k1, k2, np.empty(n), np.empty(3 * n, np.int64))
    return out


@njit
def mem_prefix_into(M, P, iw):
    """``P`` (G + 1,) = sums of the ``k`` largest GPU memories, ``k = 0..G`` (GB); iw (2G,)."""
    G = M.shape[0]
    idx = iw[:G]
    argsort_into(M, idx, iw[G:2 * G])
    P[0] = 0.0
    for k in range(G):
        P[k + 1] = P[k] + M[idx[G - 1 - k]]


def mem_prefix(M):
    """(G + 1,) sums of the ``k`` largest GPU memories (CPU entry of :func:`mem_prefix_into`)."""
    P = np.empty(M.shape[0] + 1)
    mem_prefix_into(M, P, np.empty(2 * M.shape[0], np.int64))
    return P


@njit
def kvprs_into(S, W, M, kv):
    """``kv`` (G,) = KVPR of each GPU from its size ``S``, demand ``W`` and memory ``M`` (G,)."""
    for g in range(S.shape[0]):
        kv[g] = safe_div(W[g], M[g] - S[g])


@njit
def kvprs(S, W, M):
    """(G,) KVPR of each GPU (a new array; see :func:`kvprs_into`)."""
    kv = np.empty(S.shape[0])
    kvprs_into(S, W, M, kv)
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
def list_loads_into(assign, pos, s, w, S, W, order, tmp):
    """``S``, ``W`` (G,) summed in each GPU's list order (stamp order), as the reference sums
    its lists; ``order`` (n,) int64 receives that order (the stable argsort of ``pos``), ``tmp``
    (n,) int64 is working memory."""
    for g in range(S.shape[0]):
        S[g] = 0.0
        W[g] = 0.0
    argsort_into(pos, order, tmp)
    for k in range(order.shape[0]):
        i = order[k]
        if assign[i] >= 0:
            S[assign[i]] += s[i]
            W[assign[i]] += w[i]


@njit
def list_loads(assign, pos, s, w, G):
    """S, W (G,) summed in each GPU's list order (new arrays; see :func:`list_loads_into`)."""
    S = np.empty(G)
    W = np.empty(G)
    n = assign.shape[0]
    list_loads_into(assign, pos, s, w, S, W, np.empty(n, np.int64), np.empty(n, np.int64))
    return S, W


@njit
def next_stamp(pos):
    """The stamp after the newest of ``pos`` (n,) (0 for no models)."""
    top = -1
    for i in range(pos.shape[0]):
        top = max(top, pos[i])
    return top + 1


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
        for q in range(order.shape[0]):
            i = order[q]
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
    for q in range(idx.shape[0]):
        i = idx[q]
        best = max(best, _div(w[i], m_max - s[i]))
    return best


@njit
def start_bound_core(s, w, M, fw, iw):
    """The seed's ``low_T`` (see :func:`kvgpu.bounds.seed_start_bound`); fw (G + 1 + n,),
    iw (3n + 2G,)."""
    G = M.shape[0]
    n = s.shape[0]
    P = fw[:G + 1]
    neg = fw[G + 1:G + 1 + n]
    order, idx = iw[:n], iw[n:2 * n]
    mem_prefix_into(M, P, iw[2 * n:])
    for i in range(n):
        neg[i] = -s[i]
        idx[i] = i
    argsort_into(neg, order, iw[2 * n:3 * n])
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
def start_bound(s, w, M):
    """The seed's ``low_T`` (CPU entry of :func:`start_bound_core`)."""
    n, G = s.shape[0], M.shape[0]
    return start_bound_core(s, w, M, np.empty(G + 1 + n), np.empty(3 * n + 2 * G, np.int64))


@njit
def _retune_bound(s, w, P, G, remaining, placed_size, first, fw, iw):
    """fw (m,), iw (4m,) for the ``m`` remaining models."""
    tw = 0.0
    ts = 0.0
    for q in range(remaining.shape[0]):
        tw += w[remaining[q]]
        ts += s[remaining[q]]
    b = max(_individual(s, w, remaining, P[1]), _div(tw, P[G] - placed_size - ts))
    if first:
        m = remaining.shape[0]
        order = iw[:m]
        for q in range(m):
            order[q] = remaining[q]
        sort_desc_inplace(order, s, s, s, fw, iw[m:])  # by size, largest first, stable
        b = max(b, _pair(s, w, order, P, N_PAIR))
        b = max(b, _kprefix(s, w, order, P, min(G, params.K_PREFIX_RETUNE)))
    return b


# ----------------------------------------------------------------------------- packing

@njit
def _order_keys(s, w, T, m_max, ordering, k0, k1, k2):
    """The sort keys of model ordering ``ordering`` into ``k0``, ``k1``, ``k2`` (n,)."""
    for i in range(s.shape[0]):
        k2[i] = 0.0
        if ordering == 0:
            k0[i], k1[i], k2[i] = w[i] + fmul(T, s[i]), w[i], s[i]
        elif ordering == 1:
            k0[i], k1[i] = safe_div(w[i], m_max - s[i]), s[i]
        elif ordering == 2:
            k0[i], k1[i] = safe_div(w[i], s[i]), w[i]
        else:
            k0[i], k1[i] = s[i], w[i]


@njit
def model_orders_into(s, w, P, orders, fw, iw):
    """The T-independent model orderings 1, 2, 3 into ``orders`` (4n,) int64, ordering ``o`` at
    ``orders[o n:(o + 1) n]`` (row 0 is filled per pack: it depends on T); fw (4n,), iw (3n,)."""
    n = s.shape[0]
    k0, k1, k2 = fw[:n], fw[n:2 * n], fw[2 * n:3 * n]
    for o in range(1, 4):
        _order_keys(s, w, 0.0, P[1], o, k0, k1, k2)
        row = orders[o * n:(o + 1) * n]
        for i in range(n):
            row[i] = i
        sort_desc_inplace(row, k0, k1, k2, fw[3 * n:], iw)


def model_orders(s, w, P):
    """(4, n) the orderings of :func:`model_orders_into` (CPU entry)."""
    n = s.shape[0]
    out = np.zeros(4 * n, np.int64)
    model_orders_into(s, w, P, out, np.empty(4 * n), np.empty(3 * n, np.int64))
    return out.reshape((4, n))


@njit
def _sum(x):
    tot = 0.0
    for k in range(x.shape[0]):
        tot += x[k]
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
            dv = kv[g] - mean_kv
            var += fmul(dv, dv)
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
        resid = fmul(T, M[g]) - (load[g] + wi + fmul(T, si))
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
                    J = newmax / Tf + a * newlocal / Tf + fmul(0.05, abs((S[g] + si) / M[g] - mean_frac))
                    key[0], key[1], key[2], key[3], key[4] = J, newmax, newlocal, resid, -free_after
                    nk = 5
        if best_g < 0 or lex_less(key, best, nk):
            best_g = g
            for q in range(nk):
                best[q] = key[q]
    return best_g


@njit
def pack_core(s, w, M, P, orders, T, ordering, policy, n_most_free, assign, pos, fw, iw):
    """One pack (see :func:`kvgpu.reference.pack` and ``memory_pack``); fills ``assign``/``pos``
    and returns whether every model found a GPU.  ``P`` is :func:`mem_prefix` of ``M`` and
    ``orders`` (4n,) comes from :func:`model_orders_into` (both computed once per instance).
    fw (4G + 10 + 4n,), iw (5n,)."""
    n = s.shape[0]
    G = M.shape[0]
    m_max = P[1]
    M_total = _sum(M)
    S, W, load, kv = fw[:G], fw[G:2 * G], fw[2 * G:3 * G], fw[3 * G:4 * G]
    key, best = fw[4 * G:4 * G + 5], fw[4 * G + 5:4 * G + 10]
    k0, k1, k2 = fw[4 * G + 10:4 * G + 10 + n], fw[4 * G + 10 + n:4 * G + 10 + 2 * n], fw[4 * G + 10 + 2 * n:4 * G + 10 + 3 * n]
    f_rest = fw[4 * G + 10 + 3 * n:]
    i_rest = iw[n:]
    if ordering == 0:
        order = iw[:n]
        _order_keys(s, w, T, m_max, 0, k0, k1, k2)
        for i in range(n):
            order[i] = i
        sort_desc_inplace(order, k0, k1, k2, f_rest, i_rest)
    else:
        order = orders[ordering * n:(ordering + 1) * n]  # only ordering 0 is re-sorted in place
    for g in range(G):
        S[g] = 0.0
        W[g] = 0.0
        load[g] = 0.0
        kv[g] = 0.0
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
        load[g] += wi + fmul(T, si)
        kv[g] = safe_div(W[g], M[g] - S[g])
        if parametric and k + 1 < n:
            for r in range(2):
                if k + 1 == (r1 if r == 0 else r2):
                    placed = 0.0
                    for h in range(G):
                        placed += S[h]
                    rem = order[k + 1:]
                    new_T = max(T, _retune_bound(s, w, P, G, rem, placed, r == 0, f_rest, i_rest))
                    if new_T > T + EPS:
                        T = new_T
                        for h in range(G):
                            load[h] = W[h] + fmul(T, S[h])
                        if ordering == 0 and r == 0:
                            _order_keys(s, w, T, m_max, 0, k0, k1, k2)
                            sort_desc_inplace(rem, k0, k1, k2, f_rest, i_rest)
    return True


def pack(s, w, M, P, orders, T, ordering, policy, n_most_free, assign, pos):
    """One pack (CPU entry of :func:`pack_core`; ``orders`` (4, n) from :func:`model_orders`)."""
    n, G = s.shape[0], M.shape[0]
    return pack_core(s, w, M, P, orders.ravel(), T, ordering, policy, n_most_free, assign, pos,
                     np.empty(4 * G + 10 + 4 * n), np.empty(5 * n, np.int64))


@njit
def _feasible(s, w, M, P, orders, T, flags, fw, iw, tid, nt, lanes):
    """Does one of the seven (ordering, policy) packs fit every model at ``T``?  Lane ``tid <
    lanes`` tries every ``lanes``-th pack (stopping at its first success) in its own working
    memory (fw (4G + 10 + 4n,), iw (7n,)); ``flags`` (lanes,) int64 collect the answers.  All
    ``nt`` threads return the same answer -- whether any pack fits does not depend on the order."""
    n = s.shape[0]
    if tid < lanes:
        ok = 0
        for v in range(tid, 7, lanes):
            if pack_core(s, w, M, P, orders, T, FEAS_ORDERING[v], FEAS_POLICY[v], np.int64(0), iw[:n], iw[n:2 * n], fw,
                         iw[2 * n:]):
                ok = 1
                break
        flags[tid] = ok
    barrier()
    any_ok = False
    for t in range(lanes):
        any_ok = any_ok or flags[t] == 1
    barrier()  # every thread has read the flags before they are written again
    return any_ok


@njit
def search_T_core(s, w, M, P, orders, fw, iw, tid, nt, lanes):
    """``T_high`` of the seed (``-1`` if no T packs): doubling then 40 bisection steps, the packs
    of each test shared by ``lanes`` threads (:func:`_feasible`; every thread of ``nt`` calls
    this and gets the answer).  ``orders`` (4n,); fw (max(G + 1 + n, lanes (4G + 10 + 4n)) + 1,),
    iw (max(3n + 2G, lanes 7n) + lanes,)."""
    n = s.shape[0]
    G = M.shape[0]
    LF, LI = 4 * G + 10 + 4 * n, 7 * n
    fbox, flags = fw[:1], iw[:lanes]
    f_rest, i_rest = fw[1:], iw[lanes:]
    if tid == 0:
        fbox[0] = start_bound_core(s, w, M, f_rest, i_rest)
    barrier()
    lo = fbox[0]
    f_lane, i_lane = f_rest[tid * LF:(tid + 1) * LF], i_rest[tid * LI:(tid + 1) * LI]
    barrier()  # every thread has read the bound before the lanes reuse the memory
    T = max(lo, 1e-9)
    lo_known = T == lo
    hi = -1.0
    for _ in range(50):
        if _feasible(s, w, M, P, orders, T, flags, f_lane, i_lane, tid, nt, lanes):
            hi = T
            break
        T *= 2
    if hi < 0:
        return -1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if mid == hi or (mid == lo and lo_known):
            continue  # the interval is one float wide: the answer is already known
        if _feasible(s, w, M, P, orders, mid, flags, f_lane, i_lane, tid, nt, lanes):
            hi = mid
        else:
            lo = mid
            lo_known = True
    return hi


def search_T(s, w, M, P, orders):
    """``T_high`` of the seed (CPU entry of :func:`search_T_core`; ``orders`` (4, n))."""
    n, G = s.shape[0], M.shape[0]
    return search_T_core(s, w, M, P, orders.ravel(), np.empty(4 * G + 11 + 4 * n), np.empty(7 * n + 2 * G + 1, np.int64),
                         0, 1, 1)


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
    ``cnt``, dropping the last entry when full; returns the new length.  Model ``i``'s list is
    ``lg``/``lv[i K:(i + 1) K]``, ``K = REGRET_KEEP``."""
    K = REGRET_KEEP
    o = i * K
    p = cnt
    while p > 0 and (lv[o + p - 1] > nl or (lv[o + p - 1] == nl and lg[o + p - 1] > g)):
        p -= 1
    if p >= K:
        return cnt
    last = min(cnt, K - 1)
    for q in range(last, p, -1):
        lg[o + q] = lg[o + q - 1]
        lv[o + q] = lv[o + q - 1]
    lg[o + p] = g
    lv[o + p] = nl
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
    return cnt, n_fit <= REGRET_KEEP


@njit
def regret_insertion_core(s, w, M, assign, pos, fw, iw):
    """Regret insertion (see :func:`kvgpu.reference.regret_insertion`) in O(N^2 + N G) rather than
    O(N^2 G): a GPU's resulting max KVPR is ``max(newlocal, max over the other GPUs)``, so for
    every GPU except the current argmax the order by (newmax, newlocal, id) is the order by
    (newlocal, id).  Each model therefore remembers its few smallest ``(newlocal, g)``; a placement
    changes only the receiving GPU's entries (O(1) per model) and a model's list is rebuilt only
    when fewer than three entries remain known.  Decisions equal the reference's.
    fw (3G + K n,), iw (3n + K n,), ``K = REGRET_KEEP``."""
    n = s.shape[0]
    G = M.shape[0]
    K = REGRET_KEEP
    S, W, kv = fw[:G], fw[G:2 * G], fw[2 * G:3 * G]
    lv = fw[3 * G:3 * G + K * n]
    placed, cnt, all_in = iw[:n], iw[n:2 * n], iw[2 * n:3 * n]
    lg = iw[3 * n:3 * n + K * n]
    for g in range(G):
        S[g] = 0.0
        W[g] = 0.0
        kv[g] = 0.0
    for i in range(n):
        placed[i] = 0
        c, a = _rescan(s, w, M, S, W, lg, lv, i)
        cnt[i], all_in[i] = c, a
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
                    g, nl = lg[i * K + q], lv[i * K + q]
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
        placed[pick] = 1
        assign[pick] = pick_g
        pos[pick] = k
        gp = pick_g
        S[gp] += s[pick]
        W[gp] += w[pick]
        kv[gp] = safe_div(W[gp], M[gp] - S[gp])
        for i in range(n):  # only GPU gp changed: update each model's remembered entry for it
            if placed[i]:
                continue
            o = i * K
            at = -1
            for q in range(cnt[i]):
                if lg[o + q] == gp:
                    at = q
            if at < 0:
                continue  # gp's key only grew: it stays behind every remembered entry
            for q in range(at, cnt[i] - 1):
                lg[o + q] = lg[o + q + 1]
                lv[o + q] = lv[o + q + 1]
            cnt[i] -= 1
            nl = _newlocal(s, w, M, S, W, i, gp)
            last = cnt[i] - 1
            if nl == nl and (all_in[i] or (last >= 0 and (nl < lv[o + last] or (nl == lv[o + last] and gp < lg[o + last])))):
                cnt[i] = _keep_insert(lg, lv, i, cnt[i], gp, nl)
            if cnt[i] < 3 and not all_in[i]:
                c, a = _rescan(s, w, M, S, W, lg, lv, i)
                cnt[i], all_in[i] = c, a
    return True


def regret_insertion(s, w, M, assign, pos):
    """Regret insertion (CPU entry of :func:`regret_insertion_core`)."""
    n, G = s.shape[0], M.shape[0]
    return regret_insertion_core(s, w, M, assign, pos, np.empty(3 * G + REGRET_KEEP * n),
                                 np.empty((3 + REGRET_KEEP) * n, np.int64))


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
def _state_into(s, w, M, assign, pos, S, W, kv, order, tmp):
    """Per-GPU ``S``, ``W`` (list-order sums) and KVPR ``kv`` (G,); ``order`` (n,) the list
    order; returns the next insertion stamp.  ``tmp`` (n,) int64 working memory."""
    list_loads_into(assign, pos, s, w, S, W, order, tmp)
    kvprs_into(S, W, M, kv)
    return next_stamp(pos)


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
        k[q] = w[j] + fmul(B0, s[j])  # unfused: the window's edges are the CPU's on a device too
    argsort_into(k, order, work)
    lo_off = W[dst] - fmul(B0, M[dst] - S[dst])
    hi_off = fmul(B0, M[src] - S[src]) - W[src]
    room = abs(M[src]) + abs(M[dst]) + abs(S[src]) + abs(S[dst])
    slack = fmul(1e-7, 1.0 + abs(W[src]) + abs(W[dst]) + fmul(B0, room))
    for p in range(p_lo, p_hi):
        a = mem[p]
        ka = w[a] + fmul(B0, s[a])
        lo = _first_above(k, order, ka + lo_off - slack - fmul(1e-7, abs(ka)))
        hi = _first_above(k, order, ka + hi_off + slack + fmul(1e-7, abs(ka)))
        if hi <= lo:
            continue
        if 8 * (hi - lo) > m:
            best, b = _swap_row(S, W, M, s, w, src, dst, a, others, best, mem, q_lo, q_hi, rules, rstate)
        else:
            cand = work[:hi - lo]
            for c in range(hi - lo):
                cand[c] = order[lo + c]
            insertion_sort(cand)  # list order
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
def _move_scan(S, W, M, s, w, mem, lo, worst, t3, vals, tid, nt):
    """``vals[k]``, ``k = p G + d``: the new max KVPR of moving the ``p``-th model of the worst
    GPU's list (``mem[lo + p]``) to GPU ``d`` (NaN: no move -- ``d`` is the worst GPU, or it
    does not fit).  Thread ``tid`` of ``nt`` fills every ``nt``-th entry."""
    G = M.shape[0]
    for k in range(tid, vals.shape[0], nt):
        vals[k] = _move_value(S, W, M, s, w, worst, k % G, mem[lo + k // G], t3)


@_jit
def own_first(base, lo, tid, nt):
    """The first ``q >= lo`` whose candidate number ``base + q`` is thread ``tid``'s (``= tid``
    mod ``nt``): a strided scan's start.  One thread (the CPU) starts at ``lo`` with no
    division."""
    if nt == 1:
        return lo
    return lo + (tid - base - lo) % nt


@njit
def first_swap(S, W, M, s, w, assign, mem, start, worst, t3, cur, rules, rstate, tid, nt):
    """The first improving swap in the serial scan order (models of the worst GPU's list, then
    target GPUs, then their models) among the candidates of thread ``tid`` of ``nt``: its index
    ``p n + q`` (``mem[start[worst] + p]`` for ``mem[q]``), or ``(hi - lo) n`` if none.  The
    smallest index over all threads is the serial scan's choice, whatever the number of threads.
    ``mem``/``start``: the GPU lists (:func:`gpu_lists_into`)."""
    n = s.shape[0]
    G = M.shape[0]
    lo, hi = start[worst], start[worst + 1]
    for p in range(hi - lo):
        a, base = mem[lo + p], p * n
        for d in range(G):
            if d == worst:
                continue
            others = max_excluding(t3, worst, d)
            for q in range(own_first(base, start[d], tid, nt), start[d + 1], nt):
                new = _eval(S, W, M, s, w, worst, d, a, mem[q], others)
                if new + EPS < cur and _allowed(rules, rstate, worst, d, a, mem[q]):
                    return base + q
    return (hi - lo) * n


@njit
def improve_local_core(s, w, M, assign, pos, max_iters, rules, rstate, fw, iw, tid, nt):
    """In place; see :func:`kvgpu.reference.improve_local`.  Only transfers that keep ``rules``
    (pins, anti-affinity, nodes, the migration budget; ``rstate`` their bookkeeping, updated)
    are considered; without rules this is the seed's step exactly.

    Run by every thread ``tid`` of ``nt`` (module doc): the threads evaluate a step's moves and
    swaps, thread 0 picks and applies the step.  The pick is the serial scan's: a move is taken
    when it beats the best so far by ``EPS`` (a chain over the scan order, so thread 0 walks the
    evaluated values in that order), a swap is the first that improves (the smallest index).
    One thread (the CPU) keeps no values: it scans in that order itself, and picks the best swap
    of the two worst GPUs with :func:`best_swap`, so its memory stays O(n + G) on any cluster.
    fw (3G + local_values(n, G, nt),), iw (4n + G + 5 + nt,)."""
    G = M.shape[0]
    n = s.shape[0]
    S, W, kv = fw[:G], fw[G:2 * G], fw[2 * G:3 * G]
    vals = fw[3 * G:]
    mem, start, order = iw[:n], iw[n:n + G + 1], iw[n + G + 1:2 * n + G + 1]
    box = iw[2 * n + G + 1:2 * n + G + 5]
    red = iw[2 * n + G + 5:2 * n + G + 5 + nt]
    tmp = iw[2 * n + G + 5 + nt:3 * n + G + 5 + nt]
    none = np.int64(-1)
    stamp = 0
    if tid == 0:
        stamp = _state_into(s, w, M, assign, pos, S, W, kv, order, tmp)
    barrier()
    for _ in range(max_iters):
        worst = argmax_first(kv, none)
        t3 = top3(kv)
        if tid == 0:
            gpu_lists_into(assign, order, mem, start)
        barrier()
        lo, hi = start[worst], start[worst + 1]
        nc = (hi - lo) * G
        if nt > 1:  # the threads evaluate every move, thread 0 walks them in scan order
            _move_scan(S, W, M, s, w, mem, lo, worst, t3, vals[:nc], tid, nt)
        barrier()
        if tid == 0:
            best = kv[worst]
            ba, bd = none, none
            for p in range(hi - lo):  # nested: k // G, k % G per candidate cost 16% of this step on the CPU
                a = mem[lo + p]
                for d in range(G):
                    v = vals[p * G + d] if nt > 1 else _move_value(S, W, M, s, w, worst, d, a, t3)
                    if v + EPS < best and _allowed(rules, rstate, worst, d, a, none):
                        best, ba, bd = v, a, d
            box[0], box[1], box[2] = ba, bd, none
        barrier()
        if box[0] < 0:
            red[tid] = first_swap(S, W, M, s, w, assign, mem, start, worst, t3, kv[worst], rules, rstate, tid, nt)
            barrier()
            if tid == 0:
                k = red[0]
                for t in range(1, nt):
                    k = min(k, red[t])
                if k < (hi - lo) * n:
                    box[0], box[1], box[2] = mem[lo + k // n], assign[mem[k % n]], mem[k % n]
            barrier()
        ba, bd, bb = box[0], box[1], box[2]
        if ba < 0:
            break
        if tid == 0:
            stamp = _apply_ruled(S, W, kv, M, s, w, assign, pos, order, stamp, worst, bd, ba, bb, rules, rstate)
        barrier()
    if G > 1:
        for _ in range(12):
            worst = argmax_first(kv, none)
            second = argmax_first(kv, worst)
            t3 = top3(kv)
            if tid == 0:
                gpu_lists_into(assign, order, mem, start)
            barrier()
            others = max_excluding(t3, worst, second)
            if nt == 1:  # one thread: the windowed scan, no values kept
                box[0], box[1] = best_swap(S, W, M, s, w, worst, second, others, kv[worst], mem, start, vals[:n],
                                           iw[3 * n + G + 6:4 * n + G + 6], tmp, rules, rstate)
            else:
                lo0, m0 = start[worst], start[worst + 1] - start[worst]
                lo1, m1 = start[second], start[second + 1] - start[second]
                for k in range(tid, m0 * m1, nt):
                    vals[k] = _eval(S, W, M, s, w, worst, second, mem[lo0 + k // m1], mem[lo1 + k % m1], others)
                barrier()
                if tid == 0:
                    best = kv[worst]
                    ba, bb = none, none
                    for k in range(m0 * m1):
                        if vals[k] + EPS < best:
                            a, b = mem[lo0 + k // m1], mem[lo1 + k % m1]
                            if _allowed(rules, rstate, worst, second, a, b):
                                best, ba, bb = vals[k], a, b
                    box[0], box[1] = ba, bb
            barrier()
            ba, bb = box[0], box[1]
            if ba < 0:
                break
            if tid == 0:
                stamp = _apply_ruled(S, W, kv, M, s, w, assign, pos, order, stamp, worst, second, ba, bb, rules,
                                     rstate)
            barrier()
    barrier()


@njit
def local_values(n, G, nt):
    """Floats :func:`improve_local_core` keeps for the values of a step's moves and swaps: every
    one of them for ``nt > 1`` threads, ``n`` (the sort keys of :func:`best_swap`) for one."""
    return n * max(n, G) if nt > 1 else n


@njit
def _move_value(S, W, M, s, w, worst, d, a, t3):
    """New max KVPR of moving model ``a`` from the worst GPU to ``d`` (NaN: ``d`` is the worst
    GPU, or it does not fit) -- an entry of :func:`_move_scan`."""
    if d == worst:
        return np.nan
    return _eval(S, W, M, s, w, worst, d, a, np.int64(-1), max_excluding(t3, worst, d))


def improve_local(s, w, M, assign, pos, max_iters, rules, rstate):
    """In place (CPU entry of :func:`improve_local_core`)."""
    n, G = s.shape[0], M.shape[0]
    improve_local_core(s, w, M, assign, pos, max_iters, rules, rstate, np.empty(3 * G + local_values(n, G, 1)),
                       np.empty(4 * n + G + 6, np.int64), 0, 1)


#: The seed's ``refine_peak`` (:func:`kvgpu.reference.refine_peak`'s defaults): passes, and
#: donors per pass (half by demand, the rest by size).
REFINE_PASSES, REFINE_TOP_K = 2, 12


@njit
def refine_values(top_k, nt):
    """Floats :func:`refine_peak_core` keeps for the values of a pass's donations: every one of
    them (at most two targets for each of ``max(1, top_k // 2) + max(1, top_k)`` donors) for
    ``nt > 1`` threads, none for one."""
    return 2 * (max(1, top_k // 2) + max(1, top_k)) if nt > 1 else 0


@njit
def refine_work(n, G, top_k, nt):
    """``(floats, ints)``: the working memory of :func:`refine_peak_core`."""
    return 3 * G + refine_values(top_k, nt), 3 * n + G + 2 * max(1, top_k) + 7


@njit
def _donation(by_w, nw, by_s, targets, n_tg, k):
    """Donation ``k = j n_tg + t`` of a :func:`refine_peak_core` pass, in the reference's scan
    order: donor ``j`` (``by_w[j]`` for ``j < nw``, else ``by_s[j - nw]``) to ``targets[t]``.
    ``(model, GPU)``; model -1 where a by-size donor is a by-demand one already (the
    reference's donor list holds it once)."""
    j, t = k // n_tg, k % n_tg
    if j < nw:
        return by_w[j], targets[t]
    a = by_s[j - nw]
    for q in range(nw):
        if by_w[q] == a:
            return np.int64(-1), targets[t]
    return a, targets[t]


@njit
def refine_peak_core(s, w, M, assign, pos, passes, top_k, rules, rstate, fw, iw, tid, nt):
    """In place; see :func:`kvgpu.reference.refine_peak`.  Donations that break ``rules`` are
    skipped (see :func:`improve_local_core`).  At most ``2 top_k`` donations a pass.

    Run by every thread ``tid`` of ``nt`` (module doc): thread 0 ranks the donors, the threads
    evaluate the pass's donations (every ``nt``-th each), and thread 0 walks the values in the
    serial scan order with the serial rule (a donation is taken when it beats the best so far
    by ``EPS``) -- the same values in the same order, so the same choice for any ``nt``.  One
    thread (the CPU) keeps no values: it evaluates as it walks.  fw, iw of :func:`refine_work`
    entries."""
    G = M.shape[0]
    n = s.shape[0]
    S, W, kv, vals = fw[:G], fw[G:2 * G], fw[2 * G:3 * G], fw[3 * G:3 * G + refine_values(top_k, nt)]
    mem, start, order, tmp = iw[:n], iw[n:n + G + 1], iw[n + G + 1:2 * n + G + 1], iw[2 * n + G + 1:3 * n + G + 1]
    o = 3 * n + G + 1
    nbw, nbs = max(1, top_k // 2), max(1, top_k)
    by_w, by_s, targets = iw[o:o + nbw], iw[o + nbw:o + nbw + nbs], iw[o + nbw + nbs:o + nbw + nbs + 2]
    box = iw[o + nbw + nbs + 2:o + nbw + nbs + 6]
    none = np.int64(-1)
    stamp = 0
    if tid == 0:
        stamp = _state_into(s, w, M, assign, pos, S, W, kv, order, tmp)
    for _ in range(passes):
        barrier()
        worst = argmax_first(kv, none)
        if tid == 0:  # the pass's donors and targets; box: (by-demand donors, by-size, targets)
            targets[0], targets[1] = _two_lowest(kv, worst)
            n_tg = 0 if targets[0] < 0 else (1 if targets[1] < 0 else 2)
            gpu_lists_into(assign, order, mem, start)
            lo, hi = start[worst], start[worst + 1]
            nw = ns = 0
            if n_tg > 0 and hi > lo:
                nw = _top_into(mem, lo, hi, w, by_w)
                ns = _top_into(mem, lo, hi, s, by_s[:max(1, top_k - nw)])
            box[0], box[1], box[2] = nw, ns, n_tg
        barrier()
        nw, n_tg = box[0], box[2]
        nc = (nw + box[1]) * n_tg
        if nc == 0:  # no target, or nothing on the worst GPU
            break
        t3 = top3(kv)
        if nt > 1:
            for k in range(tid, nc, nt):
                a, d = _donation(by_w, nw, by_s, targets, n_tg, k)
                vals[k] = np.nan if a < 0 else _move_value(S, W, M, s, w, worst, d, a, t3)
        barrier()
        if tid == 0:
            best = kv[worst]
            ba, bd = none, none
            for k in range(nc):
                a, d = _donation(by_w, nw, by_s, targets, n_tg, k)
                if a < 0:
                    continue
                new = vals[k] if nt > 1 else _move_value(S, W, M, s, w, worst, d, a, t3)
                if new + EPS < best and _allowed(rules, rstate, worst, d, a, none):
                    best, ba, bd = new, a, d
            box[3] = ba
            if ba >= 0:
                stamp = _apply_ruled(S, W, kv, M, s, w, assign, pos, order, stamp, worst, bd, ba, none, rules, rstate)
        barrier()
        if box[3] < 0:
            break
    barrier()  # every thread has read the box before it is working memory again


def refine_peak(s, w, M, assign, pos, passes, top_k, rules, rstate):
    """In place (CPU entry of :func:`refine_peak_core`)."""
    nf, ni = refine_work(s.shape[0], M.shape[0], top_k, 1)
    refine_peak_core(s, w, M, assign, pos, passes, top_k, rules, rstate, np.empty(nf), np.empty(ni, np.int64), 0, 1)


# ----------------------------------------------------------------------------- pipeline

@njit
def objective_core(s, w, M, assign, pos, kv, fw, iw):
    """The objective of a placement: ``kv`` (G,) float64 = each GPU's KVPR, its size and demand
    summed in the GPU's list order (as :func:`kvgpu.batch.state.gpu_loads` sums them, so the
    values are the engine's bit for bit); returns the max KVPR (``-inf`` without GPUs).
    ``assign``, ``pos`` (n,) int64; fw (2G,) float64, iw (2n,) int64 working memory."""
    G = M.shape[0]
    n = s.shape[0]
    S, W = fw[:G], fw[G:2 * G]
    list_loads_into(assign, pos, s, w, S, W, iw[:n], iw[n:2 * n])
    kvprs_into(S, W, M, kv)
    top = -INF
    for g in range(G):
        top = max(top, kv[g])
    return top


@njit
def score_core(s, w, M, assign, pos, out, fw, iw):
    """The score ``(max, second, mean KVPR)`` of a placement into ``out`` (3,); fw (3G,),
    iw (2n,)."""
    G = M.shape[0]
    kv = fw[2 * G:3 * G]
    objective_core(s, w, M, assign, pos, kv, fw[:2 * G], iw)
    v0, i0, v1, i1, v2, i2 = top3(kv)  # the two largest values, as a descending sort has them
    tot = 0.0
    for g in range(G):
        tot += kv[g]
    out[0] = v0
    out[1] = v1 if G > 1 else 0.0
    out[2] = tot / G


@njit
def score_of(s, w, M, assign, pos, out):
    """The score ``(max, second, mean KVPR)`` into ``out`` (3,) (CPU entry of :func:`score_core`)."""
    score_core(s, w, M, assign, pos, out, np.empty(3 * M.shape[0]), np.empty(2 * s.shape[0], np.int64))


#: Candidate placements of the seed: 6 factors x 3 policies x 3 orderings, regret, two memory
#: packs (the fallback reuses the first slot); slots for them.
N_PACKED = 57
N_CANDIDATES = 60
#: Threads of a block that make candidate packings at once, each in its own working memory.
PACK_LANES = 8


@njit
def _lane_work(n, G):
    """``(floats, ints)`` of one lane's candidate pack (:func:`pack_core`, or a probe of
    :func:`search_T_core` with its placement)."""
    return 4 * G + 16 + 4 * n, 8 * n + 2 * G + 8


@njit
def seed_work(n, G, nt):
    """``(floats, ints)``: the working memory :func:`seed_instance_core` needs for ``n`` models,
    ``G`` GPUs and ``nt`` threads (on top of its own arrays, the largest need of its steps: the
    candidate lanes beside regret insertion's lists, or a local search)."""
    K = REGRET_KEEP
    C = N_CANDIDATES
    lanes = min(nt, PACK_LANES)
    lf, li = _lane_work(n, G)
    local_f = max(local_values(n, G, nt), refine_values(REFINE_TOP_K, nt))  # improve_local, or refine_peak
    tail_f = lanes * lf + 3 * G + K * n + 3 * G + local_f + 16
    tail_i = lanes * li + 3 * n + K * n + 4 * n + 3 * G + 32 + nt
    return G + 1 + 3 * C + tail_f, 2 * C * n + 2 * C + 4 * n + 4 + tail_i


@njit
def _candidates(s, w, M, P, orders, ca, cp, okf, box, fw, iw, tid, nt, lanes):
    """The seed's candidate placements into ``ca``/``cp`` (C n,): candidate ``c`` at
    ``[c n:(c + 1) n]``, in the reference's order; returns how many (every thread).  Fills ``P``
    (G + 1,) and ``orders`` (4n,).  The first ``lanes`` threads each make every ``lanes``-th
    candidate into its own slot (``okf`` (C,) says which packed), then thread 0 moves the
    packed ones to the front, in order: the serial loop's result for any number of lanes."""
    n = s.shape[0]
    G = M.shape[0]
    if tid == 0:
        mem_prefix_into(M, P, iw)
        model_orders_into(s, w, P, orders, fw, iw)
    barrier()
    T_high = search_T_core(s, w, M, P, orders, fw, iw, tid, nt, lanes)
    lf, li = _lane_work(n, G)
    if tid < lanes:
        for k in range(tid, N_PACKED, lanes):
            a, p = ca[k * n:(k + 1) * n], cp[k * n:(k + 1) * n]
            f_l, i_l = fw[tid * lf:(tid + 1) * lf], iw[tid * li:(tid + 1) * li]
            if k < N_PACKED - 3:  # factor k // 9, policy (k // 3) % 3, ordering k % 3
                ok = T_high > 0 and pack_core(s, w, M, P, orders, fmul(T_high, T_FACTORS[k // 9]), np.int64(k % 3),
                                              np.int64((k // 3) % 3), np.int64(0), a, p, f_l, i_l)
            elif k == N_PACKED - 3:  # regret insertion's lists do not fit a lane: a region of their own
                ok = regret_insertion_core(s, w, M, a, p, fw[lanes * lf:], iw[lanes * li:])
            elif k == N_PACKED - 2:
                ok = pack_core(s, w, M, P, orders, 0.0, np.int64(SIZE_ORDER), np.int64(BEST_FIT), np.int64(DUAL * n),
                               a, p, f_l, i_l)
            else:
                ok = pack_core(s, w, M, P, orders, 0.0, np.int64(2), np.int64(BEST_FIT), np.int64(0), a, p, f_l, i_l)
            okf[k] = ok
    barrier()
    if tid == 0:
        nc = 0
        for k in range(N_PACKED):
            if okf[k]:
                if k != nc:
                    for i in range(n):
                        ca[nc * n + i] = ca[k * n + i]
                        cp[nc * n + i] = cp[k * n + i]
                nc += 1
        if nc == 0:
            for q in range(3):
                policy = BEST_FIT if q == 0 else (MOST_FREE if q == 1 else FIRST_FIT)
                if pack_core(s, w, M, P, orders, 0.0, np.int64(SIZE_ORDER), np.int64(policy), np.int64(0), ca[:n],
                             cp[:n], fw, iw):
                    nc = 1
                    break
        box[0] = nc
    barrier()
    return box[0]


@njit
def _same(x, a, b, n):
    """Are ``x[a n:(a + 1) n]`` and ``x[b n:(b + 1) n]`` equal?"""
    for i in range(n):
        if x[a * n + i] != x[b * n + i]:
            return False
    return True


@njit
def seed_instance_core(s, w, M, assign, pos, rules, rstate, fw, iw, tid, nt):
    """The seed pipeline on one instance; fills ``assign``/``pos``; False if nothing packed.

    Every thread ``tid`` of ``nt`` calls it (module doc): up to :data:`PACK_LANES` threads make
    the candidate placements, all share their local searches.  ``rules``/``rstate``: no rules
    (:func:`kvgpu.kernels.rules.no_rules`); fw, iw of :func:`seed_work` entries."""
    n = s.shape[0]
    G = M.shape[0]
    if n == 0:
        return True
    C = N_CANDIDATES
    ca, cp, dup, okf = iw[:C * n], iw[C * n:2 * C * n], iw[2 * C * n:2 * C * n + C], iw[2 * C * n + C:2 * C * n + 2 * C]
    o = 2 * C * n + 2 * C
    orders, box, i_rest = iw[o:o + 4 * n], iw[o + 4 * n:o + 4 * n + 4], iw[o + 4 * n + 4:]
    P, sc, f_rest = fw[:G + 1], fw[G + 1:G + 1 + 3 * C], fw[G + 1 + 3 * C:]
    nc = _candidates(s, w, M, P, orders, ca, cp, okf, box, f_rest, i_rest, tid, nt, min(nt, PACK_LANES))
    if tid == 0:
        for c in range(nc):  # improve_local is deterministic: an identical start gives the identical result
            dup[c] = -1
            for e in range(c):
                if _same(ca, e, c, n) and _same(cp, e, c, n):
                    dup[c] = e
                    break
    barrier()
    nc = box[0]
    if nc == 0:
        return False
    pick = -1
    for c in range(nc):
        e = dup[c]
        if e < 0:
            improve_local_core(s, w, M, ca[c * n:(c + 1) * n], cp[c * n:(c + 1) * n], 4000, rules, rstate, f_rest,
                               i_rest, tid, nt)
        if tid == 0:
            if e >= 0:
                for i in range(n):
                    ca[c * n + i] = ca[e * n + i]
                    cp[c * n + i] = cp[e * n + i]
                for q in range(3):
                    sc[3 * c + q] = sc[3 * e + q]
            else:
                score_core(s, w, M, ca[c * n:(c + 1) * n], cp[c * n:(c + 1) * n], sc[3 * c:3 * c + 3], f_rest, i_rest)
            if pick < 0 or lex_less(sc[3 * c:3 * c + 3], sc[3 * pick:3 * pick + 3], 3):
                pick = c
    if tid == 0:
        for i in range(n):
            assign[i] = ca[pick * n + i]
            pos[i] = cp[pick * n + i]
    barrier()
    refine_peak_core(s, w, M, assign, pos, REFINE_PASSES, REFINE_TOP_K, rules, rstate, f_rest, i_rest, tid, nt)
    improve_local_core(s, w, M, assign, pos, 1500, rules, rstate, f_rest, i_rest, tid, nt)
    return True


@njit
def seed_memory(assign, G):
    """What :func:`seed_instance_core` needs beyond the instance on one CPU thread, for the
    models' ``assign`` (n,) and ``G`` GPUs: ``(rules, rstate, fw, iw)`` -- no rules (the empty
    tuple of :func:`kvgpu.kernels.rules.no_rules`, co-location included), their bookkeeping,
    working memory of :func:`seed_work`."""
    nf, ni = seed_work(assign.shape[0], G, 1)
    rules = no_rules()
    return rules, new_state(rules, assign, G), np.empty(nf), np.empty(ni, np.int64)


def seed_instance(s, w, M, assign, pos):
    """The seed pipeline on one instance (CPU entry of :func:`seed_instance_core`)."""
    return seed_instance_core(s, w, M, assign, pos, *seed_memory(assign, M.shape[0]), 0, 1)


@kernel(parallel=True)
def seed_batch(sizes, demand, gpu_mem, n_models, n_gpus, assign, pos, ok):
    """The seed pipeline for every instance of a compacted batch (real entries first), in parallel.

    sizes, demand (B, N) float64; gpu_mem (B, G) float64; n_models, n_gpus (B,) int64;
    outputs assign, pos (B, N) int64 (-1 for padding) and ok (B,) bool."""
    for b in prange(sizes.shape[0]):
        n, G = n_models[b], n_gpus[b]
        rules, rstate, fw, iw = seed_memory(assign[b, :n], G)
        ok[b] = seed_instance_core(sizes[b, :n], demand[b, :n], gpu_mem[b, :G], assign[b, :n], pos[b, :n], rules,
                                   rstate, fw, iw, 0, 1)

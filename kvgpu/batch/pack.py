"""Candidate construction for many lanes at once: parametric and memory packs, regret insertion.

A *lane* is one pack of one instance: its own ``T``, model ordering and GPU
policy.  All lanes place their ``k``-th model in the same step; every GPU of
every lane is scored at once and a lexicographic argmin picks the GPU, exactly
as :func:`kvgpu.reference.pack` does one lane at a time.
"""

from __future__ import annotations

from kvgpu.batch import bounds as bb
from kvgpu.batch.array_engine import ArrayEngine, engine_for
from kvgpu.batch.arrays import quiet_fp, argsort_stable, inverse_perm, lex_argmin, max_excluding, seq_sum, sort_desc, top3
from kvgpu.batch.state import Batch, kvpr
from kvgpu.kernels.deltas import EPS, INF, fits, safe_div_array

from kvgpu.kernels.params import (BEST_FIT, FIRST_FIT, HYBRID, K_PREFIX_RETUNE, MINMAX, MOST_FREE, RESID,
                                   RETUNE_FRACTIONS)


def _order_keys(xp, s, w, T, m_max, ordering):
    """Sort keys (most significant first) of each lane's ordering, shapes (L, N)."""
    o = ordering[:, None]
    k0 = xp.where(o == 0, w + T[:, None] * s,
                  xp.where(o == 1, safe_div_array(w, m_max[:, None] - s, xp),
                           xp.where(o == 2, safe_div_array(w, s, xp), s)))
    k1 = xp.where(o == 0, w, xp.where(o == 1, s, w))
    k2 = xp.where(o == 0, s, 0.0)
    return [k0, k1, k2]


def _retune(xp, lanes_b: Batch, P, T, order, k, S, W, ordering, first: bool):
    """Raise ``T`` of every lane to the bounds of its remaining models (positions > k of
    ``order``); ``S``, ``W`` are (L, G).  Returns ``(T, rise, order)``."""
    s_o = xp.take_along_axis(lanes_b.sizes, order, axis=1)
    w_o = xp.take_along_axis(lanes_b.demand, order, axis=1)
    v_o = xp.take_along_axis(lanes_b.model_mask, order, axis=1)
    rem = v_o & (xp.arange(order.shape[1])[None, :] > k)
    n_gpus = lanes_b.n_gpus
    bound = bb.seed_bounds(xp, s_o, w_o, rem, P, n_gpus, seq_sum(xp, S), xp.minimum(n_gpus, K_PREFIX_RETUNE), first,
                           False)
    new_T = xp.maximum(T, bound)
    rise = new_T > T + EPS
    T = xp.where(rise, new_T, T)
    if first:
        resort = rise & (ordering == 0)
        if bool(resort.any()):
            # placed positions keep their place; the rest re-sorted by ordering 0 at the new T
            keys = [xp.where(rem, kk, 0.0) for kk in _order_keys(xp, s_o, w_o, T, P[:, 1], ordering * 0)]
            perm = sort_desc(xp, [xp.where(rem, 0.0, 1.0)] + keys, v_o)
            order = xp.where(resort[:, None], xp.take_along_axis(order, perm, axis=1), order)
    return T, rise, order


def _gpu_sum(xp, x):
    """Left-to-right sum over the GPU axis (axis 0) of a (G, L) array, rounding as Python's sum."""
    if x.shape[0] > 32:
        return xp.cumsum(x, axis=0)[-1]
    acc = x[0].copy()
    for g in range(1, x.shape[0]):
        acc += x[g]
    return acc


class _Lanes:
    """Working set of a pack: lanes still packing, per-GPU arrays laid out (G, L) so that
    reductions over GPUs run over contiguous rows."""

    def __init__(self, b: Batch, T, ordering, policy, n_most_free, order):
        xp = b.xp
        L, N, G = b.shape
        self.ids = xp.arange(L)
        self.b, self.T, self.ordering, self.policy, self.nmf, self.order = b, T, ordering, policy, n_most_free, order
        self.P = bb.mem_prefix(xp, b.gpu_mem, b.gpu_mask)
        self.Mt = xp.ascontiguousarray(b.gpu_mem.T)
        self.gm = xp.ascontiguousarray(b.gpu_mask.T)
        self.M_total = _gpu_sum(xp, self.Mt)
        self.n_models = b.n_models
        self.n_gpus = b.n_gpus
        self.St, self.Wt, self.loadt, self.kvt = (xp.zeros((G, L)) for _ in range(4))
        self.TM = T[None, :] * self.Mt
        # running top two of kvt: value v1 at the first argmax i1, and v2 = max over the other GPUs
        self.v1, self.i1 = xp.zeros(L), xp.zeros(L, dtype=xp.int64)
        self.v2 = xp.zeros(L) if G > 1 else xp.full(L, -INF)

    _ROW = ("ids", "T", "ordering", "policy", "nmf", "order", "P", "M_total", "n_models", "n_gpus", "v1", "i1", "v2")
    _COL = ("Mt", "gm", "St", "Wt", "loadt", "kvt", "TM")

    def raise_kvpr(self, xp, r, g, v):
        """GPU ``g[j]`` of lane ``r[j]`` now has KVPR ``v[j]`` (never lower than before): update the
        running top two in O(1) per lane instead of rescanning every GPU."""
        v1, i1, v2 = self.v1[r], self.i1[r], self.v2[r]
        same = g == i1
        above = ~same & (v > v1)
        tie = ~same & (v == v1)
        self.v2[r] = xp.where(above | tie, v1, xp.where(same, v2, xp.maximum(v2, v)))
        self.i1[r] = xp.where(above | (tie & (g < i1)), g, i1)
        self.v1[r] = xp.where(same | above, v, v1)
        self.kvt[g, r] = v

    def max_other(self, xp, sl):
        """For every GPU of the lanes ``sl``, the max KVPR over the other GPUs, shape (G, L')."""
        gids = xp.arange(self.kvt.shape[0])[:, None]
        return xp.where(gids == self.i1[sl], self.v2[sl], self.v1[sl])

    def keep(self, sel):
        for name in self._ROW:
            setattr(self, name, getattr(self, name)[sel])
        for name in self._COL:
            setattr(self, name, getattr(self, name)[:, sel])
        self.b = self.b.take(sel)


def _choose(engine: ArrayEngine, ln: _Lanes, k, s, w):
    """GPU per lane for the model ``(s, w)`` (L,) under each lane's policy; ``(g, any)``."""
    xp, kernel = engine.xp, engine.choose
    if kernel is not None:  # a compiled step handed in (ArrayEngine.choose), same decisions
        return kernel(xp, ln.St, ln.Wt, ln.loadt, ln.kvt, ln.Mt, ln.M_total, ln.n_gpus, ln.T, ln.policy, ln.nmf, k,
                      s, w)
    Sa = ln.St + s
    fit = ln.gm & fits(Sa, ln.Mt)
    free = ln.Mt - Sa
    pol = ln.policy
    L = pol.shape[0]
    # lanes are grouped by policy, so each policy's keys are computed on one slice
    cuts = [0] + [int((pol < c).sum()) for c in (MINMAX, HYBRID, MOST_FREE)] + [L]
    g = xp.zeros(L, dtype=xp.int64)
    anyfit = xp.zeros(L, bool)
    if cuts[3]:
        sl = slice(0, cuts[3])
        T = ln.T[sl]
        resid = ln.TM[:, sl] - (ln.loadt[:, sl] + w[sl] + T * s[sl])
        fit[:, sl] &= resid >= -EPS
    for p in range(4):
        lo, hi = cuts[p], cuts[p + 1]
        if lo == hi:
            continue
        sl = slice(lo, hi)
        f, fr = fit[:, sl], free[:, sl]
        neg_free = lambda fr=fr: -fr  # noqa: E731  (tie-break keys are computed only on ties)
        if p == RESID:
            keys = [resid[:, lo:hi], neg_free]
        else:
            newlocal = safe_div_array(ln.Wt[:, sl] + w[sl], fr, xp)
            if p < MOST_FREE:
                kv = ln.kvt[:, sl]
                newmax = xp.maximum(newlocal, ln.max_other(xp, sl))
                r = resid[:, lo:hi]
            if p == MINMAX:
                keys = [newmax, newlocal, r, neg_free]
            elif p == HYBRID:
                nG = ln.n_gpus[sl]
                Tf = xp.maximum(ln.T[sl], 1e-12)
                mean_kv = _gpu_sum(xp, kv) / nG
                var = _gpu_sum(xp, (kv - mean_kv) ** 2 * ln.gm[:, sl]) / nG
                a = xp.where(var < 0.02 * Tf * Tf, 0.25, 0.15)
                mean_frac = (_gpu_sum(xp, ln.St[:, sl]) + s[sl]) / ln.M_total[sl]
                J = newmax / Tf + a * newlocal / Tf + 0.05 * xp.abs(Sa[:, sl] / ln.Mt[:, sl] - mean_frac)
                keys = [J, newmax, newlocal, r, neg_free]
            else:
                pk = xp.where(k < ln.nmf[sl], MOST_FREE, pol[sl])
                keys = [xp.where(pk == MOST_FREE, -fr, xp.where(pk == BEST_FIT, fr, 0.0)),
                        lambda pk=pk, nl=newlocal: xp.where(pk == FIRST_FIT, 0.0, nl)]
        g[sl], anyfit[sl] = lex_argmin(xp, keys, f, axis=0)
    return g, anyfit


# Lanes x GPUs per chunk: small enough for each (G, lanes) array to stay in cache.
PACK_CHUNK_ENTRIES = 1 << 16


@quiet_fp
def pack_lanes(lanes_b: Batch, T, ordering, policy, n_most_free=None, engine: ArrayEngine | None = None):
    """Pack every lane; returns ``(assign (L, N), pos (L, N), ok (L,))``.

    ``T`` (L,) float, ``ordering`` (L,) in 0..3, ``policy`` (L,) in 0..5; the first
    ``n_most_free`` (L,) models of a lane go to the GPU with most free memory.
    A lane whose model fits nowhere fails (``ok`` False, its arrays are garbage).
    Lanes are independent and run in cache-sized chunks.  ``engine``: see
    :class:`kvgpu.batch.array_engine.ArrayEngine` (None: the plain array code).
    """
    engine = engine_for(lanes_b, engine)
    xp = engine.xp
    L, N, G = lanes_b.shape
    T = xp.asarray(T, dtype=xp.float64)
    n_most_free = xp.zeros(L, dtype=xp.int64) if n_most_free is None else n_most_free
    step = max(256, PACK_CHUNK_ENTRIES // max(G, 1))
    if L <= step:
        return _pack_chunk(lanes_b, T, ordering, policy, n_most_free, engine)
    parts = [_pack_chunk(lanes_b.take(sl), T[sl], ordering[sl], policy[sl], n_most_free[sl], engine)
             for sl in (xp.arange(lo, min(L, lo + step)) for lo in range(0, L, step))]
    return tuple(xp.concatenate([p[k] for p in parts]) for k in range(3))


def _pack_chunk(lanes_b: Batch, T, ordering, policy, n_most_free, engine: ArrayEngine):
    xp = engine.xp
    L, N, G = lanes_b.shape
    grp = argsort_stable(xp, policy)
    b = lanes_b.take(grp)
    P = bb.mem_prefix(xp, b.gpu_mem, b.gpu_mask)
    order = sort_desc(xp, _order_keys(xp, b.sizes, b.demand, T[grp], P[:, 1], ordering[grp]), b.model_mask)
    ln = _Lanes(b, T[grp].copy(), ordering[grp], policy[grp], n_most_free[grp], order)
    assign = xp.full((L, N), -1, dtype=xp.int64)
    pos = xp.full((L, N), -1, dtype=xp.int64)
    ok = xp.ones(L, bool)
    for k in range(N):
        going = k < ln.n_models
        if not bool(going.all()):
            ln.keep(xp.nonzero(going)[0])
        if ln.ids.shape[0] == 0:
            break
        r = xp.arange(ln.ids.shape[0])
        i = ln.order[:, k]
        s, w = ln.b.sizes[r, i], ln.b.demand[r, i]
        g, anyfit = _choose(engine, ln, k, s, w)
        if not bool(anyfit.all()):
            ok[ln.ids[~anyfit]] = False
            sel = xp.nonzero(anyfit)[0]
            ln.keep(sel)
            r, i, s, w, g = xp.arange(sel.shape[0]), i[sel], s[sel], w[sel], g[sel]
        assign[ln.ids, i] = g
        pos[ln.ids, i] = k
        ln.St[g, r] = ln.St[g, r] + s
        ln.Wt[g, r] = ln.Wt[g, r] + w
        ln.loadt[g, r] = ln.loadt[g, r] + (w + ln.T * s)
        ln.raise_kvpr(xp, r, g, safe_div_array(ln.Wt[g, r], ln.Mt[g, r] - ln.St[g, r], xp))
        for n_ret, frac in enumerate(RETUNE_FRACTIONS):
            at = xp.maximum(1, (frac * ln.n_models).astype(xp.int64))
            due = xp.nonzero((ln.policy < MOST_FREE) & (at == k + 1) & (k + 1 < ln.n_models))[0]
            if due.shape[0]:
                St, Wt = ln.St[:, due], ln.Wt[:, due]
                T_new, rise, ln.order[due] = _retune(xp, ln.b.take(due), ln.P[due], ln.T[due], ln.order[due], k,
                                                     St.T, Wt.T, ln.ordering[due], n_ret == 0)
                ln.T[due] = T_new
                ln.TM[:, due] = T_new * ln.Mt[:, due]
                ln.loadt[:, due] = xp.where(rise, Wt + T_new * St, ln.loadt[:, due])
    inv = inverse_perm(xp, grp[None, :])[0]
    return assign[inv], pos[inv], ok[inv]


@quiet_fp
def regret_insertion(batch: Batch):
    """Batched :func:`kvgpu.reference.regret_insertion`: ``(assign, pos, ok)``, one lane per instance."""
    xp = batch.xp
    L, N, G = batch.shape
    s_all, w_all, M, gmask = batch.sizes, batch.demand, batch.gpu_mem, batch.gpu_mask
    S, W = xp.zeros((L, G)), xp.zeros((L, G))
    assign = xp.full((L, N), -1, dtype=xp.int64)
    pos = xp.full((L, N), -1, dtype=xp.int64)
    ok = xp.ones(L, bool)
    n_models = batch.n_models
    gids = xp.arange(G)[None, None, :]
    for k in range(N):
        live = ok & (k < n_models)
        if not bool(live.any()):
            break
        kv = kvpr(xp, S, W, M, gmask)
        t3 = top3(xp, kv, gmask)
        s, w = s_all[:, :, None], w_all[:, :, None]
        unplaced = batch.model_mask & (assign < 0)
        fit = unplaced[:, :, None] & gmask[:, None, :] & fits(S[:, None, :] + s, M[:, None, :])
        newlocal = safe_div_array(W[:, None, :] + w, M[:, None, :] - (S[:, None, :] + s), xp)
        g_b = xp.broadcast_to(gids, fit.shape)
        newmax = xp.maximum(newlocal, max_excluding(xp, t3, g_b, g_b))
        g1, any1 = lex_argmin(xp, [newmax, newlocal], fit)
        g2, any2 = lex_argmin(xp, [newmax, newlocal], fit & (g_b != g1[:, :, None]))
        nm1 = xp.take_along_axis(newmax, g1[:, :, None], axis=2)[:, :, 0]
        nm2 = xp.where(any2, xp.take_along_axis(newmax, g2[:, :, None], axis=2)[:, :, 0], xp.inf)
        regret = nm2 - nm1  # inf - inf is NaN: such a model is never picked
        cand = any1 & ~xp.isnan(regret)
        pick, anyc = lex_argmin(xp, [-regret, nm1], cand)
        ok = ok & ~(live & ~anyc)
        r = xp.nonzero(live & anyc)[0]
        ii = pick[r]
        gi = g1[r, ii]
        assign[r, ii] = gi
        pos[r, ii] = k
        S[r, gi] = S[r, gi] + s_all[r, ii]
        W[r, gi] = W[r, gi] + w_all[r, ii]
    return assign, pos, ok

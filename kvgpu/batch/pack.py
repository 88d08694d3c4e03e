"""Candidate construction for many lanes at once: parametric and memory packs, regret insertion.

A *lane* is one pack of one instance: its own ``T``, model ordering and GPU
policy.  All lanes place their ``k``-th model in the same step; every GPU of
every lane is scored at once and a lexicographic argmin picks the GPU, exactly
as :func:`kvgpu.reference.pack` does one lane at a time.
"""

from __future__ import annotations

from kvgpu.batch import bounds as bb
from kvgpu.batch.arrays import lex_argmin, max_excluding, seq_sum, sort_desc, top3
from kvgpu.batch.state import Batch, kvpr
from kvgpu.kernels.deltas import EPS, fits, safe_div_array

# GPU policies.  0-2 are the parametric policies of the seed (they respect the transformed
# capacity T*M and retune T); 3-5 are memory-only policies.
RESID, MINMAX, HYBRID, MOST_FREE, BEST_FIT, FIRST_FIT = range(6)
POLICY_CODE = {"resid": RESID, "minmax": MINMAX, "hybrid": HYBRID}
# Model orderings, all descending: 0 (w+T*s, w, s); 1 (w/(M-s), s); 2 (w/s, w); 3 (s, w).
SIZE_ORDER = 3


def _order_keys(xp, s, w, T, m_max, ordering):
    """Sort keys (most significant first) of each lane's ordering, shapes (L, N)."""
    o = ordering[:, None]
    k0 = xp.where(o == 0, w + T[:, None] * s,
                  xp.where(o == 1, safe_div_array(w, m_max[:, None] - s, xp),
                           xp.where(o == 2, safe_div_array(w, s, xp), s)))
    k1 = xp.where(o == 0, w, xp.where(o == 1, s, w))
    k2 = xp.where(o == 0, s, 0.0)
    return [k0, k1, k2]


def _retune(xp, lanes_b: Batch, P, T, order, k, S, W, load, ordering, first: bool):
    """Raise ``T`` of every lane to the bounds of its remaining models (positions > k of
    ``order``).  Returns the new ``(T, load, order)``."""
    s_o = xp.take_along_axis(lanes_b.sizes, order, axis=1)
    w_o = xp.take_along_axis(lanes_b.demand, order, axis=1)
    v_o = xp.take_along_axis(lanes_b.model_mask, order, axis=1)
    rem = v_o & (xp.arange(order.shape[1])[None, :] > k)
    n_gpus = lanes_b.n_gpus
    bound = bb.seed_bounds(xp, s_o, w_o, rem, P, n_gpus, seq_sum(xp, S), xp.minimum(n_gpus, 4), first, False)
    new_T = xp.maximum(T, bound)
    rise = new_T > T + EPS
    T = xp.where(rise, new_T, T)
    load = xp.where(rise[:, None], W + T[:, None] * S, load)
    if first:
        resort = rise & (ordering == 0)
        if bool(resort.any()):
            # placed positions keep their place; the rest re-sorted by ordering 0 at the new T
            keys = [xp.where(rem, kk, 0.0) for kk in _order_keys(xp, s_o, w_o, T, P[:, 1], ordering * 0)]
            perm = sort_desc(xp, [xp.where(rem, 0.0, 1.0)] + keys, v_o)
            order = xp.where(resort[:, None], xp.take_along_axis(order, perm, axis=1), order)
    return T, load, order


def pack_lanes(lanes_b: Batch, T, ordering, policy, n_most_free=None):
    """Pack every lane; returns ``(assign (L, N), pos (L, N), ok (L,))``.

    ``T`` (L,) float, ``ordering`` (L,) in 0..3, ``policy`` (L,) in 0..5; the first
    ``n_most_free`` (L,) models of a lane go to the GPU with most free memory.
    A lane whose model fits nowhere fails (``ok`` False, its arrays are garbage).
    """
    xp = lanes_b.xp
    L, N, G = lanes_b.shape
    s_all, w_all, M, gmask = lanes_b.sizes, lanes_b.demand, lanes_b.gpu_mem, lanes_b.gpu_mask
    n_models, n_gpus = lanes_b.n_models, lanes_b.n_gpus
    T = xp.asarray(T, dtype=xp.float64).copy()
    n_most_free = xp.zeros(L, dtype=xp.int64) if n_most_free is None else n_most_free
    parametric = policy < MOST_FREE
    P = bb.mem_prefix(xp, M, gmask)
    m_max = P[:, 1]
    M_total = seq_sum(xp, M)
    order = sort_desc(xp, _order_keys(xp, s_all, w_all, T, m_max, ordering), lanes_b.model_mask)
    retune_at = [xp.maximum(1, (f * n_models).astype(xp.int64)) for f in (0.4, 0.75)]
    S, W, load = xp.zeros((L, G)), xp.zeros((L, G)), xp.zeros((L, G))
    assign = xp.full((L, N), -1, dtype=xp.int64)
    pos = xp.full((L, N), -1, dtype=xp.int64)
    ok = xp.ones(L, bool)
    rows = xp.arange(L)
    gids = xp.broadcast_to(xp.arange(G)[None, :], (L, G))
    p = policy[:, None]
    for k in range(N):
        live = ok & (k < n_models)
        if not bool(live.any()):
            break
        i = order[:, k]
        s, w = s_all[rows, i][:, None], w_all[rows, i][:, None]
        Tc = T[:, None]
        kv = kvpr(xp, S, W, M, gmask)
        t3 = top3(xp, kv, gmask)
        fit_mem = gmask & fits(S + s, M)
        resid = Tc * M - (load + w + Tc * s)
        fit = fit_mem & (~parametric[:, None] | (resid >= -EPS))
        free_after = M - (S + s)
        newlocal = safe_div_array(W + w, free_after, xp)
        newmax = xp.maximum(newlocal, max_excluding(xp, t3, gids, gids))
        # hybrid score
        Tf = xp.maximum(Tc, 1e-12)
        kv0 = xp.where(gmask, kv, 0.0)
        mean_kv = seq_sum(xp, kv0)[:, None] / n_gpus[:, None]
        var = seq_sum(xp, xp.where(gmask, (kv - mean_kv) ** 2, 0.0))[:, None] / n_gpus[:, None]
        a = xp.where(var < 0.02 * Tf * Tf, 0.25, 0.15)
        mean_frac = (seq_sum(xp, S)[:, None] + s) / M_total[:, None]
        J = newmax / Tf + a * newlocal / Tf + 0.05 * xp.abs((S + s) / xp.where(gmask, M, 1.0) - mean_frac)
        pk = xp.where((k < n_most_free)[:, None], MOST_FREE, p)
        zero = xp.zeros_like(resid)
        keys = [
            xp.where(pk == RESID, resid, xp.where(pk == MINMAX, newmax, xp.where(pk == HYBRID, J,
                     xp.where(pk == MOST_FREE, -free_after, xp.where(pk == BEST_FIT, free_after, zero))))),
            xp.where(pk == RESID, -free_after, xp.where(pk == MINMAX, newlocal,
                     xp.where(pk == HYBRID, newmax, xp.where(pk == FIRST_FIT, zero, newlocal)))),
            xp.where(pk == MINMAX, resid, xp.where(pk == HYBRID, newlocal, zero)),
            xp.where(pk == MINMAX, -free_after, xp.where(pk == HYBRID, resid, zero)),
            xp.where(pk == HYBRID, -free_after, zero),
        ]
        g, anyfit = lex_argmin(xp, keys, fit)
        ok = ok & ~(live & ~anyfit)
        r = xp.nonzero(live & anyfit)[0]
        gi, ii = g[r], i[r]
        assign[r, ii] = gi
        pos[r, ii] = k
        S[r, gi] = S[r, gi] + s_all[r, ii]
        W[r, gi] = W[r, gi] + w_all[r, ii]
        load[r, gi] = load[r, gi] + (w_all[r, ii] + T[r] * s_all[r, ii])
        for n_ret, at in enumerate(retune_at):
            due = xp.nonzero(ok & parametric & (at == k + 1) & (k + 1 < n_models))[0]
            if due.shape[0]:
                T[due], load[due], order[due] = _retune(xp, lanes_b.take(due), P[due], T[due], order[due], k,
                                                         S[due], W[due], load[due], ordering[due], n_ret == 0)
    return assign, pos, ok


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

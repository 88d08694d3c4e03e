"""numba kernel for re-placement: the best placement reachable from the current one with at
most ``K`` moved models.

A model is *moved* when it ends on another GPU than its current one; new models (current GPU
-1) are placed first, largest first, each where it raises the global max KVPR least, and cost
nothing.  Then steepest descent on the peak: every move of a model off the worst GPU to any GPU
and every swap of one with any model elsewhere is scored with the seed's transfer arithmetic
(:mod:`kvgpu.kernels.deltas`, the top-3 trick for the max over the other GPUs); the best one that
lowers the max KVPR and keeps the number of moved models within ``K`` is applied (fewer moved
models break ties), until none is left.  A model brought back home stops counting.
"""

from __future__ import annotations

import numba
import numpy as np

from kvgpu.kernels.cpu import EPS, _argmax_first, _kvprs, _max_excluding, _top3, fits, safe_div, transfer_loads
from kvgpu.kernels.rules import least_peak_gpu
from kvgpu.kernels.search import _moved

njit = numba.njit(cache=True)


@njit
def place_new(s, w, M, cur, assign, S, W):
    """Put the new models (``cur == -1``) where the global max KVPR rises least; False if one fits
    nowhere.  ``assign`` starts as ``cur``; ``S``, ``W`` are the loads of the current models."""
    anywhere = np.zeros(0, np.uint8)
    for i in np.argsort(-s, kind="mergesort"):
        if cur[i] >= 0:
            continue
        bg = least_peak_gpu(S, W, M, s[i], w[i], anywhere, anywhere)
        if bg < 0:
            return False
        assign[i] = bg
        S[bg] += s[i]
        W[bg] += w[i]
    return True


@njit
def replan_instance(s, w, M, cur, K, assign, steps):
    """Fill ``assign`` (n,) from ``cur`` (n,) with at most ``K`` moved models.  ``steps`` (R, 3)
    receives the applied transfers ``(model, from, to)`` in order (a swap is two rows); returns
    the number of rows, or -1 if a new model fits nowhere."""
    n = s.shape[0]
    G = M.shape[0]
    S = np.zeros(G)
    W = np.zeros(G)
    for i in range(n):
        assign[i] = cur[i]
        if cur[i] >= 0:
            S[cur[i]] += s[i]
            W[cur[i]] += w[i]
    if not place_new(s, w, M, cur, assign, S, W):
        return -1
    moved = 0
    rows = 0
    while rows + 2 <= steps.shape[0]:
        kv = _kvprs(S, W, M)
        worst = _argmax_first(kv, -1)
        t3 = _top3(kv)
        best, best_cost = kv[worst], 3
        ba, bb, bd = -1, -1, -1
        for a in range(n):
            if assign[a] != worst:
                continue
            ca = _moved(cur, a, worst)
            for b in range(-G, n):  # b < 0: move a to GPU b + G; else swap a with model b
                d = b + G if b < 0 else assign[b]
                if d == worst:
                    continue
                s_in = s[b] if b >= 0 else 0.0
                w_in = w[b] if b >= 0 else 0.0
                extra = _moved(cur, a, d) - ca + ((_moved(cur, b, worst) - _moved(cur, b, d)) if b >= 0 else 0)
                if moved + extra > K:
                    continue
                Ss, Ws, Sd, Wd = transfer_loads(S[worst], W[worst], S[d], W[d], s[a], w[a], s_in, w_in)
                if not (fits(Ss, M[worst]) and fits(Sd, M[d])):
                    continue
                new = max(max(safe_div(Ws, M[worst] - Ss), safe_div(Wd, M[d] - Sd)), _max_excluding(t3, worst, d))
                if new + EPS < best or (ba >= 0 and new <= best + EPS and new + EPS < kv[worst]
                                        and extra < best_cost):
                    best, best_cost, ba, bb, bd = new, extra, a, b, d
        if ba < 0:
            break
        s_in = s[bb] if bb >= 0 else 0.0
        w_in = w[bb] if bb >= 0 else 0.0
        S[worst], W[worst], S[bd], W[bd] = transfer_loads(S[worst], W[worst], S[bd], W[bd], s[ba], w[ba], s_in, w_in)
        moved += best_cost
        assign[ba] = bd
        steps[rows, 0], steps[rows, 1], steps[rows, 2] = ba, worst, bd
        rows += 1
        if bb >= 0:
            assign[bb] = worst
            steps[rows, 0], steps[rows, 1], steps[rows, 2] = bb, bd, worst
            rows += 1
    return rows

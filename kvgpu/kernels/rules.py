"""numba kernel for clusters with rules (pins, forbidden GPUs, anti-affinity of shards and
replicas; see :mod:`kvgpu.cluster`): a greedy start that respects them, then the repair search
of :mod:`kvgpu.kernels.search` under the same rules.

The seed pipeline knows no rules, so it is not used here; the start places the most constrained
items first (fewest allowed GPUs, then largest), each where the global max KVPR rises least.
"""

from __future__ import annotations

import numba
import numpy as np

from kvgpu.kernels.cpu import INF, _kvprs, _max_excluding, _sort_desc, _top3, fits, safe_div
from kvgpu.kernels.search import improve_instance

njit = numba.njit(cache=True)


@njit
def least_peak_gpu(S, W, M, si, wi, allowed, taken):
    """The GPU where a model ``(si, wi)`` raises the global max KVPR least (first among equals),
    among those it fits on in memory, ``allowed`` (G,) uint8 (empty: all) and not ``taken``
    (G,) uint8 (empty: none); -1 if none."""
    G = M.shape[0]
    t3 = _top3(_kvprs(S, W, M))
    best, bg = INF, -1
    for g in range(G):
        if not fits(S[g] + si, M[g]) or (allowed.shape[0] and not allowed[g]) or (taken.shape[0] and taken[g]):
            continue
        new = max(safe_div(W[g] + wi, M[g] - S[g] - si), _max_excluding(t3, g, g))
        if bg < 0 or new < best:
            best, bg = new, g
    return bg


@njit
def greedy_start(s, w, M, allowed, group, assign):
    """Fill ``assign`` (n,); returns -1, or the first item that fits on no allowed GPU free of
    its group (then the rules, as far as this greedy order sees, leave it no room)."""
    n = s.shape[0]
    G = M.shape[0]
    n_allowed = np.zeros(n)
    for i in range(n):
        for g in range(G):
            n_allowed[i] += allowed[i, g]
    order = _sort_desc(np.arange(n), -n_allowed, s, s)  # fewest allowed GPUs, then largest
    S = np.zeros(G)
    W = np.zeros(G)
    taken = np.zeros((n, G), np.uint8)  # taken[k, g]: group k already on GPU g
    free = np.zeros(0, np.uint8)
    for i in order:
        bg = least_peak_gpu(S, W, M, s[i], w[i], allowed[i], taken[group[i]] if group[i] >= 0 else free)
        if bg < 0:
            return i
        assign[i] = bg
        S[bg] += s[i]
        W[bg] += w[i]
        if group[i] >= 0:
            taken[group[i], bg] = 1
    return -1


@njit
def solve_with_rules(s, w, M, lb, allowed, group, effort, seed, assign, pos):
    """Greedy start, then ``effort`` rounds of repair under the rules; returns -1 or the item
    the start could not place."""
    failed = greedy_start(s, w, M, allowed, group, assign)
    if failed >= 0:
        return failed
    for i in range(s.shape[0]):
        pos[i] = i
    rules = (np.empty(0, np.int64), -1, allowed, group)
    improve_instance(s, w, M, lb, assign, pos, effort, seed, rules)
    return -1

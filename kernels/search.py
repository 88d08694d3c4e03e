"""numba kernels for search beyond the seed: iterated local search from the seed's answer.

Each round copies the best placement so far, perturbs it (a few models leave the worst GPUs
for random GPUs with room), and re-optimises it with the seed's own ``improve_local`` /
``refine_peak``; a better score tuple replaces the best.  The answer is therefore never worse
than the seed's, and the work is set by ``effort`` (rounds), not by wall time, so results are
the same on every machine for a given ``seed``.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from kvgpu.kernels.cpu import (_argmax_first, _kvprs, _lex_less, _loads, _score, fits, improve_local, refine_peak,
                               safe_div, seed_instance, transfer_loads)

njit = numba.njit(cache=True)


@njit
def _rand(state):
    """xorshift64*: a uniform float in [0, 1) from the one-element uint64 ``state``."""
    x = state[0]
    x ^= x >> np.uint64(12)
    x ^= x << np.uint64(25)
    x ^= x >> np.uint64(27)
    state[0] = x
    return float((x * np.uint64(2685821657736338717)) >> np.uint64(11)) / 9007199254740992.0


@njit
def _perturb(s, w, M, assign, pos, moves, state):
    """Move ``moves`` random models, each off one of the two worst GPUs, to random GPUs where
    they fit in memory (moved models go to the end of their new GPU's list)."""
    G = M.shape[0]
    n = s.shape[0]
    S, W = _loads(assign, pos, s, w, G)
    kv = _kvprs(S, W, M)
    stamp = pos.max() + 1
    for _ in range(moves):
        worst = _argmax_first(kv, -1)
        src = worst
        if G > 1 and _rand(state) < 0.3:
            src = _argmax_first(kv, worst)
        count = 0
        for i in range(n):
            if assign[i] == src:
                count += 1
        if count == 0 or G < 2:
            continue
        pick = int(_rand(state) * count)
        a = -1
        for i in range(n):
            if assign[i] == src:
                if pick == 0:
                    a = i
                    break
                pick -= 1
        start = int(_rand(state) * G)
        for k in range(G):
            d = (start + k) % G
            if d != src and fits(S[d] + s[a], M[d]):
                S[src], W[src], S[d], W[d] = transfer_loads(S[src], W[src], S[d], W[d], s[a], w[a], 0.0, 0.0)
                kv[src] = safe_div(W[src], M[src] - S[src])
                kv[d] = safe_div(W[d], M[d] - S[d])
                assign[a] = d
                pos[a] = stamp
                stamp += 1
                break


@njit
def search_instance(s, w, M, assign, pos, effort, seed):
    """The seed pipeline, then ``effort`` rounds of iterated local search; fills ``assign``/``pos``
    with the best placement found (never worse than the seed's); False if nothing packed."""
    if not seed_instance(s, w, M, assign, pos):
        return False
    n = s.shape[0]
    if n == 0 or effort <= 0:
        return True
    state = np.empty(1, np.uint64)
    state[0] = np.uint64(seed) * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)
    best_sc = np.empty(3)
    _score(s, w, M, assign, pos, best_sc)
    cur_a = np.empty(n, np.int64)
    cur_p = np.empty(n, np.int64)
    sc = np.empty(3)
    for it in range(effort):
        cur_a[:] = assign
        cur_p[:] = pos
        _perturb(s, w, M, cur_a, cur_p, 1 + it % 3, state)
        improve_local(s, w, M, cur_a, cur_p, 4000)
        refine_peak(s, w, M, cur_a, cur_p, 2, 12)
        improve_local(s, w, M, cur_a, cur_p, 1500)
        _score(s, w, M, cur_a, cur_p, sc)
        if _lex_less(sc, best_sc, 3):
            best_sc[:] = sc
            assign[:] = cur_a
            pos[:] = cur_p
    return True


@numba.njit(cache=True, parallel=True)
def search_batch(sizes, demand, gpu_mem, n_models, n_gpus, effort, seed, assign, pos, ok):
    """:func:`search_instance` for every instance of a compacted batch, in parallel.  Every
    instance starts its own random stream from ``seed``, so an instance gets the same answer
    alone or in any batch."""
    for b in prange(sizes.shape[0]):
        n, G = n_models[b], n_gpus[b]
        ok[b] = search_instance(sizes[b, :n], demand[b, :n], gpu_mem[b, :G], assign[b, :n], pos[b, :n],
                                effort, seed)

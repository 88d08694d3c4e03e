"""numba kernels for search beyond the seed, from any placement that satisfies the rules.

Two searches alternate, round by round (see :func:`improve_instance`):

* **repair at a target** ``T`` below the best max KVPR: "every GPU at KVPR <= T" is a bin
  packing with item sizes ``s + w / T``; a tabu search with breakout weights (:func:`repair`)
  moves and swaps models between any pair of GPUs to remove the overflow, from the best
  placement or from a fresh packing at ``T`` (other structures, e.g. three models beside a
  lone one).  This is what closes most of the gap on big, nearly full clusters.  At ``T = inf``
  the load is the memory alone, and the same search makes an overfull start fit
  (:mod:`kvgpu.kernels.start`).
* **iterated local search**: perturb the worst GPUs, re-run the seed's ``improve_local`` and
  ``refine_peak``; this polishes the peak and the runner-up GPUs.

Every step of both keeps the rules of :mod:`kvgpu.kernels.rules` (allowed GPUs, anti-affinity,
nodes, the migration budget).  Only a better score (:func:`kvgpu.kernels.deltas.better`: max,
second max, mean, each with a relative tolerance) replaces the best placement, and never one
worse than the start, so the answer is never worse than the seed's; the work is set by
``effort`` (rounds), not by wall time, so results are the same on every machine for a given
``seed``.

Like :mod:`kvgpu.kernels.cpu`, the ``*_core`` functions allocate nothing and are run by every
thread ``tid`` of ``nt`` of a CUDA block (the CPU calls them with ``(0, 1)``): the threads share
a repair step's scan of moves and exchanges and the rows of :func:`polish_second_core`'s scan,
thread 0 does the rest.  The repair step's choice
is the least ``(delta, key)``, ``key`` a hash of the candidate and a per-step random salt
(:func:`_tie_key`): an order-independent rule, so any number of threads scanning in any order
choose what the serial loop chooses, and equal deltas are still broken at random.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from kvgpu.kernels.jit import barrier, kernel
from kvgpu.kernels import deltas, params
from kvgpu.kernels.cpu import (REFINE_PASSES, REFINE_TOP_K, argmax_first, fits, gpu_lists_into, improve_local_core,
                              kvprs_into, list_loads_into, local_values, next_stamp, own_first, refine_peak_core,
                              refine_values, safe_div, score_core)
from kvgpu.kernels.deltas import fmul
from kvgpu.kernels.sorting import argsort_into
from kvgpu.kernels.u64 import wrap_add, wrap_mul
from kvgpu.kernels.rules import (budget_held, coloc_held, may_place, new_state, no_rules, place, reset_state,
                                 restricted, transfer_apply, transfer_check, unplace)

njit = kernel()
_inline = kernel(inline=True)
overflow = _inline(deltas.overflow)
mem_unit = _inline(deltas.mem_unit)
better = _inline(deltas.better)

INF = np.inf
EPS = deltas.EPS
CAP_SLACK = params.CAP_SLACK
#: A repair step whose best delta is above ``-TIE`` does not improve (a local minimum).
TIE = 1e-12
#: The search stops once the best is within this relative gap of the lower bound (0.05%).
STOP_GAP = 5e-4
#: Rounds without a better placement after which the search stops, unless ``patience`` says:
#: at least this, and a fifth of ``effort`` (so more effort is more search).
PATIENCE_MIN, PATIENCE_SHARE = 6, 0.2
#: Share of the stuck repair steps that also try two-for-one and one-for-two exchanges.
PAIR_SHARE = 0.25
#: Relative jitter of the sort keys of a fresh packing.
JITTER = 0.1
TENURE_MIN, TENURE_SPAN = 3, 8
#: Work of one repair attempt: BASE + PER_MODEL * n tabu steps, and at most about
#: SCANS_PER_MODEL * n move/swap evaluations (many models per GPU make steps expensive).
REPAIR_STEPS_BASE, REPAIR_STEPS_PER_MODEL, REPAIR_SCANS_PER_MODEL = 20, 20, 25_000
#: Repair targets ``T = best * (1 - frac)``; ``frac`` doubles on success, halves on failure.
FRAC_START, FRAC_MIN, FRAC_MAX = 0.05, 1e-4, 0.2
#: Steps of :func:`polish_second` after a search.
POLISH_ITERS = 200
#: Work limits of :func:`polish_second`, in exchanges scanned: in all, and for one scan of the
#: two-model exchanges (quadratic in the models per GPU: skipped where GPUs hold hundreds).
POLISH_SCANS, POLISH_PAIR_SCANS = 5e7, 4e6


def default_patience(effort: int) -> int:
    """Rounds without gain before the search stops: ``max(PATIENCE_MIN, effort * PATIENCE_SHARE)``."""
    return max(PATIENCE_MIN, int(effort * PATIENCE_SHARE))


@njit
def rand_uniform(state):
    """xorshift64*: a uniform float in [0, 1) from the one-element uint64 ``state`` (products
    and sums wrap through :mod:`kvgpu.kernels.u64`: the same values, and no overflow warning
    where a kernel runs as Python)."""
    x = state[0]
    x ^= x >> np.uint64(12)
    x ^= x << np.uint64(25)
    x ^= x >> np.uint64(27)
    state[0] = x
    return float(wrap_mul(x, np.uint64(2685821657736338717)) >> np.uint64(11)) / 9007199254740992.0


@_inline
def _rand_int(state, k):
    """Uniform integer in ``[0, k)``."""
    return min(int(rand_uniform(state) * k), k - 1)


@_inline
def _cap(M, g):
    """Capacity of GPU ``g`` in the overflow test: its memory plus a slack, so that rounding
    (~1e-13 GB) never reads as overflow; it only makes a target easier, never a proof wrong."""
    return M[g] + fmul(CAP_SLACK, mem_unit(M[g]))


@_inline
def _collect(ids, value, out):
    """Write the items ``i`` with ``ids[i] == value`` into ``out`` (index order); their count."""
    m = 0
    for i in range(ids.shape[0]):
        if ids[i] == value:
            out[m] = i
            m += 1
    return m


@njit
def _move_random(s, w, M, assign, pos, S, W, kv, src, stamp, state, rules, rstate):
    """Move a random model of GPU ``src`` to a random GPU where it fits and the rules allow it.
    Returns the next stamp."""
    G = M.shape[0]
    n = s.shape[0]
    count = 0
    for i in range(n):
        if assign[i] == src:
            count += 1
    if count == 0 or G < 2:
        return stamp
    pick = _rand_int(state, count)
    a = -1
    for i in range(n):
        if assign[i] == src:
            if pick == 0:
                a = i
                break
            pick -= 1
    start = _rand_int(state, G)
    for k in range(G):
        d = (start + k) % G
        if d != src and fits(S[d] + s[a], M[d]) and transfer_check(rules, rstate, src, d, a, np.int64(-1), np.int64(-1), np.int64(-1))[0]:
            transfer_apply(rules, rstate, src, d, a, np.int64(-1), np.int64(-1), np.int64(-1))
            S[src] -= s[a]
            W[src] -= w[a]
            S[d] += s[a]
            W[d] += w[a]
            kv[src] = safe_div(W[src], M[src] - S[src])
            kv[d] = safe_div(W[d], M[d] - S[d])
            assign[a] = d
            pos[a] = stamp
            return stamp + 1
    return stamp


@njit
def _node_count(rules, G):
    nn = 0
    for g in range(G):
        nn = max(nn, rules[3][g] + 1)
    return nn


@njit
def _group_to(s, w, M, assign, S, W, rules, rstate, members, old, m, node):
    """Move the ``m`` items ``members`` (a node group, now on GPUs ``old``) into ``node``, each
    to the GPU there it may use with the most free memory.  True if all fit within the rules and
    the budget (``S``, ``W``, ``assign``, ``rstate`` updated); otherwise nothing changes."""
    node_of = rules[3]
    G = M.shape[0]
    for q in range(m):  # take the group off, then place it shard by shard in ``node``
        unplace(rules, rstate, members[q], old[q])
        S[old[q]] -= s[members[q]]
        W[old[q]] -= w[members[q]]
        assign[members[q]] = -1
    placed = 0
    for q in range(m):
        i = members[q]
        best, room = -1, -INF
        for g in range(G):
            if node_of[g] == node and fits(S[g] + s[i], M[g]) and may_place(rules, rstate, i, g):
                if M[g] - S[g] > room:
                    best, room = g, M[g] - S[g]
        if best < 0:
            break
        place(rules, rstate, i, best)
        S[best] += s[i]
        W[best] += w[i]
        assign[i] = best
        placed += 1
    if placed == m and budget_held(rules, rstate) and _adapters_kept(rules, rstate, old, m):
        return True
    _group_back(s, w, assign, S, W, rules, rstate, members, old, placed, m)
    return False


@njit
def _adapters_kept(rules, rstate, old, m):
    """Does every adapter on the GPUs ``old[:m]`` a group left still find its base there?"""
    if rules[10].shape[0] == 0:
        return True
    for q in range(m):
        if not coloc_held(rules, rstate, old[q]):
            return False
    return True


@njit
def _group_back(s, w, assign, S, W, rules, rstate, members, old, placed, m):
    """Undo :func:`_group_to`: the first ``placed`` members leave their new GPUs, all go home."""
    for q in range(placed):
        i = members[q]
        unplace(rules, rstate, i, assign[i])
        S[assign[i]] -= s[i]
        W[assign[i]] -= w[i]
    for q in range(m):
        i = members[q]
        assign[i] = old[q]
        place(rules, rstate, i, old[q])
        S[old[q]] += s[i]
        W[old[q]] += w[i]


@njit
def _relocate_group(s, w, M, assign, pos, S, W, kv, a, stamp, state, rules, rstate, members, old):
    """Move the node group of item ``a`` (the tp shards of one replica, which must share a
    node) as a whole to a random other node (:func:`_group_to`); nothing happens if memory,
    rules or budget do not allow it anywhere.  ``members``, ``old`` (n,) int64 working memory.
    Returns the next stamp."""
    G = M.shape[0]
    nn = _node_count(rules, G)
    here = rules[3][assign[a]]
    if nn < 2:
        return stamp
    m = _collect(rules[2], rules[2][a], members)
    for q in range(m):
        old[q] = assign[members[q]]
    first = _rand_int(state, nn)
    for t in range(nn):
        node = (first + t) % nn
        if node != here and _group_to(s, w, M, assign, S, W, rules, rstate, members, old, m, node):
            for q in range(m):
                pos[members[q]] = stamp
                stamp += 1
            for g in range(G):
                kv[g] = safe_div(W[g], M[g] - S[g])
            return stamp
    return stamp


@njit
def _perturb(s, w, M, assign, pos, moves, state, rules, rstate, members, old, fw, iw):
    """Move ``moves`` random models, each off one of the two worst GPUs, to random GPUs where
    they fit in memory and the rules allow it (moved models go to the end of their new GPU's
    list); a model in a node group sometimes takes its whole group to another node instead.
    fw (3G,), iw (2n,) working memory."""
    G = M.shape[0]
    n = s.shape[0]
    S, W, kv = fw[:G], fw[G:2 * G], fw[2 * G:3 * G]
    list_loads_into(assign, pos, s, w, S, W, iw[:n], iw[n:2 * n])
    kvprs_into(S, W, M, kv)
    stamp = next_stamp(pos)
    grouped_nodes = rules[2].shape[0] > 0
    for _ in range(moves):
        worst = argmax_first(kv, np.int64(-1))
        src = worst
        if G > 1 and rand_uniform(state) < 0.3:
            src = argmax_first(kv, worst)
        if grouped_nodes and rand_uniform(state) < 0.5:
            a = _random_member(assign, src, state)
            if a >= 0 and rules[2][a] >= 0:
                stamp = _relocate_group(s, w, M, assign, pos, S, W, kv, a, stamp, state, rules, rstate, members, old)
                continue
        stamp = _move_random(s, w, M, assign, pos, S, W, kv, src, stamp, state, rules, rstate)


@njit
def _random_member(assign, g, state):
    """A random item on GPU ``g`` (-1 if none)."""
    count = 0
    for i in range(assign.shape[0]):
        if assign[i] == g:
            count += 1
    if count == 0:
        return -1
    pick = _rand_int(state, count)
    for i in range(assign.shape[0]):
        if assign[i] == g:
            if pick == 0:
                return i
            pick -= 1
    return -1


@njit
def _pick_overflowing(A, cap, state):
    """A random GPU whose load exceeds its capacity ``cap`` (G,); -1 if none."""
    cnt = 0
    for g in range(A.shape[0]):
        if A[g] > cap[g]:
            cnt += 1
    if cnt == 0:
        return -1
    k = _rand_int(state, cnt)
    for g in range(A.shape[0]):
        if A[g] > cap[g]:
            if k == 0:
                return g
            k -= 1
    return -1


@_inline
def _partner(j, G, assign, s, ld):
    """The other side of an exchange in :func:`repair`'s scans: ``j < 0`` is GPU ``j + G``
    taking the models with nothing back, else model ``j`` coming back from its GPU.  Returns
    ``(GPU, its load at T, its size, j or -1)``; ``ld`` (n,) the loads ``s + w / T``."""
    if j < 0:
        return j + G, 0.0, 0.0, np.int64(-1)
    return assign[j], ld[j], s[j], j


@_inline
def _exchange(S, A, cap, mfit, wgt, g, h, aX, sX, aY, sY, og):
    """GPU ``g`` gives models of total load ``aX`` / size ``sX`` to ``h`` and takes ``aY`` /
    ``sY`` back: ``(fits in memory, weighted overflow change, overflow change)``.  ``cap``,
    ``mfit`` (G,): each GPU's capacity in the overflow test (:func:`_cap`) and the memory a
    model set may fill (:func:`kvgpu.kernels.deltas.fits`), precomputed."""
    Sg, Sh = S[g] - sX + sY, S[h] - sY + sX
    if not ((Sg <= mfit[g] or Sg <= S[g]) and (Sh <= mfit[h] or Sh <= S[h])):  # memory kept, or not worse
        return False, 0.0, 0.0
    dg = overflow(A[g] - aX + aY, cap[g]) - og
    dh = overflow(A[h] - aY + aX, cap[h]) - overflow(A[h], cap[h])
    return True, fmul(wgt[g], dg) + fmul(wgt[h], dh), dg + dh


@_inline
def _is_tabu(tabu_gpu, tabu_until, i, dst, step):
    return i >= 0 and tabu_gpu[i] == dst and tabu_until[i] > step


@_inline
def _blocked(tabu_gpu, tabu_until, step, g, h, x1, x2, y1, y2, F_after, best_F):
    """An exchange (models ``x1``, ``x2`` g -> h, ``y1``, ``y2`` h -> g; -1 for none) is barred
    when one of them would go straight back to a GPU it is tabu for, unless it reaches the
    lowest total overflow so far (aspiration)."""
    tabu = (_is_tabu(tabu_gpu, tabu_until, x1, h, step) or _is_tabu(tabu_gpu, tabu_until, x2, h, step)
            or _is_tabu(tabu_gpu, tabu_until, y1, g, step) or _is_tabu(tabu_gpu, tabu_until, y2, g, step))
    return tabu and not F_after < best_F - TIE


@_inline
def _tie_key(salt, cand):
    """A pseudo-random key in ``[0, 2^63)`` of candidate ``cand`` (a step's unique candidate
    number) under the step's random ``salt`` (splitmix64): equal deltas are broken by it, the
    same way whichever thread sees which candidate first."""
    z = wrap_add(np.uint64(salt), wrap_mul(np.uint64(cand), np.uint64(0x9E3779B97F4A7C15)))
    z = wrap_mul(z ^ (z >> np.uint64(30)), np.uint64(0xBF58476D1CE4E5B9))
    z = wrap_mul(z ^ (z >> np.uint64(27)), np.uint64(0x94D049BB133111EB))
    z = z ^ (z >> np.uint64(31))
    return np.int64(z >> np.uint64(1))


@_inline
def _less(d, key, best_d, best_key):
    """``(d, key) < (best_d, best_key)`` lexicographically: the repair step's choice rule."""
    return d < best_d or (d == best_d and key < best_key)


@njit
def _admit(F_after, best_F, tabu_gpu, tabu_until, step, g, h, x1, x2, y1, y2, rules, rstate):
    """May an exchange between ``g`` and ``h`` that fits in memory be taken (tabu, rules; see
    :func:`repair`)?  Called only for the few candidates that would be the best so far, so the
    scan itself stays a tight loop."""
    if _blocked(tabu_gpu, tabu_until, step, g, h, x1, x2, y1, y2, F_after, best_F):
        return False
    return not (restricted(rules) and not transfer_check(rules, rstate, g, h, x1, x2, y1, y2)[0])


@njit
def _apply_transfer(s, w, S, W, assign, pos, stamp, g, h, x1, x2, y1, y2, rules, rstate):
    """Move ``x1``, ``x2`` from GPU ``g`` to ``h`` and ``y1``, ``y2`` back (-1: none), updating
    the loads ``S``, ``W`` (G,), the rule bookkeeping and the list stamps; returns the next
    stamp.  The one way the search applies a transfer it has checked."""
    transfer_apply(rules, rstate, g, h, x1, x2, y1, y2)
    for x, src, dst in ((x1, g, h), (x2, g, h), (y1, h, g), (y2, h, g)):
        if x >= 0:
            S[src] -= s[x]
            W[src] -= w[x]
            S[dst] += s[x]
            W[dst] += w[x]
            assign[x] = dst
            pos[x] = stamp
            stamp += 1
    return stamp


#: Entries of a thread's best exchange in the reductions of :func:`repair_core`: its delta in
#: ``fw``, and ``(key, x1, x2, y1, y2, h, evaluations)`` in ``iw``.
RED = 7
#: A key above every :func:`_tie_key`.
NO_KEY = np.int64(2 ** 63 - 1)


@njit
def _scan_singles(s, ld, assign, S, A, cap, mfit, wgt, tabu_gpu, tabu_until, mem, m, g, og, F, best_F, step, salt,
                  rules, rstate, tid, nt):
    """The best move or swap of a model of GPU ``g`` (its ``m`` models ``mem[:m]``) among the
    candidates of thread ``tid`` of ``nt``: ``(delta, key, model, partner or -1, GPU)``.
    Candidate ``k = p (n + G) + j + G``: model ``mem[p]`` and partner ``j`` (:func:`_partner`);
    ``ld`` (n,) the loads ``s + w / T``."""
    n = s.shape[0]
    G = S.shape[0]
    none = np.int64(-1)
    best_d, best_k, bi, bj, bh = INF, NO_KEY, none, none, none
    span = n + G
    for p in range(m):  # candidate k = p span + r, r = j + G; this thread's are k = tid (mod nt)
        i = mem[p]
        for r in range(own_first(p * span, 0, tid, nt), span, nt):
            h, aj, sj, jj = _partner(r - G, G, assign, s, ld)
            if h == g:
                continue
            ok, d, raw = _exchange(S, A, cap, mfit, wgt, g, h, ld[i], s[i], aj, sj, og)
            if not ok or d > best_d:
                continue
            key = _tie_key(salt, p * span + r)
            if _less(d, key, best_d, best_k) and _admit(F + raw, best_F, tabu_gpu, tabu_until, step, g, h, i, none, jj,
                                                        none, rules, rstate):
                best_d, best_k, bi, bj, bh = d, key, i, jj, h
    return best_d, best_k, bi, bj, bh


@njit
def _scan_pairs(s, ld, wT, assign, S, A, cap, mfit, wgt, tabu_gpu, tabu_until, mem, m, lst, start, g, og, F, best_F,
                step, salt, rules, rstate, tid, nt):
    """The best two-for-one (or two-for-none) and one-for-two exchange of GPU ``g`` among the
    candidates of thread ``tid`` of ``nt`` (``lst``/``start``: models by GPU; ``ld``, ``wT``
    (n,): ``s + w / T`` and ``w / T``): ``(delta, key, x1, x2, y1, y2, GPU, evaluations)``."""
    n = s.shape[0]
    G = S.shape[0]
    none = np.int64(-1)
    best_d, best_k, bi, bi2, bj, bj2, bh = INF, NO_KEY, none, none, none, none, none
    evals = 0
    span = n + G
    base1 = m * span
    base2 = base1 + m * m * span
    for p in range(m):  # two of g's models for one elsewhere, or for none: candidates k = p m + q, q > p
        for q in range(own_first(p * m, p + 1, tid, nt), m, nt):  # nested: no division per candidate
            k = p * m + q
            i, i2 = mem[p], mem[q]
            aX = ld[i] + s[i2] + wT[i2]  # = s[i] + w[i] / T + s[i2] + w[i2] / T, summed in that order
            sX = s[i] + s[i2]
            for j in range(-G, n):  # j < 0: both to GPU j + G; else both for model j
                h, aj, sj, jj = _partner(j, G, assign, s, ld)
                if h == g:
                    continue
                evals += 1
                ok, d, raw = _exchange(S, A, cap, mfit, wgt, g, h, aX, sX, aj, sj, og)
                if not ok or d > best_d:
                    continue
                key = _tie_key(salt, base1 + k * span + j + G)
                if _less(d, key, best_d, best_k) and _admit(F + raw, best_F, tabu_gpu, tabu_until, step, g, h, i, i2,
                                                            jj, none, rules, rstate):
                    best_d, best_k, bi, bi2, bj, bj2, bh = d, key, i, i2, jj, none, h
    for p in range(m):  # one of g's models for two on another GPU: candidates k = p n + u
        i = mem[p]
        for u in range(own_first(p * n, 0, tid, nt), n, nt):
            k = p * n + u
            j = lst[u]
            h = assign[j]
            if h == g:
                continue
            for v in range(u + 1, start[h + 1]):
                j2 = lst[v]
                aY = ld[j] + s[j2] + wT[j2]
                evals += 1
                ok, d, raw = _exchange(S, A, cap, mfit, wgt, g, h, ld[i], s[i], aY, s[j] + s[j2], og)
                if not ok or d > best_d:
                    continue
                key = _tie_key(salt, base2 + k * n + v)
                if _less(d, key, best_d, best_k) and _admit(F + raw, best_F, tabu_gpu, tabu_until, step, g, h, i,
                                                            none, j, j2, rules, rstate):
                    best_d, best_k, bi, bi2, bj, bj2, bh = d, key, i, none, j, j2, h
    return best_d, best_k, bi, bi2, bj, bj2, bh, evals


@_inline
def _put(red_f, red_i, t, d, key, x1, x2, y1, y2, h, evals):
    """Thread ``t``'s best exchange into the reduction arrays (see :data:`RED`)."""
    red_f[t] = d
    o = t * RED
    red_i[o], red_i[o + 1], red_i[o + 2], red_i[o + 3], red_i[o + 4] = key, x1, x2, y1, y2
    red_i[o + 5], red_i[o + 6] = h, evals


@_inline
def _reduce(red_f, red_i, nt, d, key, x1, x2, y1, y2, h):
    """The least ``(delta, key)`` of the threads' bests and ``(d, key, ...)``, and the total
    evaluations: ``(d, key, x1, x2, y1, y2, h, evaluations)``."""
    evals = 0
    for t in range(nt):
        o = t * RED
        evals += red_i[o + 6]
        if red_i[o + 1] >= 0 and (x1 < 0 or _less(red_f[t], red_i[o], d, key)):
            d, key, x1, x2, y1, y2, h = red_f[t], red_i[o], red_i[o + 1], red_i[o + 2], red_i[o + 3], red_i[o + 4], \
                red_i[o + 5]
    return d, key, x1, x2, y1, y2, h, evals


@njit
def repair_core(s, w, M, assign, pos, T, steps, state, scratch, rules, rstate, fw, iw, tid, nt):
    """Try to bring every GPU to KVPR <= ``T``; in place, True on success.

    At a target ``T`` a GPU's KVPR is ``<= T`` iff its load ``A = S + W / T`` is at most its
    memory ``M`` (a bin packing with item sizes ``s + w / T``; at ``T = inf`` memory alone).
    This is a tabu search on the weighted overflow ``sum_g wgt_g * max(0, A_g - M_g)``: each
    step takes a random overflowing GPU and makes the best move of one of its models to any
    GPU, or swap with any model elsewhere, even when no step improves -- moving overflow
    around is how it leaves local minima.  A model may not return to the GPU it left for a few
    steps unless that gives the lowest (unweighted) overflow so far; at a local minimum the
    weights of the overflowing GPUs grow (breakout), so overflow is pushed to other GPUs.
    At a ``PAIR_SHARE`` of those stuck steps it also tries two models of the GPU for one
    elsewhere (or for none) and one for two, which changes how many models a GPU holds; that
    extra work is charged to ``steps``, which bounds the work.  The best is the least
    ``(delta, key)`` (module doc): the threads ``tid`` of ``nt`` scan, thread 0 applies.

    Memory: no step makes a GPU exceed its memory, or an overfull one fuller.  Every step keeps
    ``rules`` (:mod:`kvgpu.kernels.rules`; ``rstate``, their bookkeeping of ``assign``, is
    updated).  ``scratch = (tabu_gpu, tabu_until, mem, lst)`` (n,) int64, ``(S, W, A, wgt, cap,
    mfit)`` (G,) float64, ``start`` (G + 1,) int64 and ``ident`` = ``arange(n)``
    (:func:`new_scratch`); fw (nt + 2 + 2n,), iw (8 + RED nt,) for the models' loads at ``T``
    and the threads' reductions.
    """
    n = s.shape[0]
    G = M.shape[0]
    tabu_gpu, tabu_until, mem, lst, S, W, A, wgt, cap, mfit, start, ident = scratch
    box, red_i = iw[:8], iw[8:8 + RED * nt]
    red_f, fbox, ld, wT = fw[:nt], fw[nt:nt + 2], fw[nt + 2:nt + 2 + n], fw[nt + 2 + n:nt + 2 + 2 * n]
    none = np.int64(-1)
    stamp = 0
    step = 0
    F = best_F = 0.0
    if tid == 0:
        for g in range(G):
            S[g] = 0.0
            W[g] = 0.0
        for i in range(n):
            S[assign[i]] += s[i]
            W[assign[i]] += w[i]
            tabu_until[i] = -1
            wT[i] = w[i] / T
            ld[i] = s[i] + wT[i]  # a model's load at T, as s[i] + w[i] / T
        for g in range(G):
            cap[g] = _cap(M, g)
            mfit[g] = M[g] + fmul(EPS, mem_unit(M[g]))
            A[g] = S[g] + W[g] / T
            F += overflow(A[g], cap[g])
            wgt[g] = 1.0
        best_F = F
        stamp = next_stamp(pos)
    while True:
        if tid == 0:  # the step's GPU, or the end: box[0] = -1 success, -2 out of steps
            if step >= steps:
                box[0], box[1] = -2, _pick_overflowing(A, cap, state) < 0
            else:
                g = _pick_overflowing(A, cap, state)
                box[0] = g
                if g >= 0:
                    box[1] = _collect(assign, g, mem)
                    box[2] = np.int64(rand_uniform(state) * 4503599627370496.0)  # the step's tie salt
                    box[3] = step
                    fbox[0], fbox[1] = F, best_F
        barrier()
        g = box[0]
        if g < 0:
            res = g == -1 or box[1] == 1
            barrier()  # every thread has read the box before thread 0 reuses the memory
            return res
        m, salt, stp, Fs, bFs = box[1], box[2], box[3], fbox[0], fbox[1]
        og = overflow(A[g], cap[g])
        d, key, x1, y1, h = _scan_singles(s, ld, assign, S, A, cap, mfit, wgt, tabu_gpu, tabu_until, mem, m, g, og,
                                          Fs, bFs, stp, salt, rules, rstate, tid, nt)
        _put(red_f, red_i, tid, d, key, x1, none, y1, none, h, 0)
        barrier()
        best_d, best_k, bi, bi2, bj, bj2, bh = INF, NO_KEY, none, none, none, none, none
        if tid == 0:
            best_d, best_k, bi, bi2, bj, bj2, bh, _ = _reduce(red_f, red_i, nt, best_d, best_k, bi, bi2, bj, bj2, bh)
            # stuck with single moves and swaps: try two models for one, and one for two; the
            # extra evaluations count against the step budget, so an attempt's work stays bounded
            box[4] = best_d >= -TIE and rand_uniform(state) < PAIR_SHARE
            if box[4]:
                gpu_lists_into(assign, ident, lst, start)
        barrier()
        pair_evals = 0
        if box[4]:
            d, key, x1, x2, y1, y2, h, ev = _scan_pairs(s, ld, wT, assign, S, A, cap, mfit, wgt, tabu_gpu, tabu_until,
                                                        mem, m, lst, start, g, og, Fs, bFs, stp, salt, rules, rstate,
                                                        tid, nt)
            _put(red_f, red_i, tid, d, key, x1, x2, y1, y2, h, ev)
            barrier()
            if tid == 0:
                best_d, best_k, bi, bi2, bj, bj2, bh, pair_evals = _reduce(red_f, red_i, nt, best_d, best_k, bi, bi2,
                                                                           bj, bj2, bh)
        if tid == 0:
            box[5] = bi < 0
            if bi >= 0:
                if best_d >= -TIE:  # no improving step: a local minimum of the weighted overflow
                    for q in range(G):
                        if A[q] > cap[q]:
                            wgt[q] += 1.0
                stamp = _apply_transfer(s, w, S, W, assign, pos, stamp, g, bh, bi, bi2, bj, bj2, rules, rstate)
                tenure = TENURE_MIN + _rand_int(state, TENURE_SPAN)
                for x, src in ((bi, g), (bi2, g), (bj, bh), (bj2, bh)):
                    if x >= 0:
                        tabu_gpu[x] = src
                        tabu_until[x] = step + tenure
                A[g] = S[g] + W[g] / T
                A[bh] = S[bh] + W[bh] / T
                F = 0.0
                for q in range(G):
                    F += overflow(A[q], cap[q])
                if F < best_F:
                    best_F = F
                single = max(1, m * (n + G))
                step += 1 + (pair_evals + single - 1) // single
        barrier()
        if box[5]:
            barrier()
            return False


@njit
def repair_memory(n):
    """Working memory of :func:`repair_core` on one CPU thread for ``n`` models: ``(fw, iw)``."""
    return np.empty(3 + 2 * n), np.empty(8 + RED, np.int64)


def repair(s, w, M, assign, pos, T, steps, state, scratch, rules, rstate):
    """Try to bring every GPU to KVPR <= ``T`` (CPU entry of :func:`repair_core`)."""
    return repair_core(s, w, M, assign, pos, T, steps, state, scratch, rules, rstate, *repair_memory(s.shape[0]),
                       0, 1)


@njit
def new_scratch(n, G):
    """Working memory of :func:`repair` (allocated; see :func:`scratch_in`)."""
    return (np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64),
            np.empty(G), np.empty(G), np.empty(G), np.empty(G), np.empty(G), np.empty(G), np.empty(G + 1, np.int64),
            np.arange(n))


@njit
def scratch_in(n, G, fw, iw):
    """The working memory of :func:`repair_core` as views of fw (6G,) and iw (5n + G + 1,); the
    caller fills ``ident`` (the last) with ``arange(n)``."""
    sc_i = (iw[:n], iw[n:2 * n], iw[2 * n:3 * n], iw[3 * n:4 * n])
    ident = iw[4 * n:5 * n]
    return (sc_i[0], sc_i[1], sc_i[2], sc_i[3], fw[:G], fw[G:2 * G], fw[2 * G:3 * G], fw[3 * G:4 * G],
            fw[4 * G:5 * G], fw[5 * G:6 * G], iw[5 * n:5 * n + G + 1], ident)


@njit
def repair_steps(n, G):
    """Step budget of one :func:`repair` attempt: a step scans ~ (n / G) models x (n + G) moves
    and swaps; the total scans of an attempt are capped."""
    per_step = max(1.0, n / G * (n + G))
    return REPAIR_STEPS_BASE + min(REPAIR_STEPS_PER_MODEL * n, int(REPAIR_SCANS_PER_MODEL * n / per_step))


@njit
def _pack_at(s, w, M, T, state, assign, pos, S, A, rules, rstate, fw, iw):
    """A fresh start for :func:`repair` at target ``T``: models by ``s + w / T`` with random
    jitter, largest first, each on the GPU it fits best (least load room left), or -- when
    it fits nowhere under ``T`` -- on the GPU it overflows least; only GPUs the rules allow.
    False if memory (or the rules) leave a model no GPU.  fw (n,), iw (2n,)."""
    n = s.shape[0]
    G = M.shape[0]
    key = fw[:n]
    for i in range(n):
        key[i] = -(s[i] + w[i] / T) * (1.0 + fmul(JITTER, rand_uniform(state)))
        if rules[10].shape[0] and rules[10][i] >= 0:
            key[i] = INF  # adapters after every base: they need one to sit beside
        assign[i] = -1
    reset_state(rules, rstate, assign)
    for g in range(G):
        S[g] = 0.0
        A[g] = 0.0
    order = iw[:n]
    argsort_into(key, order, iw[n:2 * n])
    for k in range(n):
        i = order[k]
        ai = s[i] + w[i] / T
        best, best_r = -1, INF
        for g in range(G):
            if not fits(S[g] + s[i], M[g]) or not may_place(rules, rstate, i, g):
                continue
            r = M[g] - A[g] - ai  # >= 0: room left; < 0: overflow (ranked after any room)
            r = r if r >= -CAP_SLACK else 1e300 - r
            if r < best_r:
                best, best_r = g, r
        if best < 0:
            return False
        S[best] += s[i]
        A[best] += ai
        assign[i] = best
        place(rules, rstate, i, best)
        pos[i] = k
    return True


@njit
def _copy(src, dst):
    for i in range(src.shape[0]):
        dst[i] = src[i]


@njit
def _take_if_better(s, w, M, cand_a, cand_p, assign, pos, best_sc, start_sc, sc, fw, iw):
    """Replace the best by the candidate if its score is better (with tolerance) and not worse
    than the start's, so a chain of near-ties can never drift above where the search began.
    fw (3G,), iw (2n,) working memory."""
    score_core(s, w, M, cand_a, cand_p, sc, fw, iw)
    if better(sc[0], sc[1], sc[2], best_sc[0], best_sc[1], best_sc[2]) and not better(
            start_sc[0], start_sc[1], start_sc[2], sc[0], sc[1], sc[2]):
        _copy(sc, best_sc)
        _copy(cand_a, assign)
        _copy(cand_p, pos)
        return True
    return False


@njit
def improve_work(n, G, nt):
    """``(floats, ints)``: the working memory :func:`improve_instance_core` needs for ``n``
    models, ``G`` GPUs and ``nt`` threads."""
    values = max(local_values(n, G, nt), refine_values(REFINE_TOP_K, nt), polish_values(n, G, nt))
    tail_f = 3 * G + 4 + values + nt + 2 + 2 * n
    tail_i = 6 * n + 3 * G + 32 + RED * nt
    return 10 + 6 * G + tail_f, 9 * n + G + 5 + tail_i


@njit
def improve_instance_core(s, w, M, lb, assign, pos, effort, patience, seed, rules, rstate, fw, iw, state, tid, nt):
    """``effort`` search rounds from the placement ``assign``/``pos`` (in place; the result is
    never worse).  The random stream starts from ``seed`` alone, so an instance gets the same
    answer whatever batch it is solved in; another ``seed`` is an independent restart.

    A round is (1) one :func:`repair_core` attempt at a target a little below the best max
    KVPR -- the step shrinks after a failure and grows after a success, never below the lower
    bound ``lb``; odd rounds start it from a fresh packing (not in re-placements, where a fresh
    packing would move everything), even ones from the best placement -- and (2) one round of
    iterated local search: perturb the best placement and re-optimise it with the seed's
    ``improve_local`` / ``refine_peak``.  Rounds stop within ``STOP_GAP`` of ``lb`` or after
    ``patience`` rounds without a better placement.  Every step keeps ``rules`` (``rstate``
    their bookkeeping of ``assign``).

    Every thread ``tid`` of ``nt`` calls it (module doc); thread 0 decides.  fw, iw of
    :func:`improve_work` entries; ``state`` (1,) uint64 the random state (seeded here).
    """
    n = s.shape[0]
    G = M.shape[0]
    if n == 0 or effort <= 0:
        return
    best_sc, start_sc, sc, fbox = fw[:3], fw[3:6], fw[6:9], fw[9:10]
    cur_a, cur_p, members, old, box = iw[:n], iw[n:2 * n], iw[2 * n:3 * n], iw[3 * n:4 * n], iw[4 * n:4 * n + 4]
    scratch = scratch_in(n, G, fw[10:10 + 6 * G], iw[4 * n + 4:9 * n + G + 5])
    S, A, ident = scratch[4], scratch[6], scratch[11]
    f_rest, i_rest = fw[10 + 6 * G:], iw[9 * n + G + 5:]
    steps = repair_steps(n, G)
    fresh_ok = rules[8] < 0 and rules[9] == INF  # a fresh packing moves everything: not under a budget
    frac = FRAC_START
    last_gain = 0
    if tid == 0:
        state[0] = wrap_add(wrap_mul(np.uint64(seed), np.uint64(6364136223846793005)),
                            np.uint64(1442695040888963407))
        score_core(s, w, M, assign, pos, best_sc, f_rest, i_rest)
        _copy(best_sc, start_sc)
        for i in range(n):
            ident[i] = i
    for it in range(effort):
        if tid == 0:  # box[0]: stop; box[1]: a repair attempt at T = fbox[0] from cur_a/cur_p
            U = best_sc[0]
            box[0] = U <= lb * (1.0 + STOP_GAP) or it - last_gain >= patience
            box[1] = 0
            if not box[0] and U > 0.0:
                T = max((U if U < INF else lb * 1e6) * (1.0 - frac), lb)
                if T > 0.0:
                    box[1] = 1
                    fbox[0] = T
                    if not (fresh_ok and it % 2 == 1 and _pack_at(s, w, M, T, state, cur_a, cur_p, S, A, rules, rstate,
                                                                  f_rest, i_rest)):
                        _copy(assign, cur_a)
                        _copy(pos, cur_p)
                        reset_state(rules, rstate, cur_a)
        barrier()
        if box[0]:
            break
        if box[1]:
            ok = repair_core(s, w, M, cur_a, cur_p, fbox[0], steps, state, scratch, rules, rstate, f_rest, i_rest, tid,
                             nt)
            if tid == 0:
                if ok:
                    if _take_if_better(s, w, M, cur_a, cur_p, assign, pos, best_sc, start_sc, sc, f_rest, i_rest):
                        last_gain = it + 1
                    frac = min(frac * 2.0, FRAC_MAX)
                else:
                    frac = max(frac * 0.5, FRAC_MIN)
        if tid == 0:
            _copy(assign, cur_a)
            _copy(pos, cur_p)
            reset_state(rules, rstate, cur_a)
            _perturb(s, w, M, cur_a, cur_p, 1 + it % 3, state, rules, rstate, members, old, f_rest, i_rest)
        barrier()
        improve_local_core(s, w, M, cur_a, cur_p, 4000, rules, rstate, f_rest, i_rest, tid, nt)
        refine_peak_core(s, w, M, cur_a, cur_p, REFINE_PASSES, REFINE_TOP_K, rules, rstate, f_rest, i_rest, tid, nt)
        barrier()
        improve_local_core(s, w, M, cur_a, cur_p, 1500, rules, rstate, f_rest, i_rest, tid, nt)
        if tid == 0:
            if _take_if_better(s, w, M, cur_a, cur_p, assign, pos, best_sc, start_sc, sc, f_rest, i_rest):
                last_gain = it + 1
        barrier()
    if tid == 0:
        reset_state(rules, rstate, assign)
    barrier()
    polish_second_core(s, w, M, assign, pos, POLISH_ITERS, rules, rstate, f_rest, i_rest, tid, nt)
    barrier()


@njit
def improve_memory(rules, assign, G):
    """What :func:`improve_instance_core` needs beyond the instance on one CPU thread, for the
    models' ``assign`` (n,) on ``G`` GPUs under ``rules``: ``(rstate, fw, iw, state)`` -- the
    rules' bookkeeping, working memory of :func:`improve_work`, the random state."""
    nf, ni = improve_work(assign.shape[0], G, 1)
    return new_state(rules, assign, G), np.empty(nf), np.empty(ni, np.int64), np.empty(1, np.uint64)


def improve_instance(s, w, M, lb, assign, pos, effort, patience, seed, rules):
    """``effort`` search rounds from ``assign``/``pos`` (CPU entry of :func:`improve_instance_core`;
    a Python function, see :mod:`kvgpu.kernels.cpu`)."""
    rstate, fw, iw, state = improve_memory(rules, assign, M.shape[0])
    improve_instance_core(s, w, M, lb, assign, pos, effort, patience, seed, rules, rstate, fw, iw, state, 0, 1)


@njit
def _top4(kv, v, ix):
    """The four largest of ``kv`` (first index among equals) into ``v``, ``ix`` (4,), padded
    with ``(-inf, -1)``."""
    for k in range(4):
        v[k] = -INF
        ix[k] = -1
    for g in range(kv.shape[0]):
        x = kv[g]
        for k in range(4):
            if ix[k] < 0 or x > v[k]:
                for q in range(3, k, -1):
                    v[q] = v[q - 1]
                    ix[q] = ix[q - 1]
                v[k] = x
                ix[k] = g
                break


@_inline
def _two_largest(a, b, v, ix, src, dst):
    """The two largest of ``a``, ``b`` and the KVPRs of the GPUs other than ``src``, ``dst``
    (from :func:`_top4`)."""
    m1, m2 = (a, b) if a >= b else (b, a)
    taken = 0
    for k in range(4):
        if taken == 2 or ix[k] < 0:
            break
        if ix[k] == src or ix[k] == dst:
            continue
        x = v[k]
        taken += 1
        if x > m1:
            m1, m2 = x, m1
        elif x > m2:
            m2 = x
    return m1, m2


@njit
def _best_group_move(s, w, M, assign, S, W, kv, rules, rstate, ix, b1, b2, members, old):
    """The node group (tp shards of a replica) on one of the two worst GPUs ``ix[:2]`` whose
    move to another node gives the best score (max, second), if better than ``(b1, b2)``:
    ``(group, node)``, or ``(-1, -1)``.  Each try is made and undone (:func:`_group_to`)."""
    node_group = rules[2]
    G = M.shape[0]
    if node_group.shape[0] == 0 or _node_count(rules, G) < 2:
        return -1, -1
    bk, bnode = -1, -1
    for k in range(2):
        for a in range(s.shape[0]):
            if assign[a] != ix[k] or node_group[a] < 0:
                continue
            grp = node_group[a]
            m = _collect(node_group, grp, members)
            for q in range(m):
                old[q] = assign[members[q]]
            here = rules[3][assign[a]]
            for node in range(_node_count(rules, G)):
                if node == here or not _group_to(s, w, M, assign, S, W, rules, rstate, members, old, m, node):
                    continue
                m1, m2 = -INF, -INF
                for g in range(G):
                    x = safe_div(W[g], M[g] - S[g])
                    if x > m1:
                        m1, m2 = x, m1
                    elif x > m2:
                        m2 = x
                if better(m1, m2, 0.0, b1, b2, 0.0):
                    b1, b2, bk, bnode = m1, m2, grp, node
                placed = m
                _group_back(s, w, assign, S, W, rules, rstate, members, old, placed, m)
    return bk, bnode


@_inline
def _second_after(S, W, M, v, ix, src, dst, sX, wX, sY, wY):
    """Models of size ``sX`` and demand ``wX`` go from ``src`` to ``dst``, ``sY``/``wY`` back:
    ``(fits in memory, new largest KVPR, new second largest)``."""
    Ss, Sd = S[src] - sX + sY, S[dst] + sX - sY
    if not (fits(Ss, M[src]) and fits(Sd, M[dst])):
        return False, 0.0, 0.0
    m1, m2 = _two_largest(safe_div(W[src] - wX + wY, M[src] - Ss), safe_div(W[dst] + wX - wY, M[dst] - Sd), v, ix,
                          src, dst)
    return True, m1, m2


@_inline
def _sum2(x, a, b):
    """``x[a] + x[b]``, a missing one (-1) counting 0: the size or demand of an exchange's side."""
    return (x[a] if a >= 0 else 0.0) + (x[b] if b >= 0 else 0.0)


@_inline
def _polish_value(S, W, M, s, w, v, ix, src, dst, sX, wX, y1, y2):
    """``(m1, m2)``: the largest and second largest KVPR after models of size ``sX`` and
    demand ``wX`` go ``src`` -> ``dst`` and ``y1``, ``y2`` (-1: none) come back; ``m1`` NaN
    where it does not fit in memory -- an entry of :func:`polish_second_core`'s scan."""
    ok, m1, m2 = _second_after(S, W, M, v, ix, src, dst, sX, wX, _sum2(s, y1, y2), _sum2(w, y1, y2))
    return (m1, m2) if ok else (np.nan, 0.0)


@njit
def polish_values(n, G, nt):
    """Floats :func:`polish_second_core` keeps for the ``(m1, m2)`` of one row of its scan for
    ``nt > 1`` threads (none for one): a row holds ``n + G`` exchanges, or -- one model for two
    of another GPU -- the pairs of models on one GPU: ``sum_d m_d (m_d - 1) / 2 < n^2 / 2``,
    and below ``POLISH_PAIR_SCANS`` too, since such rows are scanned only when the pair scan's
    work estimate, at least ``sum_d m_d^2 / 2``, is within it."""
    if nt == 1:
        return 0
    return 2 * max(n + G, min(n * (n - 1) // 2, int(POLISH_PAIR_SCANS)))


@njit
def polish_work(n, G, nt):
    """``(floats, ints)``: the working memory of :func:`polish_second_core`."""
    return 3 * G + 4 + polish_values(n, G, nt), 6 * n + 3 * G + 10


@njit
def _polish_slots(start, slot, pbase):
    """The value index of a row's exchanges (:func:`_polish_fill`): ``slot`` (n + G,) the GPU
    of each position of "for each GPU ``d``: nothing back, then each of its models" (position
    ``u + d + 1`` is model position ``u`` of ``d``'s list, ``start[d] + d`` nothing);
    ``pbase`` (G + 1,) the index of each GPU's first pair of models (pairs of ``d``'s models
    ``a < b`` in order)."""
    G = start.shape[0] - 1
    pbase[0] = 0
    for d in range(G):
        for r in range(start[d] + d, start[d + 1] + d + 1):
            slot[r] = d
        m = start[d + 1] - start[d]
        pbase[d + 1] = pbase[d] + m * (m - 1) // 2


@njit
def _polish_fill(S, W, M, s, w, v, ix, assign, lst, start, slot, pbase, src, x1, x2, tri, m1s, m2s, tid, nt):
    """Thread ``tid`` of ``nt`` evaluates its share of one row of :func:`polish_second_core`'s
    scan -- ``x1`` and ``x2`` (-1: none) leave ``src`` -- into ``m1s``, ``m2s`` at the index the
    serial walk (:func:`_polish_row`) reads: slot ``u + d + 1`` for model ``lst[u]`` of GPU
    ``d`` coming back (``start[d] + d``: nothing), or, for a ``tri`` row (one model for two),
    ``pbase[d] + a m - a (a + 1) / 2 + b - a - 1`` for the models ``a < b`` of ``d``'s ``m``."""
    n = s.shape[0]
    G = S.shape[0]
    none = np.int64(-1)
    sX, wX = _sum2(s, x1, x2), _sum2(w, x1, x2)
    for k in range(tid, n if tri else n + G, nt):  # tri: model position k; else slot k
        if tri:  # model lst[k] of GPU d with each model after it in d's list
            d, y1 = assign[lst[k]], lst[k]
            a, m = k - start[d], start[d + 1] - start[d]
            r0, r1, c = k + 1, start[d + 1], pbase[d] + a * m - a * (a + 1) // 2 - k - 1
        else:  # one model of GPU d, or nothing, back
            d = slot[k]
            u = k - d - 1
            y1 = lst[u] if u >= start[d] else none
            r0, r1, c = u, u + 1, k - u
        if d == src:
            continue
        for r in range(r0, r1):
            m1s[c + r], m2s[c + r] = _polish_value(S, W, M, s, w, v, ix, src, d, sX, wX, y1, lst[r] if tri else none)


@njit
def _polish_row(S, W, M, s, w, v, ix, lst, start, pbase, src, x1, x2, tri, best, m1s, m2s, rules, rstate, nt):
    """The serial scan of one row of :func:`polish_second_core` (``x1``, ``x2`` (-1: none)
    leave ``src``; ``tri``: one model for two) in its order -- target GPUs, then what comes
    back -- keeping an exchange whose score beats the best so far (:func:`better`) within the
    rules.  ``best = (b1, b2, x1, x2, y1, y2, src, dst)`` in and out.  For ``nt > 1`` the
    values were evaluated by the threads (:func:`_polish_fill`), else they are evaluated
    here: the same values walked in the same order, so the same choice."""
    b1, b2, bx1, bx2, by1, by2, bsrc, bdst = best
    G = S.shape[0]
    none = np.int64(-1)
    sX, wX = _sum2(s, x1, x2), _sum2(w, x1, x2)
    for dst in range(G):
        if dst == src:
            continue
        c = pbase[dst] if tri else start[dst] + dst  # the value index of dst's first exchange
        for u in range(start[dst] - 1, start[dst + 1]):  # u < start: nothing back
            y1 = lst[u] if u >= start[dst] else none
            last = start[dst + 1] if tri and y1 >= 0 else u + 1
            for r in range(u, last):  # r == u: one model back (or none); else two
                y2 = lst[r] if r > u else none
                if tri and y2 < 0:
                    continue  # scanned as a single already
                if nt > 1:
                    m1, m2 = m1s[c], m2s[c]
                    c += 1
                else:
                    m1, m2 = _polish_value(S, W, M, s, w, v, ix, src, dst, sX, wX, y1, y2)
                if math.isnan(m1) or not better(m1, m2, 0.0, b1, b2, 0.0):  # NaN: does not fit
                    continue
                if not transfer_check(rules, rstate, src, dst, x1, x2, y1, y2)[0]:
                    continue
                b1, b2, bx1, bx2, by1, by2, bsrc, bdst = m1, m2, x1, x2, y1, y2, src, dst
    return b1, b2, bx1, bx2, by1, by2, bsrc, bdst


@njit
def polish_second_core(s, w, M, assign, pos, max_iters, rules, rstate, fw, iw, tid, nt):
    """Lower the second-largest KVPR without raising the largest, in place: the best exchange
    between one of the two worst GPUs and any GPU -- a move, a swap, two models for one or none,
    one for two -- by the score (max, second) compared with the tolerance of
    :func:`kvgpu.kernels.deltas.better`, while one improves (at most ``max_iters``, and at most
    ``POLISH_SCANS`` exchanges scanned, so the work stays bounded with many models per GPU).  Memory and
    ``rules`` hold (``rstate`` updated).  The search proper drives the largest KVPR; under rules
    or after a proof nothing else tends the runner-up GPU, which the score's second term ranks.

    Run by every thread ``tid`` of ``nt`` (module doc).  The scan is rows -- a model (or two)
    of a worst GPU against every target GPU and what comes back -- and "beats the best so far"
    (with a tolerance, not transitive) is a chain along the serial order, so for ``nt > 1`` the
    threads evaluate a row (:func:`_polish_fill`) and thread 0 walks its values in that order
    with the serial rule (:func:`_polish_row`); thread 0 takes every other step.  fw, iw of
    :func:`polish_work` entries."""
    G = M.shape[0]
    n = s.shape[0]
    if G < 3 or n == 0:
        return
    S, W, kv, v = fw[:G], fw[G:2 * G], fw[2 * G:3 * G], fw[3 * G:3 * G + 4]
    half = polish_values(n, G, nt) // 2
    m1s, m2s = fw[3 * G + 4:3 * G + 4 + half], fw[3 * G + 4 + half:3 * G + 4 + 2 * half]
    lst, ident, members, old = iw[:n], iw[n:2 * n], iw[2 * n:3 * n], iw[3 * n:4 * n]
    start, ix = iw[4 * n:4 * n + G + 1], iw[4 * n + G + 1:4 * n + G + 5]
    slot, pbase = iw[5 * n + G + 5:6 * n + 2 * G + 5], iw[6 * n + 2 * G + 5:6 * n + 3 * G + 6]
    box = iw[6 * n + 3 * G + 6:6 * n + 3 * G + 10]
    none = np.int64(-1)
    stamp = 0
    work = pair_work = 0.0
    if tid == 0:
        list_loads_into(assign, pos, s, w, S, W, lst, iw[4 * n + G + 5:5 * n + G + 5])
        kvprs_into(S, W, M, kv)
        for i in range(n):
            ident[i] = i
        stamp = next_stamp(pos)
    for _ in range(max_iters):
        if tid == 0:  # box[0]: out of work
            _top4(kv, v, ix)
            gpu_lists_into(assign, ident, lst, start)
            c0 = start[ix[0] + 1] - start[ix[0]]
            c1 = start[ix[1] + 1] - start[ix[1]]
            sq = 0.0
            for g in range(G):
                sq += (start[g + 1] - start[g]) ** 2
            work += (c0 + c1) * (n + G)
            box[0] = work > POLISH_SCANS
            pair_work = fmul((c0 * c0 + c1 * c1) / 2.0, n) + fmul(fmul(c0 + c1, sq), 0.5)  # x / 2 exactly, unfused
            if nt > 1:
                _polish_slots(start, slot, pbase)
        barrier()
        if box[0]:
            return
        best = (v[0], v[1], none, none, none, none, none, none)
        bk, bnode = -1, -1
        for pairs in range(2):  # single moves and swaps first; two-model exchanges only when stuck
            if tid == 0:  # box[1]: scan this kind
                box[1] = not pairs or not (best[2] >= 0 or bk >= 0 or pair_work > POLISH_PAIR_SCANS
                                           or work + pair_work > POLISH_SCANS)
                if pairs and box[1]:
                    work += pair_work
            barrier()
            scan = box[1]
            barrier()  # every thread has read the box before thread 0 writes it again
            if not scan:
                break
            for k in range(2):
                src = ix[k]
                for p in range(start[src], start[src + 1]):
                    for q in range(p, start[src + 1] if pairs else p + 1):  # q == p: one model; else two
                        x1, x2 = lst[p], lst[q] if q > p else none
                        tri = pairs == 1 and q == p
                        if nt > 1:
                            _polish_fill(S, W, M, s, w, v, ix, assign, lst, start, slot, pbase, src, x1, x2, tri, m1s,
                                         m2s, tid, nt)
                            barrier()
                        if tid == 0:
                            best = _polish_row(S, W, M, s, w, v, ix, lst, start, pbase, src, x1, x2, tri, best, m1s,
                                               m2s, rules, rstate, nt)
                        barrier()
            if tid == 0 and not pairs:
                bk, bnode = _best_group_move(s, w, M, assign, S, W, kv, rules, rstate, ix, best[0], best[1], members,
                                             old)
        if tid == 0:  # box[2]: go on
            _, _, bx1, bx2, by1, by2, bsrc, bdst = best
            box[2] = bk >= 0 or bx1 >= 0
            if bk >= 0:  # a whole tp group to another node beats every single exchange
                m = _collect(rules[2], bk, members)
                for q in range(m):
                    old[q] = assign[members[q]]
                _group_to(s, w, M, assign, S, W, rules, rstate, members, old, m, bnode)
                for q in range(m):
                    pos[members[q]] = stamp
                    stamp += 1
                for g in range(G):
                    kv[g] = safe_div(W[g], M[g] - S[g])
            elif bx1 >= 0:
                stamp = _apply_transfer(s, w, S, W, assign, pos, stamp, bsrc, bdst, bx1, bx2, by1, by2, rules, rstate)
                kv[bsrc] = safe_div(W[bsrc], M[bsrc] - S[bsrc])
                kv[bdst] = safe_div(W[bdst], M[bdst] - S[bdst])
        barrier()
        if not box[2]:
            return


@kernel(parallel=True)
def improve_batch(sizes, demand, gpu_mem, n_models, n_gpus, lb, effort, patience, seed, assign, pos):
    """:func:`improve_instance` for every instance of a compacted batch (no rules), in parallel.
    ``lb`` (B,): a proven lower bound per instance; ``assign``/``pos`` (B, N) in and out."""
    rules = no_rules()
    for b in prange(sizes.shape[0]):
        n, G = n_models[b], n_gpus[b]
        rstate, fw, iw, state = improve_memory(rules, assign[b, :n], G)
        improve_instance_core(sizes[b, :n], demand[b, :n], gpu_mem[b, :G], lb[b], assign[b, :n], pos[b, :n], effort,
                              patience, seed, rules, rstate, fw, iw, state, 0, 1)


@njit
def polish_memory(n, G):
    """Working memory of :func:`polish_second_core` on one CPU thread: ``(fw, iw)``."""
    nf, ni = polish_work(n, G, 1)
    return np.empty(nf), np.empty(ni, np.int64)


def polish_second(s, w, M, assign, pos, max_iters, rules, rstate):
    """Lower the second-largest KVPR (CPU entry of :func:`polish_second_core`)."""
    polish_second_core(s, w, M, assign, pos, max_iters, rules, rstate, *polish_memory(s.shape[0], M.shape[0]), 0, 1)

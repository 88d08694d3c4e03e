"""numba kernels for search beyond the seed, started from the seed pipeline's placement.

Two searches alternate, round by round (see :func:`improve_instance`):

* **repair at a target** ``T`` below the best max KVPR: "every GPU at KVPR <= T" is a bin
  packing with item sizes ``s + w / T``; a tabu search with breakout weights (:func:`repair`)
  moves and swaps models between any pair of GPUs to remove the overflow, from the best
  placement or from a fresh packing at ``T`` (other structures, e.g. three models beside a
  lone one).  This is what closes most of the gap on big, nearly full clusters.
* **iterated local search**: perturb the worst GPUs, re-run the seed's ``improve_local`` and
  ``refine_peak``; this polishes the peak and the runner-up GPUs.

Only a better score tuple (max, second max, mean KVPR) replaces the best placement, so the
answer is never worse than the seed's; the work is set by ``effort`` (rounds), not by wall
time, so results are the same on every machine for a given ``seed``.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from kvgpu.kernels import deltas, params
from kvgpu.kernels.cpu import (_argmax_first, _kvprs, _lex_less, _loads, _score, fits, improve_local, refine_peak,
                               safe_div, transfer_loads)

njit = numba.njit(cache=True)
overflow = numba.njit(cache=True, inline="always")(deltas.overflow)

INF = np.inf
CAP_SLACK = params.CAP_SLACK
#: Two deltas closer than this are ties (broken at random).
TIE = 1e-12
#: The search stops once the best is within this relative gap of the lower bound (0.05%).
STOP_GAP = 5e-4
#: Rounds without a better placement after which the search stops (converged).
PATIENCE = 6
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
def _rand_int(state, k):
    """Uniform integer in ``[0, k)``."""
    return min(int(_rand(state) * k), k - 1)


@njit
def _pick_overflowing(A, M, state):
    """A random GPU whose load exceeds its capacity; -1 if none."""
    cnt = 0
    for g in range(A.shape[0]):
        if A[g] > M[g] + CAP_SLACK:
            cnt += 1
    if cnt == 0:
        return -1
    k = _rand_int(state, cnt)
    for g in range(A.shape[0]):
        if A[g] > M[g] + CAP_SLACK:
            if k == 0:
                return g
            k -= 1
    return -1


def no_rules():
    """``rules`` for :func:`repair` / :func:`improve_instance` with nothing to respect."""
    return (np.empty(0, np.int64), -1, np.empty((0, 0), np.uint8), np.empty(0, np.int64))


@njit
def _group_counts(group, assign, G):
    """``counts[k, g]``: models of group ``k`` on GPU ``g`` ((0, G) when there are no groups)."""
    k = 0
    for i in range(group.shape[0]):
        k = max(k, group[i] + 1)
    counts = np.zeros((k, G), np.int64)
    for i in range(group.shape[0]):
        if group[i] >= 0:
            counts[group[i], assign[i]] += 1
    return counts


@numba.njit(cache=True, inline="always")
def _shift(counts, k, src, dst):
    if k >= 0:
        counts[k, src] -= 1
        counts[k, dst] += 1


@numba.njit(cache=True, inline="always")
def _moved(cur, i, g):
    """1 if model ``i`` on GPU ``g`` is away from its current GPU ``cur[i]`` (new models: never)."""
    return 1 if cur[i] >= 0 and g != cur[i] else 0


@njit
def _lists_into(assign, G, lst, start):
    """Models grouped by GPU (counting sort): GPU g's are ``lst[start[g]:start[g + 1]]``."""
    start[:] = 0
    for i in range(assign.shape[0]):
        start[assign[i] + 1] += 1
    for g in range(G):
        start[g + 1] += start[g]
    fill = start[:G].copy()
    for i in range(assign.shape[0]):
        lst[fill[assign[i]]] = i
        fill[assign[i]] += 1


@numba.njit(cache=True, inline="always")
def _exchange(S, A, M, wgt, g, h, aX, sX, aY, sY, og):
    """GPU ``g`` gives models of total load ``aX`` / size ``sX`` to ``h`` and takes ``aY`` /
    ``sY`` back: ``(fits in memory, weighted overflow change, overflow change)``."""
    if not (fits(S[g] - sX + sY, M[g]) and fits(S[h] - sY + sX, M[h])):
        return False, 0.0, 0.0
    dg = overflow(A[g] - aX + aY, M[g] + CAP_SLACK) - og
    dh = overflow(A[h] - aY + aX, M[h] + CAP_SLACK) - overflow(A[h], M[h] + CAP_SLACK)
    return True, wgt[g] * dg + wgt[h] * dh, dg + dh


@numba.njit(cache=True, inline="always")
def _is_tabu(tabu_gpu, tabu_until, i, dst, step):
    return i >= 0 and tabu_gpu[i] == dst and tabu_until[i] > step


@numba.njit(cache=True, inline="always")
def _blocked(tabu_gpu, tabu_until, step, g, h, x1, x2, y1, y2, F_after, best_F):
    """An exchange (models ``x1``, ``x2`` g -> h, ``y1``, ``y2`` h -> g; -1 for none) is barred
    when one of them would go straight back to a GPU it is tabu for, unless it reaches the
    lowest total overflow so far (aspiration)."""
    tabu = (_is_tabu(tabu_gpu, tabu_until, x1, h, step) or _is_tabu(tabu_gpu, tabu_until, x2, h, step)
            or _is_tabu(tabu_gpu, tabu_until, y1, g, step) or _is_tabu(tabu_gpu, tabu_until, y2, g, step))
    return tabu and not F_after < best_F - TIE


@numba.njit(cache=True, inline="always")
def _tie_take(d, best_d, ties, state):
    """Keep candidate ``d`` over the best so far? Strictly better wins; equal ones are kept
    with probability 1/ties (a uniform pick among equals).  Returns ``(take, ties)``."""
    if d < best_d - TIE:
        return True, 1
    if d <= best_d + TIE:
        ties += 1
        return _rand_int(state, ties) == 0, ties
    return False, ties


@njit
def repair(s, w, M, assign, pos, T, steps, state, scratch, rules):
    """Try to bring every GPU to KVPR <= ``T``; in place, True on success.

    At a target ``T`` a GPU's KVPR is ``<= T`` iff its load ``A = S + W / T`` is at most its
    memory ``M`` (a bin packing with item sizes ``s + w / T``).  This is a tabu search on the
    weighted overflow ``sum_g wgt_g * max(0, A_g - M_g)``: each step takes a random
    overflowing GPU and makes the best move of one of its models to any GPU, or swap with any
    model elsewhere (memory always respected), even when no step improves -- moving overflow
    around is how it leaves local minima.  A model may not return to the GPU it left for a few
    steps unless that gives the lowest (unweighted) overflow so far; at a local minimum the
    weights of the overflowing GPUs grow (breakout), so overflow is pushed to other GPUs.
    At a ``PAIR_SHARE`` of those stuck steps it also tries two models of the GPU for one
    elsewhere (or for none) and one for two, which changes how many models a GPU holds; that
    extra work is charged to ``steps``, which bounds the work.

    ``rules = (cur, K, allowed, group)`` (see :func:`no_rules`): with ``K >= 0`` at most ``K``
    models may end on another GPU than ``cur`` (n,) gives (-1: a new model, free to go anywhere),
    as re-placement needs; ``allowed`` (n, G) uint8 (or empty) says where each model may go
    (pins, forbidden GPUs); models with the same ``group`` id >= 0 (n,) (or empty) must sit on
    distinct GPUs (tensor-parallel shards, replicas).  The start must satisfy the rules.

    ``scratch = (tabu_gpu, tabu_until, mem)`` (n,) int64 and ``(S, W, A, wgt)`` (G,) float.
    """
    n = s.shape[0]
    G = M.shape[0]
    tabu_gpu, tabu_until, mem, S, W, A, wgt = scratch
    cur, K, allowed, group = rules
    pinned = allowed.shape[0] > 0
    gcount = _group_counts(group, assign, G)
    grouped = group.shape[0] > 0
    free_rules = K < 0 and not pinned and not grouped  # pair exchanges know no rules
    lst = np.empty(n, np.int64)
    start = np.empty(G + 1, np.int64)
    S[:] = 0.0
    W[:] = 0.0
    for i in range(n):
        S[assign[i]] += s[i]
        W[assign[i]] += w[i]
    F = 0.0
    for g in range(G):
        A[g] = S[g] + W[g] / T
        F += overflow(A[g], M[g] + CAP_SLACK)
        wgt[g] = 1.0
    best_F = F
    tabu_until[:] = -1
    stamp = pos.max() + 1
    moved = 0
    if K >= 0:
        for i in range(n):
            moved += _moved(cur, i, assign[i])
    step = 0
    while step < steps:
        g = _pick_overflowing(A, M, state)
        if g < 0:
            return True
        m = 0
        for i in range(n):
            if assign[i] == g:
                mem[m] = i
                m += 1
        og = overflow(A[g], M[g] + CAP_SLACK)
        best_d = INF
        best_extra = 0
        bi, bi2, bj, bj2, bh, ties = -1, -1, -1, -1, -1, 0
        for p in range(m):
            i = mem[p]
            ai = s[i] + w[i] / T
            for j in range(-G, n):  # j < 0: move i to GPU j + G; else swap i with model j
                if j < 0:
                    h = j + G
                    aj = 0.0
                    sj = 0.0
                else:
                    h = assign[j]
                    aj = s[j] + w[j] / T
                    sj = s[j]
                if h == g:
                    continue
                if pinned and not (allowed[i, h] and (j < 0 or allowed[j, g])):
                    continue
                if grouped:
                    gi = group[i]
                    gj = group[j] if j >= 0 else -1
                    if (gi >= 0 and (gi == gj or gcount[gi, h] > 0)) or (gj >= 0 and gcount[gj, g] > 0):
                        continue
                extra = 0
                if K >= 0:
                    extra = _moved(cur, i, h) - _moved(cur, i, g)
                    if j >= 0:
                        extra += _moved(cur, j, g) - _moved(cur, j, h)
                    if moved + extra > K:
                        continue
                ok, d, raw = _exchange(S, A, M, wgt, g, h, ai, s[i], aj, sj, og)
                if not ok:
                    continue
                if _blocked(tabu_gpu, tabu_until, step, g, h, i, -1, j, -1, F + raw, best_F):
                    continue
                take, ties = _tie_take(d, best_d, ties, state)
                if take:
                    best_d, best_extra, bi, bi2, bj, bj2, bh = d, extra, i, -1, j, -1, h
        pair_evals = 0
        if best_d >= -TIE and free_rules and _rand(state) < PAIR_SHARE:
            # stuck with single moves and swaps: try two models for one, and one for two; the
            # extra evaluations count against the step budget, so an attempt's work stays bounded
            _lists_into(assign, G, lst, start)
            for p in range(m):
                for q in range(p + 1, m):
                    i, i2 = mem[p], mem[q]
                    aX = s[i] + w[i] / T + s[i2] + w[i2] / T
                    sX = s[i] + s[i2]
                    for j in range(-G, n):  # j < 0: both to GPU j + G; else both for model j
                        h = j + G if j < 0 else assign[j]
                        if h == g:
                            continue
                        aj = s[j] + w[j] / T if j >= 0 else 0.0
                        sj = s[j] if j >= 0 else 0.0
                        pair_evals += 1
                        ok, d, raw = _exchange(S, A, M, wgt, g, h, aX, sX, aj, sj, og)
                        if not ok:
                            continue
                        if _blocked(tabu_gpu, tabu_until, step, g, h, i, i2, j, -1, F + raw, best_F):
                            continue
                        take, ties = _tie_take(d, best_d, ties, state)
                        if take:
                            best_d, bi, bi2, bj, bj2, bh = d, i, i2, j, -1, h
                i = mem[p]
                ai = s[i] + w[i] / T
                for h in range(G):
                    if h == g:
                        continue
                    for u in range(start[h], start[h + 1]):
                        for v in range(u + 1, start[h + 1]):
                            j, j2 = lst[u], lst[v]
                            aY = s[j] + w[j] / T + s[j2] + w[j2] / T
                            pair_evals += 1
                            ok, d, raw = _exchange(S, A, M, wgt, g, h, ai, s[i], aY, s[j] + s[j2], og)
                            if not ok:
                                continue
                            if _blocked(tabu_gpu, tabu_until, step, g, h, i, -1, j, j2, F + raw, best_F):
                                continue
                            take, ties = _tie_take(d, best_d, ties, state)
                            if take:
                                best_d, bi, bi2, bj, bj2, bh = d, i, -1, j, j2, h
        if bi < 0:
            return False
        if best_d >= -TIE:  # no improving step: a local minimum of the weighted overflow
            for h in range(G):
                if A[h] > M[h] + CAP_SLACK:
                    wgt[h] += 1.0
        s_out = s[bi] + (s[bi2] if bi2 >= 0 else 0.0)
        w_out = w[bi] + (w[bi2] if bi2 >= 0 else 0.0)
        s_in = (s[bj] if bj >= 0 else 0.0) + (s[bj2] if bj2 >= 0 else 0.0)
        w_in = (w[bj] if bj >= 0 else 0.0) + (w[bj2] if bj2 >= 0 else 0.0)
        S[g], W[g], S[bh], W[bh] = transfer_loads(S[g], W[g], S[bh], W[bh], s_out, w_out, s_in, w_in)
        A[g] = S[g] + W[g] / T
        A[bh] = S[bh] + W[bh] / T
        tenure = TENURE_MIN + _rand_int(state, TENURE_SPAN)
        if grouped:
            _shift(gcount, group[bi], g, bh)
            if bj >= 0:
                _shift(gcount, group[bj], bh, g)
        for x, src, dst in ((bi, g, bh), (bi2, g, bh), (bj, bh, g), (bj2, bh, g)):
            if x >= 0:
                assign[x] = dst
                pos[x] = stamp
                stamp += 1
                tabu_gpu[x] = src
                tabu_until[x] = step + tenure
        moved += best_extra
        F = 0.0
        for h in range(G):
            F += overflow(A[h], M[h] + CAP_SLACK)
        if F < best_F:
            best_F = F
        single = max(1, m * (n + G))
        step += 1 + (pair_evals + single - 1) // single
    return _pick_overflowing(A, M, state) < 0


@njit
def _pack_at(s, w, M, T, state, assign, pos, S, A):
    """A fresh start for :func:`repair` at target ``T``: models by ``s + w / T`` with random
    jitter, largest first, each on the GPU it fits best (least load room left), or -- when
    it fits nowhere under ``T`` -- on the GPU it overflows least.  False if memory runs out."""
    n = s.shape[0]
    G = M.shape[0]
    key = np.empty(n)
    for i in range(n):
        key[i] = -(s[i] + w[i] / T) * (1.0 + JITTER * _rand(state))
    S[:] = 0.0
    A[:] = 0.0
    k = 0
    for i in np.argsort(key):
        ai = s[i] + w[i] / T
        best, best_r = -1, INF
        for g in range(G):
            if not fits(S[g] + s[i], M[g]):
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
        pos[i] = k
        k += 1
    return True


@njit
def _take_if_better(s, w, M, cand_a, cand_p, assign, pos, best_sc, sc):
    _score(s, w, M, cand_a, cand_p, sc)
    if _lex_less(sc, best_sc, 3):
        best_sc[:] = sc
        assign[:] = cand_a
        pos[:] = cand_p
        return True
    return False


@njit
def improve_instance(s, w, M, lb, assign, pos, effort, seed, rules):
    """``effort`` search rounds from the placement ``assign``/``pos`` (in place; the result is
    never worse).  The random stream starts from ``seed`` alone, so an instance gets the same
    answer whatever batch it is solved in.

    A round is (1) one :func:`repair` attempt at a target a little below the best max KVPR --
    the step shrinks after a failure and grows after a success, never below the lower bound
    ``lb``; odd rounds start it from a fresh packing, even ones from the best placement -- and
    (2) one round of iterated local search: perturb the best placement and re-optimise it with
    the seed's ``improve_local`` / ``refine_peak``.  Rounds stop within ``STOP_GAP`` of ``lb`` or after
    ``PATIENCE`` rounds without a better placement.

    With ``rules`` (see :func:`repair`: a move budget, pins, anti-affinity groups) only the
    repair runs, always from the best placement: fresh packings and the seed's local search know
    nothing of the rules.
    """
    n = s.shape[0]
    G = M.shape[0]
    if n == 0 or effort <= 0:
        return
    state = np.empty(1, np.uint64)
    state[0] = np.uint64(seed) * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)
    best_sc = np.empty(3)
    _score(s, w, M, assign, pos, best_sc)
    cur_a = np.empty(n, np.int64)
    cur_p = np.empty(n, np.int64)
    sc = np.empty(3)
    tabu_gpu = np.empty(n, np.int64)
    tabu_until = np.empty(n, np.int64)
    mem = np.empty(n, np.int64)
    S = np.empty(G)
    W = np.empty(G)
    A = np.empty(G)
    wgt = np.empty(G)
    # a step scans ~ (n / G) models x (n + G) moves and swaps; cap an attempt's total scans
    per_step = max(1.0, n / G * (n + G))
    restricted = rules[1] >= 0 or rules[2].shape[0] > 0 or rules[3].shape[0] > 0
    scratch = (tabu_gpu, tabu_until, mem, S, W, A, wgt)
    steps = REPAIR_STEPS_BASE + min(REPAIR_STEPS_PER_MODEL * n, int(REPAIR_SCANS_PER_MODEL * n / per_step))
    frac = FRAC_START
    last_gain = 0
    for it in range(effort):
        U = best_sc[0]
        if U <= lb * (1.0 + STOP_GAP) or it - last_gain >= PATIENCE:
            break
        if U > 0.0:
            T = max((U if U < INF else lb * 1e6) * (1.0 - frac), lb)
            if T > 0.0:
                if not (not restricted and it % 2 == 1 and _pack_at(s, w, M, T, state, cur_a, cur_p, S, A)):
                    cur_a[:] = assign
                    cur_p[:] = pos
                if repair(s, w, M, cur_a, cur_p, T, steps, state, scratch, rules):
                    if _take_if_better(s, w, M, cur_a, cur_p, assign, pos, best_sc, sc):
                        last_gain = it + 1
                    frac = min(frac * 2.0, FRAC_MAX)
                else:
                    frac = max(frac * 0.5, FRAC_MIN)
        if restricted:
            continue
        cur_a[:] = assign
        cur_p[:] = pos
        _perturb(s, w, M, cur_a, cur_p, 1 + it % 3, state)
        improve_local(s, w, M, cur_a, cur_p, 4000)
        refine_peak(s, w, M, cur_a, cur_p, 2, 12)
        improve_local(s, w, M, cur_a, cur_p, 1500)
        if _take_if_better(s, w, M, cur_a, cur_p, assign, pos, best_sc, sc):
            last_gain = it + 1


@numba.njit(cache=True, parallel=True)
def improve_batch(sizes, demand, gpu_mem, n_models, n_gpus, lb, effort, seed, assign, pos, rules):
    """:func:`improve_instance` for every instance of a compacted batch, in parallel.
    ``lb`` (B,): a proven lower bound per instance; ``assign``/``pos`` (B, N) in and out;
    ``rules``: :func:`no_rules` (batches carry no pins or groups)."""
    for b in prange(sizes.shape[0]):
        n, G = n_models[b], n_gpus[b]
        improve_instance(sizes[b, :n], demand[b, :n], gpu_mem[b, :G], lb[b], assign[b, :n], pos[b, :n], effort, seed,
                         rules)

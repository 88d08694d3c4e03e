"""numba kernels that find a first placement under the rules: feasibility first.

The seed pipeline knows no rules, so a constrained instance (:mod:`kvgpu.kernels.rules`) starts
here: running models stay where they are when the rules allow it (:func:`keep_current`), the
others are placed greedily, most constrained first, each where the peak rises least -- or,
when memory leaves it no room, where it overfills memory least (:func:`greedy_start`).  An
overfull start is then repaired by the search of :mod:`kvgpu.kernels.search` at ``T = inf``
(the load is the memory alone), which minimises the total overflow under the rules and the
migration budget (:func:`make_feasible`).  What this cannot decide is left to the exact search
of :mod:`kvgpu.kernels.exact`.
"""

from __future__ import annotations

import numpy as np

from kvgpu.kernels.jit import kernel
from kvgpu.kernels.cpu import INF, kvprs, max_excluding, sort_desc, top3, fits, safe_div
from kvgpu.kernels.rules import (budget_held, may_place, new_state, place, reset_state, start_gpu, transfer_apply,
                                 transfer_check)
from kvgpu.kernels.search import rand_uniform, new_scratch, repair_core, repair_memory, repair_steps

njit = kernel()

#: Outcomes of :func:`solve_start`.
STARTED, NO_ROOM, OVER_BUDGET = 0, 1, 2
#: Restarts of the overflow repair (each from a new greedy start), and its step budget as a
#: multiple of one search attempt's.
FEASIBLE_RESTARTS, FEASIBLE_STEP_FACTOR = 8, 4


@njit
def keep_current(rules, rstate, assign):
    """Re-placement: every item whose start GPU (:func:`kvgpu.kernels.rules.start_gpu`) the rules
    allow (taken in index order; adapters after every base, so an adapter whose base stays beside
    it stays too) is kept there; the others get -1."""
    coloc = rules[10]
    for i in range(assign.shape[0]):
        assign[i] = -1
    for adapters in (False, True):
        for i in range(assign.shape[0]):
            if (coloc.shape[0] > 0 and coloc[i] >= 0) != adapters:
                continue
            g = start_gpu(rules, i)
            if g >= 0 and may_place(rules, rstate, i, g):
                assign[i] = g
                place(rules, rstate, i, g)


@njit
def _node_has_room(s, S, M, rules, rstate, i, node, need):
    """Does ``node`` offer ``need`` GPUs item ``i`` may use (and, with ``s``, has room on)?"""
    node_of = rules[3]
    cnt = 0
    for g in range(M.shape[0]):
        if node_of[g] == node and may_place(rules, rstate, i, g) and (s < 0 or fits(S[g] + s, M[g])):
            cnt += 1
    return cnt >= need


@njit
def _choose(s, w, M, S, W, rules, rstate, i, need):
    """The GPU for item ``i``: among those the rules allow (and, for the first shard of a node
    group of ``need`` items, in a node with ``need`` such GPUs), the one where the peak rises
    least among those with room, else the one overfilled least; -1 if the rules allow none."""
    G = M.shape[0]
    t3 = top3(kvprs(S, W, M))
    first = need > 1 and rules[2][i] >= 0 and rstate[1][rules[2][i]] == 0
    best, bg = INF, -1
    over, og = INF, -1
    for g in range(G):
        if not may_place(rules, rstate, i, g):
            continue
        if fits(S[g] + s[i], M[g]):
            if first and not _node_has_room(s[i], S, M, rules, rstate, i, rules[3][g], need):
                continue
            new = max(safe_div(W[g] + w[i], M[g] - S[g] - s[i]), max_excluding(t3, g, g))
            if bg < 0 or new < best:
                best, bg = new, g
        elif bg < 0:
            if first and not _node_has_room(-1.0, S, M, rules, rstate, i, rules[3][g], need):
                continue
            o = S[g] + s[i] - M[g]
            if og < 0 or o < over:
                over, og = o, g
    return bg if bg >= 0 else og


@njit
def _member_counts(ids, n):
    """(n,) float64: how many items share each item's group id (0 for -1, or without ids)."""
    out = np.zeros(n)
    if ids.shape[0] == 0:
        return out
    k = 0
    for i in range(n):
        k = max(k, ids[i] + 1)
    cnt = np.zeros(k)
    for i in range(n):
        if ids[i] >= 0:
            cnt[ids[i]] += 1.0
    for i in range(n):
        if ids[i] >= 0:
            out[i] = cnt[ids[i]]
    return out


@njit
def greedy_start(s, w, M, rules, rstate, assign, jitter, state):
    """Place every item with ``assign[i] < 0`` (the others are fixed and in ``rstate``), most
    constrained first (fewest allowed GPUs, then most items in the model, then largest; a
    model's items together; adapters last, once their bases are placed), each by
    :func:`_choose`.  ``jitter > 0`` perturbs the sizes in the order (restarts).  Returns the
    number of items the rules left no GPU (0: all placed, memory possibly overfull)."""
    n = s.shape[0]
    G = M.shape[0]
    allowed, node_group = rules[0], rules[2]
    k0 = np.zeros(n)
    k2 = np.zeros(n)
    for i in range(n):
        na = G
        if allowed.shape[0]:
            na = 0
            for g in range(G):
                na += allowed[i, g]
        k0[i] = -na if not (rules[10].shape[0] and rules[10][i] >= 0) else -G - 1.0
        k2[i] = s[i] * (1.0 + jitter * rand_uniform(state))
    k1 = _member_counts(rules[1], n)
    size_ng = _member_counts(node_group, n).astype(np.int64)
    S = np.zeros(G)
    W = np.zeros(G)
    for i in range(n):
        if assign[i] >= 0:
            S[assign[i]] += s[i]
            W[assign[i]] += w[i]
    failed = 0
    for i in sort_desc(np.arange(n), k0, k1, k2):
        if assign[i] >= 0:
            continue
        g = _choose(s, w, M, S, W, rules, rstate, i, size_ng[i])
        if g < 0:
            failed += 1
            continue
        assign[i] = g
        place(rules, rstate, i, g)
        S[g] += s[i]
        W[g] += w[i]
    return failed


@njit
def _overfull(s, M, assign):
    S = np.zeros(M.shape[0])
    for i in range(s.shape[0]):
        S[assign[i]] += s[i]
    for g in range(M.shape[0]):
        if not fits(S[g], M[g]):
            return True
    return False


#: Free GB (times the memory unit) the repair of full GPUs leaves on every GPU.
FULL_ROOM = 1e-6


@njit
def _has_full(s, w, M, assign):
    """Does a GPU with demand have no memory left for its KV cache (KVPR inf)?"""
    S = np.zeros(M.shape[0])
    W = np.zeros(M.shape[0])
    for i in range(s.shape[0]):
        S[assign[i]] += s[i]
        W[assign[i]] += w[i]
    for g in range(M.shape[0]):
        if W[g] > 0.0 and S[g] >= M[g]:
            return True
    return False


@njit
def _unfill(s, w, Mr, rules, rstate, assign):
    """Greedy first: each GPU with demand and less than ``M - Mr`` free sends its smallest
    shards (the fewest GB to copy) away, each to the GPU that keeps the most room below ``Mr``
    among those the rules and the budget allow, until it has room; in place."""
    n = s.shape[0]
    G = Mr.shape[0]
    S = np.zeros(G)
    W = np.zeros(G)
    for i in range(n):
        S[assign[i]] += s[i]
        W[assign[i]] += w[i]
    order = np.argsort(s)
    for g in range(G):
        for i in order:
            if not (W[g] > 0.0 and S[g] > Mr[g]):
                break
            if assign[i] != g:
                continue
            best, room = -1, -1.0
            for h in range(G):
                if h == g or S[h] + s[i] > Mr[h]:
                    continue
                ok, _, _ = transfer_check(rules, rstate, g, h, i, -1, -1, -1)
                if ok and Mr[h] - S[h] - s[i] > room:
                    best, room = h, Mr[h] - S[h] - s[i]
            if best >= 0:
                transfer_apply(rules, rstate, g, best, i, -1, -1, -1)
                assign[i] = best
                S[g] -= s[i]
                W[g] -= w[i]
                S[best] += s[i]
                W[best] += w[i]


@njit
def _leave_full_gpus(s, w, M, rules, rstate, assign, pos, steps, state, scratch):
    """A start that keeps GPUs full (a running placement with KVPR inf) sends the search off
    at an infinite peak, where no single move lowers the max while another GPU stays full.
    Repair it against memories ``FULL_ROOM`` below the real ones (under the rules and the
    budget): where that succeeds every GPU keeps room for its KV cache and the peak is finite;
    where it fails, the start stays as it was.  A greedy pass (:func:`_unfill`) goes first."""
    if not _has_full(s, w, M, assign):
        return
    Mr = np.empty_like(M)
    for g in range(M.shape[0]):
        Mr[g] = M[g] - FULL_ROOM * (M[g] if M[g] < 1.0 else 1.0)
    _unfill(s, w, Mr, rules, rstate, assign)
    if not _has_full(s, w, Mr, assign):
        return
    trial = assign.copy()
    tpos = pos.copy()
    n = s.shape[0]
    if repair_core(s, w, Mr, trial, tpos, INF, steps, state, scratch, rules, rstate, *repair_memory(n), 0, 1) and \
            not _overfull(s, Mr, trial):
        assign[:] = trial
        pos[:] = tpos
    reset_state(rules, rstate, assign)


@njit
def solve_start(s, w, M, rules, seed, assign, pos):
    """A first placement that keeps the rules, the memory and the budget: ``STARTED``, or
    ``NO_ROOM`` (the rules left an item no GPU, or the overflow repair gave up), or
    ``OVER_BUDGET`` (the items whose current GPUs break their rules, moved, exceed the budget).
    Neither failure is a proof; the exact search decides small instances.  Fills
    ``assign``/``pos`` (n,)."""
    n = s.shape[0]
    G = M.shape[0]
    state = np.empty(1, np.uint64)
    state[0] = np.uint64(seed) * np.uint64(2862933555777941757) + np.uint64(3037000493)
    base = np.full(n, -1, np.int64)
    rstate = new_state(rules, base, G)
    if rules[4].shape[0]:
        keep_current(rules, rstate, base)
    scratch = new_scratch(n, G)
    steps = FEASIBLE_STEP_FACTOR * repair_steps(n, G)
    for attempt in range(FEASIBLE_RESTARTS):
        assign[:] = base
        reset_state(rules, rstate, assign)
        if greedy_start(s, w, M, rules, rstate, assign, 0.0 if attempt == 0 else 0.3, state) > 0:
            continue
        if not budget_held(rules, rstate):
            return OVER_BUDGET  # the models whose current GPUs break their rules must move
        for i in range(n):
            pos[i] = i
        if not _overfull(s, M, assign):
            _leave_full_gpus(s, w, M, rules, rstate, assign, pos, steps, state, scratch)
            return STARTED
        if repair_core(s, w, M, assign, pos, INF, steps, state, scratch, rules, rstate, *repair_memory(n), 0, 1) and \
                not _overfull(s, M, assign):
            return STARTED
    return NO_ROOM

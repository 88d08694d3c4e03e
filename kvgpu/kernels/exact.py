"""numba kernels for proving optimality: bisection on ``T`` with an exact feasibility check.

"Max KVPR <= T" holds exactly when every GPU's load ``S + W / T`` is at most its memory ``M``
(then ``S <= M`` too): a bin packing with item sizes ``s + w / T`` into bins of sizes ``M``.
:func:`feasible` decides it exactly, answering feasible / infeasible / unknown under a work
limit, so it never hangs:

* GPUs of equal memory and at most ``DP_MAX_MODELS`` models: a short depth-first search, then
  dynamic programming over subsets of models (:func:`_feasible_dp`, O(2^n n)), which needs no
  luck;
* otherwise depth-first search (:func:`_feasible_dfs`: items largest first; GPUs in the same
  state tried once; a branch is cut when the space the remaining items can still use is too
  small), which proves small and loose instances, and gives up at the node limit on big
  tight ones.

:func:`certify_instance` narrows ``[lo, U]`` -- ``lo`` a proven lower bound, ``U`` the value of
the best placement -- by asking first whether anything beats ``U`` at all (usually "no", which
proves ``U`` optimal in one search), then by bisection.  Soundness: the capacity test has a slack
of ``CAP_SLACK`` GB, which only lets more branches through; every complete placement is then
checked exactly (:func:`_holds`), and one that passes only by the slack is rejected and the search
goes on.  So "infeasible" is a proof, and "feasible" comes with a placement whose max KVPR is at
most ``T``: a proof never stops at a slack artefact (an instance whose only placement is the
answer is proven optimal).  Everything keeps the cluster's rules (:mod:`kvgpu.kernels.rules`):
allowed GPUs, anti-affinity, nodes and the migration budget, so rule instances and small
re-placements are proven too.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from kvgpu.kernels.jit import kernel
from kvgpu.kernels import params
from kvgpu.kernels.cpu import score_of, fits, safe_div
from kvgpu.kernels.params import CAP_SLACK
from kvgpu.kernels.rules import budget_held, may_place, new_state, no_rules, place, restricted, unplace
from kvgpu.kernels.sorting import argsort_stable
from kvgpu.kernels.search import POLISH_ITERS, mem_unit, polish_memory, polish_second_core

njit = kernel()

FEASIBLE, INFEASIBLE, UNKNOWN = 1, 0, -1
RTOL = params.OPTIMAL_RTOL
INF = np.inf
FLOAT_MAX = np.finfo(np.float64).max
#: Largest instance (models) decided by the subset DP (2^n states, 17 bytes each).
DP_MAX_MODELS = 20
#: Before the subset DP, the depth-first search gets ``2^n / DFS_SHARE`` nodes: its room test
#: settles most loose or plainly infeasible targets in a few nodes, where the DP always walks
#: all ``2^n`` subsets (10,000 ADRS-shaped proofs: 15% less CPU time than the DP alone at 256,
#: 9% more at 16, twice as much at 2).
DFS_SHARE = 256


@njit
def feasible(s, w, M, T, node_limit, out, rules, gclass):
    """Is there a placement with max KVPR <= ``T`` (``T = inf``: one that fits in memory) that
    keeps ``rules`` (:mod:`kvgpu.kernels.rules`)?  Returns ``(FEASIBLE | INFEASIBLE | UNKNOWN,
    work used)``; on FEASIBLE ``out`` (n,) holds the GPU of each model, checked exactly (a
    placement that passes only by the capacity slack is not taken).  ``gclass`` (G,) int64:
    GPUs with equal class are interchangeable under the rules ((0,): by memory).  Work counts
    search nodes or DP states."""
    a = s + w / T
    n = s.shape[0]
    uniform = True
    for g in range(M.shape[0]):
        uniform = uniform and M[g] == M[0]
    if uniform and not restricted(rules) and n <= DP_MAX_MODELS and (1 << n) <= node_limit:
        status, nodes = _feasible_dfs(s, w, a, M, T, (1 << n) // DFS_SHARE, out, rules, gclass)
        if status != UNKNOWN:
            return status, nodes
        status = _feasible_dp(a, M[0], M.shape[0], out)
        if status == INFEASIBLE or _holds(s, w, M, T, out):
            return status, 1 << n
        # the DP's packing passes only by the slack; the exhaustive search looks for another
    return _feasible_dfs(s, w, a, M, T, node_limit, out, rules, gclass)


@njit
def _holds(s, w, M, T, assign):
    """Does ``assign`` fit in memory with every GPU at KVPR <= ``T``, computed exactly?"""
    G = M.shape[0]
    S = np.zeros(G)
    W = np.zeros(G)
    for i in range(s.shape[0]):
        S[assign[i]] += s[i]
        W[assign[i]] += w[i]
    for g in range(G):
        if not fits(S[g], M[g]) or safe_div(W[g], M[g] - S[g]) > T:
            return False
    return True


@njit
def _feasible_dp(a, C, G, out):
    """Equal bins of size ``C``: fill bins one after the other; ``best[mask]`` is the least
    (bins used, load of the last bin) over the orders in which the models of ``mask`` can be
    placed -- lexicographically least is optimal for every completion, so ``mask = all`` needs
    at most ``G`` bins iff the packing exists."""
    n = a.shape[0]
    for j in range(n):
        if a[j] > C + CAP_SLACK:
            return INFEASIBLE
    K = 1 << n
    bins = np.full(K, np.iinfo(np.int64).max)
    load = np.full(K, np.inf)
    last = np.full(K, -1, np.int8)
    bins[0] = 1
    load[0] = 0.0
    for mask in range(K):
        if bins[mask] > G:
            continue
        for j in range(n):
            bit = 1 << j
            if mask & bit:
                continue
            nb, nl = _add(bins[mask], load[mask], a[j], C)
            nm = mask | bit
            if nb < bins[nm] or (nb == bins[nm] and nl < load[nm]):
                bins[nm] = nb
                load[nm] = nl
                last[nm] = j
    if bins[K - 1] > G:
        return INFEASIBLE
    seq = np.empty(n, np.int64)  # the models in placing order, recovered backwards
    mask = K - 1
    for k in range(n - 1, -1, -1):
        seq[k] = last[mask]
        mask ^= 1 << seq[k]
    nb, nl = 1, 0.0
    for k in range(n):
        nb, nl = _add(nb, nl, a[seq[k]], C)
        out[seq[k]] = nb - 1
    return FEASIBLE


@kernel(inline=True)
def _add(nb, nl, ai, C):
    """Place an item of size ``ai`` after bins ``nb`` with ``nl`` in the last (bins of ``C``)."""
    if nl + ai <= C + CAP_SLACK:
        return nb, nl + ai
    return nb + 1, ai


@njit
def _twins(order, rules):
    """``twin[k]``: the item at depth ``k`` is interchangeable with the one at ``k - 1`` (shards
    or replicas of one model with the same allowed GPUs and node group), so it only takes a
    higher GPU id -- the other orders are the same placements.  The migration budget counts a
    model's set of GPUs, not which item sits where, so running and new items are twins too."""
    n = order.shape[0]
    twin = np.zeros(n, np.bool_)
    allowed, group, node_group = rules[0], rules[1], rules[2]
    if group.shape[0] == 0:
        return twin
    for k in range(1, n):
        i, j = order[k], order[k - 1]
        same = group[i] >= 0 and group[i] == group[j]
        if same and node_group.shape[0]:
            same = node_group[i] == node_group[j]
        if same and allowed.shape[0]:
            for g in range(allowed.shape[1]):
                if allowed[i, g] != allowed[j, g]:
                    same = False
                    break
        twin[k] = same
    return twin


@njit
def _feasible_dfs(s, w, a, M, T, node_limit, out, rules, gclass):
    n = s.shape[0]
    G = M.shape[0]
    key = -a
    if rules[10].shape[0]:  # adapters after every base: placing one needs its base placed
        key = np.where(rules[10] >= 0, INF, -a)
    order = argsort_stable(key)  # a model's shards are equal: they stay together
    twin = _twins(order, rules)
    rest = np.zeros(n + 1)  # rest[k]: total item size from depth k on
    amin = np.full(n + 1, np.inf)  # amin[k]: smallest item from depth k on
    for k in range(n - 1, -1, -1):
        rest[k] = rest[k + 1] + a[order[k]]
        amin[k] = min(amin[k + 1], a[order[k]])
    load = np.zeros(G)
    used = np.zeros(G)
    choice = np.full(n, -1, np.int64)
    placed = np.full(n, -1, np.int64)
    rstate = new_state(rules, placed, G)
    k = 0
    nodes = 0
    while True:
        if k == n:
            for d in range(n):
                out[order[d]] = choice[d]
            if _holds(s, w, M, T, out):
                return FEASIBLE, nodes
            k -= 1  # passes only by the capacity slack: not a placement at T, search on
        i = order[k]
        g = choice[k]
        if g >= 0:  # back here after the subtree below choice g failed: take item i off g
            load[g] -= a[i]
            used[g] -= s[i]
            unplace(rules, rstate, i, g)
            g += 1
        else:
            g = choice[k - 1] + 1 if twin[k] else 0
        lo = choice[k - 1] + 1 if twin[k] else 0
        placed_ok = False
        while g < G:
            if load[g] + a[i] <= M[g] + CAP_SLACK * mem_unit(M[g]) and fits(used[g] + s[i], M[g]) and may_place(
                    rules, rstate, i, g) and not _same_as_earlier(M, load, used, g, lo, gclass, rules, rstate, i):
                place(rules, rstate, i, g)
                if budget_held(rules, rstate):
                    load[g] += a[i]
                    used[g] += s[i]
                    if _room(M, load, amin[k + 1]) + CAP_SLACK * G >= rest[k + 1]:
                        placed_ok = True
                        break
                    load[g] -= a[i]
                    used[g] -= s[i]
                unplace(rules, rstate, i, g)
            g += 1
        nodes += 1
        if placed_ok:
            choice[k] = g
            k += 1
            if k < n:
                choice[k] = -1
        else:
            choice[k] = -1
            k -= 1
            if k < 0:
                return INFEASIBLE, nodes
        if nodes >= node_limit:
            return UNKNOWN, nodes


@njit
def _same_as_earlier(M, load, used, g, lo, gclass, rules, rstate, i):
    """GPU ``g`` is in the same state as an earlier GPU ``h >= lo`` (the same class -- memory,
    and under rules the same allowed items, node and no current model --, load and use, and
    neither holds an item of ``i``'s group, and both hold the same bases), so placing there was
    already tried."""
    grp = rules[1][i] if rules[1].shape[0] else -1
    if grp >= 0 and rstate[0][grp, g] > 0:
        return False
    for h in range(lo, g):
        same_class = gclass[h] == gclass[g] if gclass.shape[0] else M[h] == M[g]
        if same_class and load[h] == load[g] and used[h] == used[g] and (grp < 0 or rstate[0][grp, h] == 0) and \
                _same_bases(rules, rstate, g, h):
            return True
    return False


@njit
def _same_bases(rules, rstate, g, h):
    """Do GPUs ``g`` and ``h`` hold shards of the same base models (co-location: the adapters
    still to place may go only beside their base, so GPUs of equal load but other bases differ)?"""
    coloc = rules[10]
    for j in range(coloc.shape[0]):
        if coloc[j] >= 0 and (rstate[0][coloc[j], g] > 0) != (rstate[0][coloc[j], h] > 0):
            return False
    return True


@njit
def _room(M, load, smallest):
    """Space the remaining items can still use: free load capacity of the GPUs that can take at
    least the smallest of them."""
    tot = 0.0
    for g in range(M.shape[0]):
        r = M[g] - load[g]
        if r + CAP_SLACK >= smallest:
            tot += r
    return tot


@njit
def certify_instance(s, w, M, lo, assign, pos, node_limit, rules, gclass):
    """Narrow ``[lo, U]`` for one instance, ``U`` the max KVPR of ``assign``/``pos`` (improved in
    place when a better placement turns up; every placement keeps ``rules``).  Returns
    ``(lo, nodes)``: ``lo`` a proven lower bound; ``U <= lo * (1 + RTOL)`` means optimal
    (proven).  ``node_limit`` caps the total work."""
    n = s.shape[0]
    sc = np.empty(3)
    score_of(s, w, M, assign, pos, sc)
    U = sc[0]
    out = np.empty(n, np.int64)
    used = 0
    first = True
    found = False
    while U > lo * (1.0 + RTOL) and U > 0.0 and used < node_limit:
        if U == INF:  # is any placement finite?  (if not, the optimum is inf, proven)
            T = FLOAT_MAX
        elif first:  # "anything below U?" (one search proves an optimum), then bisect
            T = U * (1.0 - 0.5 * RTOL)
            first = False
        else:
            T = 0.5 * (lo + U)
        if T <= 0.0:
            break
        status, nodes = feasible(s, w, M, T, node_limit - used, out, rules, gclass)
        used += nodes
        if status == INFEASIBLE:
            lo = INF if T == FLOAT_MAX else max(lo, T)
        elif status == FEASIBLE:
            sc2 = np.empty(3)
            score_of(s, w, M, out, np.arange(n), sc2)
            U = sc2[0]  # <= T < U: strictly better, checked by feasible()
            assign[:] = out
            pos[:] = np.arange(n)
            found = True
        else:
            break
    if found:  # the exact search only cares for the max: tend the runner-up GPUs too
        polish_second_core(s, w, M, assign, pos, POLISH_ITERS, rules, new_state(rules, assign, M.shape[0]),
                           *polish_memory(n, M.shape[0]), 0, 1)
    return lo, used


@kernel(parallel=True)
def certify_batch(sizes, demand, gpu_mem, n_models, n_gpus, lo, node_limit, assign, pos, used):
    """:func:`certify_instance` for every instance of a compacted batch (no rules), in
    parallel; ``node_limit`` (B,) int64 the work of each instance's proof (0: none), ``lo`` (B,)
    raised in place, ``assign``/``pos`` (B, N) improved in place, ``used`` (B,) work."""
    rules = no_rules()
    gclass = np.empty(0, np.int64)
    for b in prange(sizes.shape[0]):
        n, G = n_models[b], n_gpus[b]
        lo[b], used[b] = certify_instance(sizes[b, :n], demand[b, :n], gpu_mem[b, :G], lo[b], assign[b, :n],
                                          pos[b, :n], node_limit[b], rules, gclass)


@kernel(parallel=True)
def pack_memory_batch(sizes, gpu_mem, n_models, n_gpus, node_limit, assign, pos, status):
    """Fit the models in memory, ignoring demand (the exact search at ``T = inf``), for the
    instances where the seed's heuristics found no packing; ``status`` (B,) FEASIBLE,
    INFEASIBLE (proven: the models do not fit) or UNKNOWN (work limit)."""
    rules = no_rules()
    gclass = np.empty(0, np.int64)
    for b in prange(sizes.shape[0]):
        n, G = n_models[b], n_gpus[b]
        s = sizes[b, :n]
        status[b], _ = feasible(s, np.zeros(n), gpu_mem[b, :G], np.inf, node_limit, assign[b, :n], rules, gclass)
        for i in range(n):
            pos[b, i] = i

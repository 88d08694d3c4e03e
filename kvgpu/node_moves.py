"""Node-level moves: move and swap whole tensor-parallel replicas between nodes.

The search (:mod:`kvgpu.kernels.search`) moves and swaps single items; a tp replica whose shards
must share a node can then change node only when every shard moves at once, which no single
step does.  Where replicas fill nodes, the placement gets stuck with each replica's node as the
start drew it.  :func:`swap_replicas` tries every pair of replicas of the same width (tp) in
different nodes: replica A takes B's GPUs and B takes A's (the shards of a replica are
interchangeable), which keeps both inside one node; a swap is taken when it lowers the largest
KVPR of the GPUs it touches (so the max of the whole placement never rises) and keeps every
rule (:func:`kvgpu.rule_check.rule_breach`).  Best swap first, until none gains.
:func:`move_replicas` moves a replica into another node, each shard onto the GPU there where it
does best, alone or in exchange for the single-GPU models on that GPU (the models it displaces
go to the shard's old GPU), under the same acceptance rule.
"""

from __future__ import annotations

import numpy as np

from kvgpu.kernels.deltas import SCORE_RTOL, safe_div_array
from kvgpu.problem import Problem
from kvgpu.rule_check import rule_breach

#: Most swaps taken by one call (each one lowers a local peak; a guard against long walks).
MAX_SWAPS = 200


def _replicas(problem: Problem) -> list:
    """(node group id, its item ids) of every tp replica kept inside one node."""
    ng = problem.node_group
    if not ng.shape[0]:
        return []
    return [(int(g), np.nonzero(ng == g)[0]) for g in np.unique(ng[ng >= 0]).tolist()]


def _gain(problem: Problem, assign: np.ndarray, S: np.ndarray, W: np.ndarray, A: np.ndarray,
          B: np.ndarray) -> float:
    """How much swapping replicas ``A`` and ``B`` (item ids, equal counts) lowers the largest
    KVPR of the GPUs they occupy (negative: it rises); -inf where memory breaks."""
    inst = problem.items
    ga, gb = assign[A], assign[B]
    touched = np.concatenate([ga, gb])
    s_a, w_a = inst.sizes[A[0]], inst.demand[A[0]]
    s_b, w_b = inst.sizes[B[0]], inst.demand[B[0]]
    S2, W2 = S[touched].copy(), W[touched].copy()
    k = ga.size
    S2[:k] += s_b - s_a
    W2[:k] += w_b - w_a
    S2[k:] += s_a - s_b
    W2[k:] += w_a - w_b
    M = inst.gpu_mem[touched]
    if (S2 > M).any():
        return -np.inf
    before = safe_div_array(W[touched], M - S[touched], np).max()
    after = safe_div_array(W2, M - S2, np).max()
    return float(before - after)


def swap_replicas(problem: Problem, assign: np.ndarray) -> np.ndarray:
    """Swap tp replicas of the same width between nodes while a swap lowers the peak of the
    GPUs it touches (module doc).  ``assign`` (n,) int64, a placement keeping the rules; returns
    a new array, never worse in the max KVPR."""
    a = assign.copy()
    reps = _replicas(problem)
    if len(reps) < 2:
        return a
    inst = problem.items
    G = problem.n_gpus
    for _ in range(MAX_SWAPS):
        S = np.bincount(a, weights=inst.sizes, minlength=G)
        W = np.bincount(a, weights=inst.demand, minlength=G)
        peak = safe_div_array(W, inst.gpu_mem - S, np)
        tried = []
        for x in range(len(reps)):
            A = reps[x][1]
            for y in range(x + 1, len(reps)):
                B = reps[y][1]
                if A.size != B.size or problem.node_of[a[A[0]]] == problem.node_of[a[B[0]]]:
                    continue
                g = _gain(problem, a, S, W, A, B)
                local = max(peak[a[A]].max(), peak[a[B]].max())
                if g > local * SCORE_RTOL * 10:
                    tried.append((-g, x, y))
        for _, x, y in sorted(tried):
            A, B = reps[x][1], reps[y][1]
            b = a.copy()
            b[A], b[B] = a[B], a[A]
            if rule_breach(problem, b) is None:
                a = b
                break
        else:
            return a
    return a


def _pair(problem: Problem, a: np.ndarray, S: np.ndarray, W: np.ndarray, i: int, t: int) -> tuple[float, list]:
    """Shard ``i`` from its GPU ``g`` to GPU ``t`` (another node), alone or with the single-GPU
    items on ``t`` that may use ``g`` going the other way (the models it displaces): the better
    of the two as ``(max KVPR of g and t after, items displaced)``; ``(inf, [])`` where memory
    breaks both."""
    inst = problem.items
    g = a[i]
    s, w, M = inst.sizes, inst.demand, inst.gpu_mem
    on_t = np.nonzero(a == t)[0]
    single = problem.node_group[on_t] < 0
    if problem.allowed.shape[0]:
        single &= problem.allowed[on_t, g].astype(bool)
    if problem.coloc.shape[0]:  # adapters and their bases stay where they are
        single &= problem.coloc[on_t] < 0
        single &= ~np.isin(problem.group[on_t], problem.coloc[problem.coloc >= 0])
    q = on_t[single]
    best, out = np.inf, []
    for moved in ([], q.tolist()):
        sq, wq = s[moved].sum(), w[moved].sum()
        Sg, Wg = S[g] - s[i] + sq, W[g] - w[i] + wq
        St, Wt = S[t] + s[i] - sq, W[t] + w[i] - wq
        if Sg > M[g] or St > M[t]:
            continue
        k = float(safe_div_array(np.array([Wg, Wt]), np.array([M[g] - Sg, M[t] - St]), np).max())
        if k < best:
            best, out = k, moved
    return best, out


def _replica_move(problem: Problem, a: np.ndarray, S: np.ndarray, W: np.ndarray, A: np.ndarray,
                  node: int) -> tuple[float, np.ndarray | None]:
    """Replica ``A`` moved into ``node``, each shard to the free GPU there where its pair
    (:func:`_pair`) is least, largest-KVPR shard first: ``(max KVPR of the GPUs touched after,
    the new assignment)``, ``(inf, None)`` where it does not fit."""
    ok = problem.node_of == node
    if problem.allowed.shape[0]:
        ok &= problem.allowed[A].astype(bool).all(axis=0)
    if problem.group.shape[0]:
        ok[a[problem.group == problem.group[A[0]]]] = False  # the model's other items stay apart
    ys = np.nonzero(ok)[0]
    if ys.size < A.size:
        return np.inf, None
    b, worst = a.copy(), 0.0
    for i in A.tolist():
        k, t, moved = _best_target(problem, a, S, W, i, ys)
        if t < 0:
            return np.inf, None
        b[i] = t
        b[moved] = a[i]
        ys = ys[ys != t]
        worst = max(worst, k)
    return worst, b


def _best_target(problem, a, S, W, i, ys):
    """``(pair KVPR, target GPU, items displaced)`` of the best GPU of ``ys`` for shard ``i``;
    target -1 for none."""
    best = (np.inf, -1, [])
    for t in ys.tolist():
        k, moved = _pair(problem, a, S, W, i, int(t))
        if k < best[0]:
            best = (k, int(t), moved)
    return best


def move_replicas(problem: Problem, assign: np.ndarray) -> np.ndarray:
    """Move whole tp replicas to another node, each shard alone or swapped with the single-GPU
    items on its new GPU (the models it displaces), while a move lowers the peak of the GPUs it
    touches and keeps every rule: best move first.  ``assign`` (n,) int64 keeping the rules;
    returns a new array, never worse in the max KVPR."""
    a = assign.copy()
    reps = _replicas(problem)
    if not reps:
        return a
    inst = problem.items
    G = problem.n_gpus
    nodes = np.unique(problem.node_of).tolist()
    for _ in range(MAX_SWAPS):
        S = np.bincount(a, weights=inst.sizes, minlength=G)
        W = np.bincount(a, weights=inst.demand, minlength=G)
        peak = safe_div_array(W, inst.gpu_mem - S, np)
        tried = []
        for _, A in reps:
            here = problem.node_of[a[A[0]]]
            for nd in nodes:
                if nd == here:
                    continue
                k, b = _replica_move(problem, a, S, W, A, nd)
                if b is None:
                    continue
                touched = np.unique(np.concatenate([a[A], b[A]]))
                before = float(peak[touched].max())
                if k < before * (1 - 10 * SCORE_RTOL):
                    tried.append((k - before, len(tried), b))
        for _, _, b in sorted(tried, key=lambda x: (x[0], x[1])):
            if rule_breach(problem, b) is None:
                a = b
                break
        else:
            return a
    return a
